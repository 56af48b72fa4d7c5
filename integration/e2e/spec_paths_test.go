package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// consistently checks cond for the whole of d and fails the test at the first time it
// is false: the assertion that something does not happen, over a window long enough
// for the agent to react to what the test changed (it reacts within a second).
func (sc *scenario) consistently(d time.Duration, what string, cond func() (bool, string)) {
	sc.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if ok, detail := cond(); !ok {
			sc.t.Fatalf("%s: no longer so: %s", what, detail)
		}
		select {
		case <-sc.ctx.Done():
			sc.t.Fatal(sc.ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// A cordon alone, and a taint with the drain key but another effect (PreferNoSchedule,
// NoExecute), start no drain (SPEC: the drain taint is the key with effect
// NoSchedule). The VM stays, the agent reports no drain and requests no eviction;
// the drain taint itself then starts the drain at once, which shows the agent was
// watching all along.
func TestDrainNotStartedByCordonOrAnotherEffect(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	// The VM tolerates the key's NoExecute taint: without that, kube-controller-manager's
	// taint eviction would delete its virt-launcher pod, as on a real cluster.
	always := sc.pinned("always", node, noneStrategy, sim.WithTolerations(corev1.Toleration{
		Key: agentOnlyKey, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute}))
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)
	a.waitStatus(30*time.Second, "the VM seen, no drain", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Ready && !st.Draining && len(st.VMs) == 1
	})
	start := time.Now()
	notDraining := func() (bool, string) {
		code, st := a.safeToShutdown("")
		if st.Draining || code != http.StatusServiceUnavailable {
			return false, "the agent reports a drain"
		}
		if v := sc.vmi(always.Name); v == nil || v.UID != always.UID || v.DeletionTimestamp != nil {
			return false, "the VM is leaving"
		}
		return true, ""
	}

	sc.cordon(node, true)
	sc.consistently(5*time.Second, "no drain on a cordon alone", notDraining)
	for _, effect := range []corev1.TaintEffect{corev1.TaintEffectPreferNoSchedule, corev1.TaintEffectNoExecute} {
		sc.patchNode(node, func(n *corev1.Node) {
			n.Spec.Taints = []corev1.Taint{{Key: agentOnlyKey, Effect: effect}}
		})
		sc.consistently(5*time.Second, "no drain on the key with effect "+string(effect), notDraining)
	}
	if n := sc.eventCount(metav1.NamespaceDefault, "Node", node, agent.ReasonDrainStarted); n != 0 {
		t.Errorf("%d %s events before the drain taint", n, agent.ReasonDrainStarted)
	}
	counts, err := evictionsPerPod(sc.env.cluster.AuditLog, sc.ns, start, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(counts) != 0 {
		t.Errorf("eviction requests before the drain taint: %v", sortedCounts(counts))
	}

	sc.patchNode(node, func(n *corev1.Node) {
		n.Spec.Taints = []corev1.Taint{{Key: agentOnlyKey, Effect: corev1.TaintEffectNoSchedule}}
	})
	a.waitSafe(2 * time.Minute)
	sc.waitRestarted(always, other)
}

// With --all-pods, a mirror pod (a static pod the kubelet mirrors, annotated
// kubernetes.io/config.mirror) is kept, as kubectl drain keeps it: never asked to
// evict, still there when the node is safe; a plain pod beside it is evicted.
func TestDrainAllPodsKeepsMirrorPods(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	mirror := sc.plainPod("static-web-"+node, node, func(p *corev1.Pod) {
		p.Annotations = map[string]string{corev1.MirrorPodAnnotationKey: "e2e-hash"}
		p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node, UID: sc.node(node).UID, Controller: ptr.To(true)}}
	})
	free := sc.plainPod("free", node)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey, "--all-pods", "--pod-eviction-retry=1s")
	a.waitStatus(30*time.Second, "only the plain pod counted", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Ready && st.PodsLeft == 1
	})
	start := time.Now()
	sc.taint(node, agentOnlyKey)
	a.waitSafe(time.Minute)
	if _, ok := sc.podPhase(sc.ns, free.Name, free.UID); ok {
		t.Error("the plain pod is still there on a safe node")
	}
	if _, ok := sc.podPhase(sc.ns, mirror.Name, mirror.UID); !ok {
		t.Error("the mirror pod is gone")
	}
	counts, err := evictionsPerPod(sc.env.cluster.AuditLog, sc.ns, start, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if counts[mirror.Name] != 0 || counts[free.Name] == 0 {
		t.Errorf("eviction requests: %v; want the plain pod's, none for the mirror pod", sortedCounts(counts))
	}
}

