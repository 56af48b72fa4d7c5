package drainctl

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// OtherPods evicts a node's other pods (not virt-launcher pods) as the agent on the
// node does, through its own agent.PodDrainer: the pods kubectl drain
// --ignore-daemonsets --delete-emptydir-data --force would evict, each in a single
// request at most once per its backoff (no client-side retries of a 429). Follow
// drives it.
type OtherPods struct {
	drainer *agent.PodDrainer
	retry   time.Duration
}

// EvictOtherPods returns what evicts the node's other pods while Follow follows the
// node. Refusals are written to errOut, once per pod and cause.
func (c *Client) EvictOtherPods(node string, errOut io.Writer) *OtherPods {
	log := logrus.New()
	log.SetOutput(errOut)
	log.SetLevel(logrus.WarnLevel)
	log.SetFormatter(&logrus.TextFormatter{DisableTimestamp: true})
	return c.otherPods(node, clock.RealClock{}, log)
}

func (c *Client) otherPods(node string, clk clock.Clock, log logrus.FieldLogger) *OtherPods {
	return &OtherPods{
		retry: agent.DefaultPodEvictionRetry,
		drainer: agent.NewPodDrainer(c.Kube, agent.PodDrainerOptions{
			Node: node, Retry: agent.DefaultPodEvictionRetry, RetryMax: otherPodsRetryMax, Clock: clk,
			Log: log.WithField("node", node),
		}),
	}
}

// otherPodsRetryMax bounds the backoff of a pod whose eviction is refused, as the
// agent's default --eviction-backoff-max does.
const otherPodsRetryMax = time.Minute

// evict asks for the eviction of the pods that are due and counts the pods left; -1
// when they cannot be listed. launchers are the node's virt-launcher pods.
func (p *OtherPods) evict(ctx context.Context, launchers []*corev1.Pod) int {
	left, err := p.drainer.Ensure(ctx, launchers, true)
	if err != nil {
		return -1
	}
	return left
}

// followRate bounds how often Follow looks again when the node changes faster.
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
		// The other pods leaving is a change too; they are counted by the drainer.
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
	migrations := c.migrationTracker()
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
		// A pod whose eviction was refused is tried again when its backoff ends,
		// whether or not anything changed by then.
		var retry <-chan time.Time
		if n, err := view.Node(); err == nil {
			vmis := view.VMIs()
			v := c.complete(ctx, migrations, newView(n, cfg, vmis, view.LauncherPods()), cfg, vmis, false)
			if pods != nil {
				v.PodsLeft = pods.evict(ctx, view.LauncherPods())
				if v.PodsLeft != 0 {
					retry = time.After(pods.retry)
				}
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
		case <-retry:
		}
	}
}
