package e2e

// node-agent's drain, end to end: the seed document's flows, each strategy of the
// SPEC's table, and re-enabling the node.

import (
	"net/http"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

var (
	liveMigrate   = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate)
	ifPossible    = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible)
	noneStrategy  = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyNone)
	external      = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyExternal)
	notMigratable = sim.WithBridgeInterface()
)

// onNode pins a VM's first start to a node of the scenario.
func onNode(node string) sim.VMOption {
	return sim.WithNodeSelector(map[string]string{corev1.LabelHostname: node})
}

// plainPod creates an unmanaged pod bound to node (as a pod with spec.nodeName is).
func (sc *scenario) plainPod(name, node string, mutate ...func(*corev1.Pod)) *corev1.Pod {
	sc.t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: sc.ns},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: new(int64),
			Containers:                    []corev1.Container{{Name: "app", Image: "registry.example/app:1"}},
		},
	}
	for _, m := range mutate {
		m(pod)
	}
	created, err := sc.kube().CoreV1().Pods(sc.ns).Create(sc.ctx, pod, metav1.CreateOptions{})
	if err != nil {
		sc.t.Fatalf("creating pod %s: %v", name, err)
	}
	return created
}

// The seed's first flow, "evict all VMs on a node", by the drain taint alone: every VM
// leaves as its strategy and owner say, other pods stay, the node reports safe.
func TestDrainEvictsVMsOnly(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.createVM("migrating", liveMigrate, onNode(node))
	always := sc.createVM("always", noneStrategy, onNode(node))
	bare := sc.createVMI("bare", noneStrategy, onNode(node))
	rs := sc.createVMIRS("rs", 1, noneStrategy, onNode(node))
	// Let restarted VMs go anywhere in the pool.
	sc.patchVMNodeSelector("migrating", map[string]string{poolLabel: sc.pool})
	sc.patchVMNodeSelector("always", map[string]string{poolLabel: sc.pool})
	sc.patchVMIRSNodeSelector("rs", map[string]string{poolLabel: sc.pool})
	app := sc.plainPod("app", node)

	a := sc.startAgent(node, "--log-format=json")
	if code, st := a.safeToShutdown(""); code != http.StatusServiceUnavailable || len(st.VMs) != 4 || st.Draining {
		t.Fatalf("before the drain: /safe-to-shutdown %d, %d VMs, draining %v; want 503, 4 VMs, not draining", code, len(st.VMs), st.Draining)
	}

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	st := a.waitSafe(2 * time.Minute)
	if !st.Draining || len(st.VMs) != 0 {
		t.Errorf("after the drain: %+v", st)
	}
	if moved := sc.waitVMIOn("migrating", other); moved.UID != migrating.UID {
		t.Errorf("the LiveMigrate VM was restarted, not migrated")
	}
	if restarted := sc.waitVMIOn("always", other); restarted.UID == always.UID {
		t.Errorf("the runStrategy Always VM did not restart as a new VMI")
	}
	sc.waitStoppedForGood("bare", bare)
	sc.waitReplaced("rs", rs[0], other)
	if p, err := sc.kube().CoreV1().Pods(sc.ns).Get(sc.ctx, app.Name, metav1.GetOptions{}); err != nil || p.DeletionTimestamp != nil {
		t.Errorf("the plain pod was touched without --all-pods: %v", err)
	}
	n := sc.node(node)
	if got := n.Annotations[agent.AnnotationState]; got != "drained: no VM left, safe to power off" {
		t.Errorf("state annotation %q", got)
	}
	events := sc.events("default", "Node", node)
	for _, reason := range []string{agent.ReasonDrainStarted, agent.ReasonDrainCompleted} {
		if !hasEvent(events, reason) {
			t.Errorf("no %s event on the node", reason)
		}
	}
	if !hasEvent(sc.events(sc.ns, "VirtualMachineInstance", "always"), agent.ReasonShutdownRequested) {
		t.Errorf("no %s event on the VMI it shut down", agent.ReasonShutdownRequested)
	}
	a.checkMetrics(map[string]float64{
		`node_agent_drains_started_total{node="` + node + `",trigger="taint"}`:                        1,
		`node_agent_drain_duration_seconds_count{node="` + node + `",trigger="taint"}`:                1,
		`node_agent_safe_to_shutdown{node="` + node + `"}`:                                            1,
		`node_agent_draining{node="` + node + `"}`:                                                    1,
		`node_agent_eviction_requests_total{action="shutdown",node="` + node + `",outcome="evicted"}`: 3,
	})
	a.checkJSONLogs(sc.ns, "always", "bare")
}

// waitReplaced waits until the VMIRS has a running VMI other than old on node.
func (sc *scenario) waitReplaced(rs string, old *kubevirtv1.VirtualMachineInstance, node string) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForVMIs(sc.ctx, sc.ns, sim.LabelVMIRS+"="+rs, "replaced on "+node, func(vs []*kubevirtv1.VirtualMachineInstance) bool {
		for _, v := range vs {
			if v.UID != old.UID && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName == node {
				return true
			}
		}
		return false
	}); err != nil {
		sc.t.Errorf("VMIRS %s: %v", rs, err)
	}
}

func (sc *scenario) patchVMIRSNodeSelector(name string, sel map[string]string) {
	sc.t.Helper()
	for {
		rs := &kubevirtv1.VirtualMachineInstanceReplicaSet{}
		if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIRSs).Name(name).Do(sc.ctx).Into(rs); err != nil {
			sc.t.Fatal(err)
		}
		rs.Spec.Template.Spec.NodeSelector = sel
		err := sc.env.cluster.KubeVirt.Put().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIRSs).Name(name).Body(rs).Do(sc.ctx).Error()
		if err != nil && isConflict(err) {
			continue
		}
		if err != nil {
			sc.t.Fatalf("updating VMIRS %s: %v", name, err)
		}
		return
	}
}

func isConflict(err error) bool { return apierrors.IsConflict(err) }
