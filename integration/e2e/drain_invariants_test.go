package e2e

// The SPEC's invariants, end to end: a LiveMigrate VM is never shut down; never a
// second unfinished migration for one VMI; an agent killed at any moment carries on
// without repeating or losing an action; an operator's cordon and taint stay; a
// withdrawn drain cancels its evacuations through virt-api.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// A LiveMigrate VM that cannot migrate (a bridge on the pod network) is never shut
// down: once the node's other VMs have left, it still runs there as the same VMI in
// the same pod, and the agent reports it blocked, loudly, with the reason.
func TestDrainNeverShutsDownLiveMigrateVM(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	stuck := sc.pinned("stuck", node, liveMigrate, notMigratable)
	migrating := sc.pinned("migrating", node, liveMigrate)
	always := sc.pinned("always", node, noneStrategy)
	pod := sc.launcherPod(stuck, node)
	a := sc.startAgent(node)

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	sc.waitMigrated(migrating, other)
	sc.waitRestarted(always, other)
	st := a.waitStatus(time.Minute, "only the stuck VM left, blocked", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "stuck")
		return len(st.VMs) == 1 && v != nil && v.State == agent.StateBlocked
	})
	if v := vmStatus(st, sc.ns, "stuck"); !strings.Contains(v.Detail, "InterfaceNotLiveMigratable") || v.Strategy != string(kubevirtv1.EvictionStrategyLiveMigrate) {
		t.Errorf("blocked VM reported as %+v: want strategy LiveMigrate and the condition's reason InterfaceNotLiveMigratable", v)
	}
	after := sc.vmi("stuck")
	if after.UID != stuck.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node || after.DeletionTimestamp != nil {
		t.Errorf("the LiveMigrate VM did not stay: uid %s (was %s) phase %s node %s", after.UID, stuck.UID, after.Status.Phase, after.Status.NodeName)
	}
	sc.podUntouched(pod, "a LiveMigrate VM is never shut down")
	ev := sc.waitEvent(sc.ns, "VirtualMachineInstance", "stuck", agent.ReasonBlocked, 30*time.Second)
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, "InterfaceNotLiveMigratable") {
		t.Errorf("DrainBlocked event %s %q: want a Warning with the reason", ev.Type, ev.Message)
	}
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "stuck", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on the LiveMigrate VM", n, agent.ReasonShutdownRequested)
	}
}

// unfinishedMigrations watches the migrations of a namespace and records every moment
// at which one VMI had more than one unfinished migration.
type unfinishedMigrations struct {
	mu         sync.Mutex
	unfinished map[string]map[string]bool // VMI -> migration names
	all        map[string]map[string]bool
	violations []string
	done       chan struct{}
	w          watch.Interface
}

func (sc *scenario) watchMigrations() *unfinishedMigrations {
	sc.t.Helper()
	list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).Do(sc.ctx).Into(list); err != nil {
		sc.t.Fatal(err)
	}
	w, err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).
		Param("watch", "true").Param("resourceVersion", list.ResourceVersion).Watch(sc.ctx)
	if err != nil {
		sc.t.Fatal(err)
	}
	u := &unfinishedMigrations{unfinished: map[string]map[string]bool{}, all: map[string]map[string]bool{}, done: make(chan struct{}), w: w}
	for i := range list.Items {
		u.observe(watch.Added, &list.Items[i])
	}
	go func() {
		defer close(u.done)
		for ev := range w.ResultChan() {
			if m, ok := ev.Object.(*kubevirtv1.VirtualMachineInstanceMigration); ok {
				u.observe(ev.Type, m)
			}
		}
	}()
	return u
}

func (u *unfinishedMigrations) observe(t watch.EventType, m *kubevirtv1.VirtualMachineInstanceMigration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	vmi := m.Spec.VMIName
	if u.unfinished[vmi] == nil {
		u.unfinished[vmi], u.all[vmi] = map[string]bool{}, map[string]bool{}
	}
	u.all[vmi][m.Name] = true
	if t == watch.Deleted || m.IsFinal() || m.DeletionTimestamp != nil {
		delete(u.unfinished[vmi], m.Name)
		return
	}
	u.unfinished[vmi][m.Name] = true
	if len(u.unfinished[vmi]) > 1 {
		var names []string
		for n := range u.unfinished[vmi] {
			names = append(names, n)
		}
		u.violations = append(u.violations, fmt.Sprintf("VMI %s: %v unfinished at once", vmi, names))
	}
}