// startVM asks virt-api to start a VM (virtctl start), as an operator starts a VM of
// runStrategy Manual.
func (sc *scenario) startVM(name string) {
	sc.t.Helper()
	if err := sc.env.cluster.KubeVirt.Put().
		AbsPath("/apis/subresources.kubevirt.io/v1/namespaces", sc.ns, "virtualmachines", name, "start").
		Body([]byte("{}")).SetHeader("Content-Type", "application/json").Do(sc.ctx).Error(); err != nil {
		sc.t.Fatalf("start VM %s: %v", name, err)
	}
}

// `node-agent status` and `drain --dry-run` predict how each VM ends up, by its owner
// and run strategy; the drain then does what they said: runStrategy Always restarts
// elsewhere, a VMIRS replaces its replica elsewhere, runStrategy Manual, Once and
// RerunOnFailure (whose evicted VMI ends Succeeded) and a bare VMI stay stopped.
func TestCLIPredictionsComeTrue(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	always := sc.pinned("always", node, noneStrategy)
	once := sc.createVM("once", noneStrategy, onNode(node), sim.WithRunStrategy(kubevirtv1.RunStrategyOnce))
	rerun := sc.createVM("rerun", noneStrategy, onNode(node), sim.WithRunStrategy(kubevirtv1.RunStrategyRerunOnFailure))
	if err := sc.env.sim.Create(sc.ctx, sim.NewVM(sc.ns, "manual", sc.vmOpts([]sim.VMOption{noneStrategy, onNode(node), sim.WithRunStrategy(kubevirtv1.RunStrategyManual)})...)); err != nil {
		t.Fatal(err)
	}
	sc.startVM("manual")
	manual := sc.waitRunning("manual")
	rs := sc.createVMIRS("rs", 1, noneStrategy, onNode(node))
	sc.patchVMIRSNodeSelector("rs", map[string]string{poolLabel: sc.pool})
	bare := sc.createVMI("bare", noneStrategy, onNode(node))

	want := map[string]string{
		always.Name: "shut down, restarted on another node (runStrategy Always)",
		once.Name:   "shut down, stays stopped (runStrategy Once)",
		rerun.Name:  "shut down, stays stopped (runStrategy RerunOnFailure)",
		manual.Name: "shut down, stays stopped (runStrategy Manual)",
		rs[0].Name:  "shut down, replaced on another node by its VMIRS",
		bare.Name:   "shut down, stays stopped (a bare VMI)",
	}
	out, errOut, code := sc.ctl("status", node, "-o", "json")
	if code != 0 {
		t.Fatalf("status -o json exited %d: %s", code, errOut)
	}
	var st struct {
		Predicted map[string]string `json:"predicted"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	dry, errOut, code := sc.ctl("drain", node, "--dry-run")
	if code != 0 {
		t.Fatalf("drain --dry-run exited %d: %s", code, errOut)
	}
	for name, end := range want {
		if got := st.Predicted[sc.ns+"/"+name]; got != end {
			t.Errorf("status predicts %q for %s, want %q", got, name, end)
		}
		if !strings.Contains(dry, sc.ns+"/"+name) || !strings.Contains(dry, end) {
			t.Errorf("drain --dry-run does not say %q for %s:\n%s", end, name, dry)
		}
	}

	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)
	sc.taint(node, agentOnlyKey)
	a.waitSafe(2 * time.Minute)
	sc.waitRestarted(always, other)
	sc.waitReplaced("rs", rs[0], other)
	for _, v := range []*kubevirtv1.VirtualMachineInstance{once, rerun, manual, bare} {
		sc.waitStoppedForGood(v.Name, v)
	}
	// A VM's controller restarts a VMI right after the old one ends, if it restarts it
	// at all: the VMs that stay stopped report it, and their VMI is not recreated.
	for _, name := range []string{once.Name, rerun.Name, manual.Name} {
		sc.eventually(30*time.Second, "VM "+name+" to report it is not running", func() (bool, string) {
			vm := &kubevirtv1.VirtualMachine{}
			if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource("virtualmachines").Name(name).Do(sc.ctx).Into(vm); err != nil {
				return false, err.Error()
			}
			return !vm.Status.Ready && vm.Status.PrintableStatus != kubevirtv1.VirtualMachineStatusStarting &&
				vm.Status.PrintableStatus != kubevirtv1.VirtualMachineStatusRunning, string(vm.Status.PrintableStatus)
		})
		if v := sc.vmi(name); v != nil && !v.IsFinal() {
			t.Errorf("VM %s was started again: VMI %s in phase %s", name, v.UID, v.Status.Phase)
		}
	}
}

// "Keeps the last good key", end to end, with a last good key that is not the default:
// the KubeVirt CR names a custom key, then an invalid one; the agent keeps the custom
// key (not the default), says so, and drains on it.
func TestDrainKeepsTheLastGoodCustomKey(t *testing.T) {
	const good, bad = "e2e.node-agent.test/last-good", "not a key!"
	sc := newClusterWideScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	always := sc.pinned("always", node, noneStrategy)
	sc.setDrainTaintKey(good)
	a := sc.startAgent(node)
	a.waitStatus(30*time.Second, "the custom key in force", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Ready && st.TaintKey == good && st.ConfigError == ""
	})

	sc.setDrainTaintKey(bad)
	st := a.waitStatus(30*time.Second, "the invalid key reported", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.ConfigError != ""
	})
	if st.TaintKey != good || !strings.Contains(st.ConfigError, bad) {
		t.Errorf("/safe-to-shutdown: taint key %q, config error %q; want the last good key %q and an error naming %q", st.TaintKey, st.ConfigError, good, bad)
	}
	ev := sc.nodeEvent(node, agent.ReasonConfigError)
	if !strings.Contains(ev.Message, bad) || !strings.Contains(ev.Message, good) {
		t.Errorf("ConfigError event %q: want it to name the invalid key and the key kept", ev.Message)
	}

	sc.taint(node, good)
	a.waitSafe(2 * time.Minute)
	sc.waitRestarted(always, other)
}

// The drain taint removed by someone while a host shutdown is pending: the drain is not
// withdrawn (the SPEC withdraws only when no shutdown is pending), the agent puts its
// taint back, the shutdown stays held while a VM is on the node, and goes ahead once
// it has left.
func TestShutdownTaintRemovedWhileShutdownPending(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	stuck := sc.pinned("stuck", node, liveMigrate, notMigratable)
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=3m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 3*time.Minute)
	bootID := sc.node(node).Status.NodeInfo.BootID

	asked := sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	sc.untaint(node, nodeinfo.DefaultDrainTaintKey)
	sc.waitOutOfService(node, bootID)
	st := a.waitStatus(30*time.Second, "the shutdown's drain going on", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, stuck.Name)
		return st.Draining && st.Trigger == agent.TriggerShutdown && v != nil && v.State == agent.StateBlocked
	})
	if n := sc.eventCount(metav1.NamespaceDefault, "Node", node, agent.ReasonDrainWithdrawn); n != 0 {
		t.Errorf("%d %s events while the shutdown is pending; status %+v", n, agent.ReasonDrainWithdrawn, st)
	}
	if at, started, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || started {
		t.Fatalf("logind started the poweroff job at %v (err %v) with a VM on the node", at, err)
	}

	// The operator moves the VM by hand (here: deletes it); the shutdown goes ahead.
	if err := sc.env.cluster.KubeVirt.Delete().Namespace(sc.ns).Resource("virtualmachines").Name(stuck.Name).Do(sc.ctx).Error(); err != nil {
		t.Fatal(err)
	}
	sc.waitPowerOffJob(env, asked, 2*time.Minute)
	if ev := sc.nodeEvent(node, agent.ReasonShutdownReleased); ev.Type != corev1.EventTypeNormal {
		t.Errorf("%s event %s %q, want Normal (released when safe)", ev.Reason, ev.Type, ev.Message)
	}
}

// PrepareForShutdown(false) in the middle of a drain: the shutdown's deadline passed with
// a LiveMigrate VM still migrating (its target cannot be scheduled: the pool has one
// node), the poweroff job started and was cancelled. The agent withdraws the drain: the
// evacuation it requested is cancelled (the VMI no longer marked), the VM stays running
// where it is, and its own taint and cordon go.
func TestShutdownCancelledMidDrainWithdrawsEvacuations(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	vmi := sc.createVM("vm", liveMigrate)
	env := sc.startLogind(logind.WithInhibitDelayMax(time.Minute))
	a := sc.startShutdownAgent(node, env, "--drain-taint-key="+agentOnlyKey, "--shutdown-timeout=20s")

	asked := sc.powerOff(env)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == node
	}); err != nil {
		t.Fatal(err)
	}
	sc.waitPowerOffJob(env, asked, time.Minute)
	if ev := sc.nodeEvent(node, agent.ReasonShutdownReleased); ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, "vm") {
		t.Errorf("%s event %s %q: want a Warning naming the VM left", ev.Reason, ev.Type, ev.Message)
	}
	if n, err := env.CancelJobs(sc.ctx); err != nil || n < 1 {
		t.Fatalf("cancelling the poweroff job: %d jobs, %v", n, err)
	}

	sc.waitEvent(sc.ns, "VirtualMachineInstance", "vm", agent.ReasonEvacuationCancelled, time.Minute)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "no longer marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == ""
	}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, "the agent's taint and cordon removed", func() (bool, string) {
		n := sc.node(node)
		return !hasTaintKey(n, agentOnlyKey) && !n.Spec.Unschedulable, fmt.Sprintf("taints %v, unschedulable %v", n.Spec.Taints, n.Spec.Unschedulable)
	})
	a.waitStatus(30*time.Second, "the drain withdrawn", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "vm")
		return !st.Draining && v != nil && v.State == agent.StateRunning
	})
	after := sc.vmi("vm")
	if after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
	sc.waitLock(env, a)
}

// `node-agent undrain` cancels the evacuations still under way: a LiveMigrate VM whose
// migration cannot finish (the pool has one node) is being evacuated after
// `node-agent drain` gave up following it; the agent is stopped, so what cancels the
// evacuation is undrain alone. The VMI is no longer marked, the VM stays running where
// it is, and the node is untainted and uncordoned.
func TestCLIUndrainCancelsEvacuationsStillMigrating(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	vmi := sc.createVM("vm", liveMigrate)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)
	key := "--drain-taint-key=" + agentOnlyKey

	out, errOut, code := sc.ctl("drain", node, key, "--timeout=10s")
	if code != 1 {
		t.Fatalf("drain exited %d, want 1 (timed out with the VM migrating)\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == node
	}); err != nil {
		t.Fatal(err)
	}
	a.stop()

	out, errOut, code = sc.ctl("undrain", node, key)
	if code != 0 {
		t.Fatalf("undrain exited %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if !strings.Contains(out+errOut, sc.ns+"/vm") {
		t.Errorf("undrain does not name the evacuation it cancelled:\n%s%s", out, errOut)
	}
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "no longer marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == ""
	}); err != nil {
		t.Fatal(err)
	}
	n := sc.node(node)
	if n.Spec.Unschedulable || hasTaintKey(n, agentOnlyKey) {
		t.Errorf("after undrain: unschedulable %v, taints %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
	after := sc.vmi("vm")
	if after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
}

// --shutdown-all-pods: on a host shutdown the other pods are evicted too, and the
// shutdown is held until they are gone: a pod whose eviction an admission policy denies
// keeps the node unsafe and the poweroff job unstarted (the VM has long left); once
// allowed, it is evicted and the shutdown goes ahead. Without the flag a taint-started
// drain leaves the pods alone (TestDrainEvictsVMsOnly).
func TestShutdownAllPodsHeldUntilThePodsLeft(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	always := sc.pinned("always", node, noneStrategy)
	free := sc.plainPod("free", node)
	denied := sc.plainPod("denied", node)
	sc.denyEvictionOf(denied.Name)
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-all-pods", "--pod-eviction-retry=1s", "--shutdown-timeout=3m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 3*time.Minute)

	asked := sc.powerOff(env)
	sc.waitRestarted(always, other)
	sc.eventually(time.Minute, "the free pod evicted", func() (bool, string) {
		_, ok := sc.podPhase(sc.ns, free.Name, free.UID)
		return !ok, "still there"
	})
	a.waitStatus(30*time.Second, "the denied pod left, no VM", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Draining && st.Trigger == agent.TriggerShutdown && len(st.VMs) == 0 && st.PodsLeft == 1
	})
	if at, started, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || started {
		t.Fatalf("logind started the poweroff job at %v (err %v) with a pod left to evict", at, err)
	}

	sc.allowEvictions()
	started := sc.waitPowerOffJob(env, asked, 2*time.Minute)
	if _, ok := sc.podPhase(sc.ns, denied.Name, denied.UID); ok {
		t.Errorf("the poweroff job started at %s with the pod still on the node", started.Format(time.StampMilli))
	}
}
