package e2e

// A withdrawn drain, whatever KubeVirt can undo: evacuations cancelled where virt-api
// serves evacuate/cancel, named where it does not, and the evacuation of a VM that the
// agent meant to shut down cancelled too.

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// newPrivateEnv starts a cluster of the test's own (with its simulators), for what
// the shared one must not be changed for: a missing webhook or subresource API. It is
// stopped when the test ends. The test runs in parallel with the others (t.Parallel),
// its scenarios (newScenarioIn) one after another.
func newPrivateEnv(t *testing.T, opts cluster.Options) *env {
	t.Helper()
	t.Parallel()
	slots.take(t)
	ctx, cancel := context.WithCancel(context.Background())
	start := time.Now()
	c, err := cluster.Start(ctx, opts)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	e := &env{cluster: c, agentBin: shared.agentBin, ctx: ctx}
	t.Cleanup(func() {
		cancel()
		if e.faulted {
			stopPrivateCluster(t, c, faultErrors...)
		} else {
			stopPrivateCluster(t, c)
		}
	})
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	if e.sim, err = sim.Start(ctx, c.RESTConfig, sim.Options{Log: log}); err != nil {
		t.Fatal(err)
	}
	t.Logf("a cluster of the test's own up in %s", time.Since(start).Round(100*time.Millisecond))
	return e
}

// markedForEvacuation waits until KubeVirt's webhook has marked the VMI for
// evacuation from node and the migration it led to is stuck (one node: its target
// pod cannot be scheduled), so that the evacuation is still there to cancel.
func (sc *scenario) markedForEvacuation(vmi, node string) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, vmi, "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == node
	}); err != nil {
		sc.t.Fatal(err)
	}
}

// withdrawn waits until the agent has withdrawn the drain: its record removed from the
// Node, /safe-to-shutdown not draining, a DrainWithdrawn event on the Node.
func (sc *scenario) withdrawn(a *agentProc, node string) corev1.Event {
	sc.t.Helper()
	sc.eventually(time.Minute, "the drain record to be removed", func() (bool, string) {
		raw, ok := sc.node(node).Annotations[agent.AnnotationDrain]
		return !ok, raw
	})
	a.waitStatus(30*time.Second, "the drain withdrawn", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return !st.Draining })
	sc.eventually(30*time.Second, "the state annotation to say idle", func() (bool, string) {
		s := sc.node(node).Annotations[agent.AnnotationState]
		return strings.HasPrefix(s, "idle"), s
	})
	return sc.nodeEvent(node, agent.ReasonDrainWithdrawn)
}

// Where evacuate/cancel is not served (KubeVirt before v1.8, whose virt-api answers
// 404; here the API server answers 404 because virt-api's subresource API is not
// registered, which is what the agent sees either way), the drain is still withdrawn:
// the record cleared, DrainWithdrawn sent naming what was not cancelled, status,
// annotation and metrics updated. KubeVirt keeps the VMI marked, and the agent says so
// on the VMI. Before the fix the first 404 ended the withdraw, retried forever.
func TestDrainWithdrawWithoutEvacuateCancel(t *testing.T) {
	e := newPrivateEnv(t, cluster.Options{WithoutSubresourceAPI: true})
	sc := newScenarioIn(t, e, 1)
	node := sc.nodes[0]
	sub, err := nodeinfo.NewKubeVirtSubresourceClient(e.cluster.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	sc.createVM("vm", liveMigrate)
	if err := agent.CancelEvacuation(sc.ctx, sub, sc.ns, "vm", node); !agent.CancelUnsupported(err) {
		t.Fatalf("evacuate/cancel on this cluster answered %v; want 404, as a KubeVirt before v1.8", err)
	}
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	sc.markedForEvacuation("vm", node)
	a.waitStatus(30*time.Second, "the VM reported migrating (blocked once its target pod is unschedulable)", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return migratingOrNoRoom(vmStatus(st, sc.ns, "vm"))
	})

	sc.untaint(node, agentOnlyKey)
	ev := sc.withdrawn(a, node)
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, "evacuation of "+sc.ns+"/vm") || !strings.Contains(ev.Message, "does not serve evacuate/cancel") {
		t.Errorf("DrainWithdrawn event %s %q: want a Warning naming the evacuation not cancelled and why", ev.Type, ev.Message)
	}
	vev := sc.waitEvent(sc.ns, "VirtualMachineInstance", "vm", agent.ReasonEvacuationNotCancelled, 30*time.Second)
	if vev.Type != corev1.EventTypeWarning {
		t.Errorf("%s event is %s, want Warning", agent.ReasonEvacuationNotCancelled, vev.Type)
	}
	if v := sc.vmi("vm"); v.Status.EvacuationNodeName != node {
		t.Errorf("the VMI's evacuationNodeName is %q: nothing could clear it, the test's premise is wrong", v.Status.EvacuationNodeName)
	}
	a.checkMetrics(map[string]float64{
		`node_agent_withdraw_actions_total{node="` + node + `",object="evacuation",outcome="failed"}`: 1,
		`node_agent_draining{node="` + node + `"}`:                                                    0,
	})
	// A new drain starts afresh after the withdraw.
	sc.taint(node, agentOnlyKey)
	a.waitStatus(30*time.Second, "a new drain", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return st.Draining })
	t.Logf("DrainWithdrawn: %s", ev.Message)
}

// A VM the agent recorded as one to shut down, which KubeVirt turned into an
// evacuation (the cluster's eviction strategy changed from None to LiveMigrate while
// a PodDisruptionBudget held its eviction back), has its evacuation cancelled when the
// drain is withdrawn. Before the fix only VMs recorded as migrate or external were.
func TestDrainWithdrawCancelsEvacuationRecordedAsShutdown(t *testing.T) {
	sc := newClusterWideScenario(t, 1)
	node := sc.nodes[0]
	if err := sc.setClusterEvictionStrategy(kubevirtv1.EvictionStrategyNone); err != nil {
		t.Fatal(err)
	}
	vmi := sc.createVM("vm")
	// virt-api wrote the cluster's None into the VMI: without one of its own, the
	// cluster's value changed below applies to it.
	sc.withoutOwnEvictionStrategy("vm")
	_, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "hold"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(1)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{kubevirtv1.CreatedByLabel: string(vmi.UID)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// No disruption controller runs here: the budget's status is never computed, and
	// the API server refuses every eviction it covers (429), as a budget allowing no
	// disruption would.
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "vm", agent.ReasonEvictionRefused, time.Minute)
	sc.eventually(30*time.Second, "the drain record to say shutdown", func() (bool, string) {
		raw := sc.node(node).Annotations[agent.AnnotationDrain]
		return strings.Contains(raw, `"`+sc.ns+`/vm":"shutdown"`), raw
	})
	if err := sc.env.cluster.UpdateKubeVirtConfiguration(sc.ctx, func(c *kubevirtv1.KubeVirtConfiguration) {
		c.EvictionStrategy = ptr.To(kubevirtv1.EvictionStrategyLiveMigrate)
	}); err != nil {
		t.Fatal(err)
	}
	sc.markedForEvacuation("vm", node)
	if raw := sc.node(node).Annotations[agent.AnnotationDrain]; !strings.Contains(raw, `"`+sc.ns+`/vm":"shutdown"`) {
		t.Fatalf("the drain record no longer says shutdown: %s", raw)
	}

	sc.untaint(node, agentOnlyKey)
	sc.withdrawn(a, node)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "vm", agent.ReasonEvacuationCancelled, 30*time.Second)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "no longer marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == ""
	}); err != nil {
		t.Fatal(err)
	}
	if after := sc.vmi("vm"); after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
}