func (u *unfinishedMigrations) stop() {
	u.w.Stop()
	<-u.done
}

// The agent never causes a second unfinished migration for one VMI, although
// KubeVirt's own evacuation controller reacts to the same (default) drain taint and a
// failed migration is retried by KubeVirt.
func TestDrainNoSecondUnfinishedMigration(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	names := []string{"vm0", "vm1", "vm2", "vm3"}
	var vmis []*kubevirtv1.VirtualMachineInstance
	for i, name := range names {
		opts := []sim.VMOption{liveMigrate, sim.WithMigrationDuration(2 * time.Second)}
		if i == 0 {
			opts = append(opts, sim.WithMigrationFailures(1))
		}
		vmis = append(vmis, sc.pinned(name, node, opts...))
	}
	migrations := sc.watchMigrations()
	a := sc.startAgent(node)

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitSafe(3 * time.Minute)
	for _, v := range vmis {
		sc.waitMigrated(v, other)
	}
	migrations.stop()
	migrations.mu.Lock()
	defer migrations.mu.Unlock()
	for _, v := range migrations.violations {
		t.Error(v)
	}
	for i, name := range names {
		want := 1
		if i == 0 {
			want = 2 // the injected failure and KubeVirt's retry
		}
		if got := len(migrations.all[name]); got != want {
			t.Errorf("VMI %s had %d migrations, want %d: %v", name, got, want, migrations.all[name])
		}
	}
}

// The agent keeps its state in the cluster: killed with SIGKILL right after the
// DrainStarted event, right after the first MigrationRequested event and after the
// drain completed, and restarted each time, it finishes the drain with every action
// done exactly once, including a shutdown that a budget held back across the kills.
func TestDrainSurvivesAgentKill(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	flag := "--drain-taint-key=" + agentOnlyKey
	migrate := []string{"m0", "m1", "m2"}
	before := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, name := range migrate {
		before[name] = sc.pinned(name, node, liveMigrate, sim.WithMigrationDuration(3*time.Second))
	}
	before["always"] = sc.pinned("always", node, noneStrategy, sim.WithShutdownDuration(2*time.Second), sim.WithTerminationGracePeriod(10))
	before["bridged"] = sc.pinned("bridged", node, ifPossible, notMigratable)
	// A budget on its virt-launcher pod refuses the eviction of "always" until the
	// test deletes it, after the kills: that action must survive them.
	pdb, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "always"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(1)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{kubevirtv1.CreatedByLabel: string(before["always"].UID)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := sc.startAgent(node, flag)

	sc.taint(node, agentOnlyKey)
	sc.nodeEvent(node, agent.ReasonDrainStarted)
	a.kill()
	a = sc.startAgent(node, flag)

	// The second kill point: the first evacuation requested (a VMI marked by KubeVirt's
	// webhook). Its event may not have left the agent yet: events are sent in the
	// background and a SIGKILL loses what is queued.
	sc.eventually(time.Minute, "a first VMI marked for evacuation", func() (bool, string) {
		for _, name := range migrate {
			if v := sc.vmi(name); v != nil && (v.Status.EvacuationNodeName != "" || v.Status.NodeName != node) {
				return true, ""
			}
		}
		return false, "none marked"
	})
	a.kill()
	a = sc.startAgent(node, flag)

	sc.waitEvent(sc.ns, "VirtualMachineInstance", "always", agent.ReasonEvictionRefused, time.Minute)
	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, pdb.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	a.waitSafe(3 * time.Minute)
	sc.nodeEvent(node, agent.ReasonDrainCompleted)
	a.kill()
	a = sc.startAgent(node, flag)
	if code, st := a.safeToShutdown(""); code != http.StatusOK || !st.Draining {
		t.Errorf("after a restart on the drained node: %s", statusJSON(code, st))
	}

	for _, name := range migrate {
		sc.waitMigrated(before[name], other)
		// At most one: a second would be a repeated action; none, an event lost to a kill.
		if n := sc.eventCount(sc.ns, "VirtualMachineInstance", name, agent.ReasonMigrationRequested); n > 1 {
			t.Errorf("VMI %s: %d %s events, want at most 1", name, n, agent.ReasonMigrationRequested)
		}
		if ms := sc.migrationsOf(name); len(ms) != 1 {
			t.Errorf("VMI %s: %d migrations, want 1", name, len(ms))
		}
	}
	for _, name := range []string{"always", "bridged"} {
		sc.waitRestarted(before[name], other)
		// "always" is evicted after the kills: exactly one event. "bridged" may have been
		// evicted just before one, and its event lost with it: at most one.
		n := sc.eventCount(sc.ns, "VirtualMachineInstance", name, agent.ReasonShutdownRequested)
		if n > 1 || (name == "always" && n != 1) {
			t.Errorf("VMI %s: %d %s events", name, n, agent.ReasonShutdownRequested)
		}
	}
	for _, reason := range []string{agent.ReasonDrainStarted, agent.ReasonDrainCompleted} {
		if n := sc.eventCount(metav1.NamespaceDefault, "Node", node, reason); n != 1 {
			t.Errorf("%d %s events on the node, want 1", n, reason)
		}
	}
	var rec agent.DrainRecord
	raw := sc.node(node).Annotations[agent.AnnotationDrain]
	if err := json.Unmarshal([]byte(raw), &rec); err != nil || len(rec.Requested) != 5 || rec.Completed == nil {
		t.Errorf("drain record %s: %v", raw, err)
	}
}

// An operator's cordon and drain taint are the operator's: the agent drains on them
// and leaves them in place, during the drain and after it stops.
func TestDrainLeavesOperatorCordonAndTaint(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	a := sc.startAgent(node)

	sc.cordon(node, true)
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(migrating, other)
	check := func(when string) {
		n := sc.node(node)
		if !n.Spec.Unschedulable || !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) {
			t.Errorf("%s: the operator's cordon or taint is gone: unschedulable %v, taints %v", when, n.Spec.Unschedulable, n.Spec.Taints)
		}
		if raw, ok := n.Annotations[agent.AnnotationOwned]; ok {
			t.Errorf("%s: the agent claims to own part of the operator's drain: %s", when, raw)
		}
	}
	check("after the drain")
	a.stop()
	check("after the agent stopped")
}

