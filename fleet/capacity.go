package fleet

import (
	"context"
	"fmt"
	"sort"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/pager"
	resourcehelper "k8s.io/component-helpers/resource"
	schedulinghelper "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	"k8s.io/klog/v2"
)

// launcherLabel is on KubeVirt's virt-launcher pods (kubevirt.io=virt-launcher).
const launcherLabel = "kubevirt.io"

// Fits says whether the VMs of node that need a place elsewhere (mine: the
// virt-launcher pods of the VMs to be migrated or restarted), and those still on the
// nodes draining, fit on the nodes that remain: the nodes that are not node, draining or waiting (about to go),
// that are Ready and not cordoned. A VM is its virt-launcher pod: its requests (as the
// scheduler counts them, resourcehelper.PodRequests) against a node's allocatable less
// the requests of the pods already there, its tolerations against the node's
// NoSchedule and NoExecute taints, its required node affinity and node selector
// against the node's labels. The VMs are placed first-fit, largest memory first, each
// on the node with the most free memory. Inter-pod affinity, topology spread and
// PreferNoSchedule are not counted. It returns why they do not fit, empty when they
// do, or when waiting would not make room: room comes back when a node that could take
// them (its labels match their node selector and affinity) and is away returns (one
// draining or waiting, or shutting down as shuttingDown says: a host that had no VM
// to drain, rebooting); with none away, the drain may as well start (the VMs that
// find no node are reported blocked, as always).
//
// It reads every node and every pod of the cluster, a page of PageSize at a time (from
// the API server's watch cache where it serves consistent lists, as since Kubernetes
// 1.31), and keeps of them only what the check needs (readCluster): its memory grows
// with the cluster's nodes, not with its pods.
func Fits(ctx context.Context, kube kubernetes.Interface, node string, mine []*corev1.Pod, draining, ahead, behind []string, shuttingDown func(*corev1.Node) bool) (string, error) {
	if len(mine) == 0 {
		return "", nil
	}
	c, err := readCluster(ctx, kube, draining, shuttingDown)
	if err != nil {
		return "", err
	}
	return fit(node, mine, draining, ahead, behind, c), nil
}

// PageSize is how many nodes or pods one request of the capacity check reads. A
// virt-launcher pod as KubeVirt renders it is about 45 KiB while decoded, and the
// check holds two pages: with 10,000 such pods in the cluster its heap grew by 16 MiB at
// most with pages of 100, 53 MiB with pages of 500 (594 MiB read in one answer), and it
// took 6.3 s against 2.6 s (BenchmarkAgentFootprint, docs/BENCHMARKS.md). It runs once
// when a host shutdown's turn comes, on every node: the memory counts more.
const PageSize = 100

// cluster is what the capacity check keeps of the cluster.
type cluster struct {
	nodes    []corev1.Node    // trimmed: name, labels, taints, unschedulable, allocatable, Ready
	shutting map[string]bool  // the nodes shutting down (shuttingDown)
	used     map[string]usage // what the pods on each node request
	// launchers are the virt-launcher pods, not being deleted, of the nodes draining:
	// their VMs need room too.
	launchers []*corev1.Pod
}

// usage is what the pods on a node request, as the scheduler counts it.
type usage struct {
	cpu, mem int64 // milli-CPU, bytes
	pods     int64
}

