package drainctl

import (
	"context"
	"fmt"
	"io"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/tools/cache"
	"k8s.io/kubectl/pkg/drain"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// OtherPods evicts a node's other pods (not virt-launcher pods) in the background, with
// the agent's own kubectl drain helper settings (agent.OtherPodsHelper).
type OtherPods struct {
	helper *drain.Helper
	node   string
}

// EvictOtherPods starts evicting the node's other pods, as `kubectl drain
// --ignore-daemonsets --delete-emptydir-data --force`; it stops when ctx ends.
// Problems are written to errOut.
func (c *Client) EvictOtherPods(ctx context.Context, node string, errOut io.Writer) *OtherPods {
	p := &OtherPods{node: node, helper: agent.OtherPodsHelper(c.Kube, agent.DefaultPodEvictionRetry, io.Discard, errOut)}
	helper := *p.helper
	helper.Ctx = ctx
	go func() {
		list, errs := helper.GetPodsForDeletion(node)
		if len(errs) > 0 {
			fmt.Fprintf(errOut, "listing the other pods of node/%s: %v\n", node, errs)
			return
		}
		if err := helper.DeleteOrEvictPods(list.Pods()); err != nil && ctx.Err() == nil {
			fmt.Fprintf(errOut, "evicting the other pods of node/%s: %v\n", node, err)
		}
	}()
	return p
}

// Left counts the node's other pods still to evict; -1 when they cannot be listed.
func (p *OtherPods) Left(ctx context.Context) int {
	h := *p.helper
	h.Ctx = ctx
	list, errs := h.GetPodsForDeletion(p.node)
	if len(errs) > 0 {
		return -1
	}
	return len(list.Pods())
}

// followRate bounds how often Follow looks again (each look lists the migrations of
// the migrating VMs) when the node changes faster.
const followRate = 250 * time.Millisecond

// Follow watches the node through informers scoped to it, as the agent on the node
// does (its Node, its VMIs, its virt-launcher pods; with pods, all its pods; cfg is
// resolved already, the configuration is not watched), and
// calls show with a new look at it after changes, until the node is safe to power
// off (it returns that view) or ctx ends (it returns the last view and ctx's error).
func (c *Client) Follow(ctx context.Context, node string, cfg nodeinfo.Config, pods *OtherPods, show func(NodeView)) (NodeView, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	changed := make(chan struct{}, 1)
	poke := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	view := nodeinfo.NewView(c.Kube, c.KubeVirt, nodeinfo.ViewOptions{
		NodeName: node, DrainTaintKey: cfg.DrainTaintKey, OnChange: poke, WithoutConfig: true,
	})
	view.Run(ctx)
	if pods != nil {
		// The other pods leaving is a change too; they are counted by the helper.
		lw := cache.NewFilteredListWatchFromClient(c.Kube.CoreV1().RESTClient(), "pods", "", func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", node).String()
		})
		inf := cache.NewSharedIndexInformer(lw, &corev1.Pod{}, 0, cache.Indexers{})
		_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { poke() },
			UpdateFunc: func(any, any) { poke() },
			DeleteFunc: func(any) { poke() },
		})
		go inf.RunWithContext(ctx)
	}
	var last NodeView
	if err := view.WaitForSync(ctx); err != nil {
		return last, fmt.Errorf("watching node %s: %w", node, err)
	}
	var next time.Time
	for {
		if wait := time.Until(next); wait > 0 {
			select {
			case <-ctx.Done():
				return last, ctx.Err()
			case <-time.After(wait):
			}
		}
		next = time.Now().Add(followRate)
		if n, err := view.Node(); err == nil {
			vmis := view.VMIs()
			v := c.complete(ctx, newView(n, cfg, vmis, view.LauncherPods()), cfg, vmis, false)
			if pods != nil {
				v.PodsLeft = pods.Left(ctx)
			}
			last = v
			show(v)
			if v.Safe() {
				return v, nil
			}
		}
		select {
		case <-ctx.Done():
			return last, ctx.Err()
		case <-changed:
		}
	}
}