// Withdrawing a drain cancels the evacuation it requested, through virt-api's
// virtualmachineinstances/NAME/evacuate/cancel (KubeVirt v1.8): with one node only,
// the migration cannot complete (its target pod stays Pending); when the taint is
// removed, the VMI's evacuationNodeName is cleared and the VM stays where it runs.
// The key is the agent's own: with KubeVirt's default key its evacuation controller
// creates the migration itself, without evacuationNodeName, and nothing is there to
// cancel.
func TestDrainWithdrawCancelsEvacuation(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	vmi := sc.createVM("vm", liveMigrate)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == node
	}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, "a migration whose target pod is Pending", func() (bool, string) {
		ms := sc.migrationsOf("vm")
		for _, m := range ms {
			if !m.IsFinal() && m.Status.Phase != "" {
				return m.Status.Phase == kubevirtv1.MigrationScheduling || m.Status.Phase == kubevirtv1.MigrationPending, string(m.Status.Phase)
			}
		}
		return false, fmt.Sprintf("%d migrations", len(ms))
	})
	a.waitStatus(30*time.Second, "the VM reported migrating (blocked once its target pod is unschedulable)", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return migratingOrNoRoom(vmStatus(st, sc.ns, "vm"))
	})

	sc.untaint(node, agentOnlyKey)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "vm", agent.ReasonEvacuationCancelled, time.Minute)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "vm", "no longer marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == ""
	}); err != nil {
		t.Fatal(err)
	}
	a.waitStatus(30*time.Second, "the drain withdrawn", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "vm")
		return !st.Draining && v != nil && v.State == agent.StateRunning
	})
	sc.eventually(30*time.Second, "the drain record to be removed", func() (bool, string) {
		raw, ok := sc.node(node).Annotations[agent.AnnotationDrain]
		return !ok, raw
	})
	sc.nodeEvent(node, agent.ReasonDrainWithdrawn)
	after := sc.vmi("vm")
	if after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
}