// readCluster lists the nodes and the pods that have not terminated, a page at a time,
// and folds each page into a cluster. The pager fetches the next page while one is
// folded, no more (PageBufferSize 0): two pages in memory at most. A list whose continue
// token expired (410) is an error, read again from its first page at the next look,
// never in one answer (the pager's FullListIfExpired).
func readCluster(ctx context.Context, kube kubernetes.Interface, draining []string, shuttingDown func(*corev1.Node) bool) (*cluster, error) {
	c := newCluster()
	if err := eachPaged(ctx, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
		return kube.CoreV1().Nodes().List(ctx, o)
	}, metav1.ListOptions{}, func(o runtime.Object) {
		c.addNode(o.(*corev1.Node), shuttingDown)
	}); err != nil {
		return nil, fmt.Errorf("listing the nodes for the capacity check: %w", err)
	}
	moving := map[string]bool{}
	for _, n := range draining {
		moving[n] = true
	}
	if err := eachPaged(ctx, func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
		return kube.CoreV1().Pods("").List(ctx, o)
	}, metav1.ListOptions{
		FieldSelector: fields.AndSelectors(fields.OneTermNotEqualSelector("status.phase", string(corev1.PodSucceeded)), fields.OneTermNotEqualSelector("status.phase", string(corev1.PodFailed))).String(),
	}, func(o runtime.Object) {
		c.addPod(o.(*corev1.Pod), moving)
	}); err != nil {
		return nil, fmt.Errorf("listing the pods for the capacity check: %w", err)
	}
	return c, nil
}

// eachPaged calls fold on every item that list returns, PageSize a request, with the
// pager holding no page ahead and never falling back to one whole answer.
func eachPaged(ctx context.Context, list pager.ListPageFunc, opts metav1.ListOptions, fold func(runtime.Object)) error {
	p := pager.New(list)
	p.PageSize, p.PageBufferSize, p.FullListIfExpired = PageSize, 0, false
	return p.EachListItem(ctx, opts, func(o runtime.Object) error {
		fold(o)
		return nil
	})
}

func newCluster() *cluster {
	return &cluster{shutting: map[string]bool{}, used: map[string]usage{}}
}

// addNode keeps what the check reads of n (its page is not kept).
func (c *cluster) addNode(n *corev1.Node, shuttingDown func(*corev1.Node) bool) {
	if shuttingDown != nil && shuttingDown(n) {
		c.shutting[n.Name] = true
	}
	k := corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: n.Labels}}
	k.Spec.Unschedulable, k.Spec.Taints = n.Spec.Unschedulable, n.Spec.Taints
	k.Status.Allocatable = n.Status.Allocatable
	if ready(n) {
		k.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	}
	c.nodes = append(c.nodes, k)
}

// addPod counts p's requests on its node, and keeps a copy of it when it is a
// virt-launcher pod of a node draining (moving).
func (c *cluster) addPod(p *corev1.Pod, moving map[string]bool) {
	if p.Spec.NodeName == "" {
		return
	}
	req := resourcehelper.PodRequests(p, resourcehelper.PodResourcesOptions{})
	u := c.used[p.Spec.NodeName]
	u.cpu += req.Cpu().MilliValue()
	u.mem += req.Memory().Value()
	u.pods++
	c.used[p.Spec.NodeName] = u
	if moving[p.Spec.NodeName] && p.DeletionTimestamp == nil && p.Labels[launcherLabel] == "virt-launcher" {
		c.launchers = append(c.launchers, p.DeepCopy())
	}
}

// room is what a node has left.
type room struct {
	node     *corev1.Node
	cpu, mem int64 // milli-CPU, bytes
	pods     int64
}

// fit is Fits on nodes and pods read: first on the nodes that are not in the queue at
// all; when the VMs do not fit there, it waits (says why) while a node they could use
// is away and returns first (draining, waiting ahead, shutting down); when none is,
// the nodes waiting behind count too, and whatever does not fit then goes ahead
// anyway (waiting would gain nothing).
func fit(node string, mine []*corev1.Pod, draining, ahead, behind []string, c *cluster) string {
	away := map[string]bool{node: true}
	for _, n := range draining {
		away[n] = true
	}
	for _, n := range ahead {
		away[n] = true
	}
	queued := map[string]bool{}
	for _, n := range behind {
		queued[n] = true
	}
	place := append(append([]*corev1.Pod{}, mine...), c.launchers...)
	if len(place) == 0 {
		return ""
	}
	left, rooms := placeFirstFit(place, c, func(n string) bool { return away[n] || queued[n] })
	if left == nil {
		return ""
	}
	if roomMayComeBack(left, node, away, c) {
		req := resourcehelper.PodRequests(left, resourcehelper.PodResourcesOptions{})
		return fmt.Sprintf("the VMs of %d virt-launcher pods must move, and %s/%s (requests cpu %s, memory %s) fits on none of the %d nodes that remain (Ready, schedulable, not in the queue); waiting for a node away to come back",
			len(place), left.Namespace, left.Name, req.Cpu(), req.Memory(), rooms)
	}
	return ""
}

// placeFirstFit places pods (largest memory first) on the Ready, schedulable nodes not
// excluded, each on the one with the most free memory after the requests of the pods
// already there: the first pod that fits nowhere (nil when all fit), and how many nodes
// there were.
func placeFirstFit(place []*corev1.Pod, c *cluster, excluded func(string) bool) (*corev1.Pod, int) {
	rooms := map[string]*room{}
	for i := range c.nodes {
		n := &c.nodes[i]
		if excluded(n.Name) || n.Spec.Unschedulable || !ready(n) {
			continue
		}
		a, u := n.Status.Allocatable, c.used[n.Name]
		rooms[n.Name] = &room{node: n, cpu: a.Cpu().MilliValue() - u.cpu, mem: a.Memory().Value() - u.mem, pods: a.Pods().Value() - u.pods}
	}
	type want struct {
		pod      *corev1.Pod
		cpu, mem int64
	}
	wants := make([]want, 0, len(place))
	for _, p := range place {
		req := resourcehelper.PodRequests(p, resourcehelper.PodResourcesOptions{})
		wants = append(wants, want{p, req.Cpu().MilliValue(), req.Memory().Value()})
	}
	sort.SliceStable(wants, func(i, j int) bool { return wants[i].mem > wants[j].mem })
	candidates := make([]*room, 0, len(rooms))
	for _, r := range rooms {
		candidates = append(candidates, r)
	}
	sort.Slice(candidates, func(i, j int) bool { return candidates[i].node.Name < candidates[j].node.Name })
	for _, w := range wants {
		var best *room
		for _, r := range candidates {
			if r.cpu < w.cpu || r.mem < w.mem || r.pods < 1 || !schedulable(w.pod, r.node) {
				continue
			}
			if best == nil || r.mem > best.mem {
				best = r
			}
		}
		if best == nil {
			return w.pod, len(candidates)
		}
		best.cpu, best.mem, best.pods = best.cpu-w.cpu, best.mem-w.mem, best.pods-1
	}
	return nil, len(candidates)
}

// roomMayComeBack: a node other than self that could take the pod (by its labels) is
// away for now: in the queue, or shutting down.
func roomMayComeBack(p *corev1.Pod, self string, away map[string]bool, c *cluster) bool {
	for i := range c.nodes {
		n := &c.nodes[i]
		if n.Name == self {
			continue
		}
		if !away[n.Name] && !c.shutting[n.Name] {
			continue
		}
		if ok, _ := nodeaffinity.GetRequiredNodeAffinity(p).Match(n); ok {
			return true
		}
	}
	return false
}

func ready(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// schedulable: the pod tolerates the node's NoSchedule and NoExecute taints, and the
// node matches its node selector and required node affinity.
func schedulable(p *corev1.Pod, n *corev1.Node) bool {
	_, untolerated := schedulinghelper.FindMatchingUntoleratedTaint(klog.Background(), n.Spec.Taints, p.Spec.Tolerations, func(t *corev1.Taint) bool {
		return t.Effect == corev1.TaintEffectNoSchedule || t.Effect == corev1.TaintEffectNoExecute
	}, false)
	if untolerated {
		return false
	}
	ok, _ := nodeaffinity.GetRequiredNodeAffinity(p).Match(n)
	return ok
}
