package agent

import (
	"context"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

func testMigration(name string, phase kubevirtv1.VirtualMachineInstanceMigrationPhase, created time.Time) kubevirtv1.VirtualMachineInstanceMigration {
	m := kubevirtv1.VirtualMachineInstanceMigration{}
	m.Namespace, m.Name, m.UID, m.Status.Phase = "ns", name, types.UID("uid-"+name), phase
	m.CreationTimestamp = metav1.NewTime(created)
	m.Spec.VMIName = "vm"
	return m
}

// withTransitions records m's phases as KubeVirt does, one a minute from its creation.
func withTransitions(m kubevirtv1.VirtualMachineInstanceMigration, phases ...kubevirtv1.VirtualMachineInstanceMigrationPhase) kubevirtv1.VirtualMachineInstanceMigration {
	for i, p := range phases {
		m.Status.PhaseTransitionTimestamps = append(m.Status.PhaseTransitionTimestamps, kubevirtv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{
			Phase: p, PhaseTransitionTimestamp: metav1.NewTime(m.CreationTimestamp.Add(time.Duration(i) * time.Minute)),
		})
	}
	return m
}

func TestDescribeMigration(t *testing.T) {
	state := func(uid string, edit func(*kubevirtv1.VirtualMachineInstanceMigrationState)) *kubevirtv1.VirtualMachineInstanceMigrationState {
		ms := &kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: types.UID(uid), SourceNode: thisNode, TargetNode: "node-b"}
		if edit != nil {
			edit(ms)
		}
		return ms
	}
	started := func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) { ms.StartTimestamp = ptrTime(t0) }
	old := testMigration("old", kubevirtv1.MigrationFailed, t0)
	tests := []struct {
		name       string
		state      *kubevirtv1.VirtualMachineInstanceMigrationState
		migrations []kubevirtv1.VirtualMachineInstanceMigration
		want       *MigrationStatus
	}{
		{name: "none"},
		{name: "only an old failed one the VMI does not name", migrations: []kubevirtv1.VirtualMachineInstanceMigration{old}},
		{name: "not handed to the nodes: the object's phase", want: &MigrationStatus{Name: "m", Phase: "Scheduling"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{old, testMigration("m", kubevirtv1.MigrationScheduling, t0.Add(time.Minute))}},
		{name: "no phase yet is Pending", want: &MigrationStatus{Name: "m", Phase: "Pending"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", "", t0)}},
		{name: "the VMI names an older one: the new one's phase", state: state("uid-old", func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) { ms.Failed = true }),
			want:       &MigrationStatus{Name: "m", Phase: "Pending"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{old, testMigration("m", kubevirtv1.MigrationPending, t0.Add(time.Minute))}},
		{name: "handed over: the target from the VMI", state: state("uid-m", nil), want: &MigrationStatus{Name: "m", Phase: "Scheduled", TargetNode: "node-b"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", kubevirtv1.MigrationScheduled, t0)}},
		{name: "started on the VMI before the object says so", state: state("uid-m", started), want: &MigrationStatus{Name: "m", Phase: "Running", TargetNode: "node-b", PhaseSince: ptrTime(t0)},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", kubevirtv1.MigrationTargetReady, t0)}},
		{name: "completed on the VMI", state: state("uid-m", func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) { started(ms); ms.Completed = true }),
			want:       &MigrationStatus{Name: "m", Phase: "Succeeded", TargetNode: "node-b"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", kubevirtv1.MigrationRunning, t0)}},
		{name: "failed on the VMI", state: state("uid-m", func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) { started(ms); ms.Failed = true }),
			want:       &MigrationStatus{Name: "m", Phase: "Failed", TargetNode: "node-b"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", kubevirtv1.MigrationRunning, t0)}},
		{name: "ended, the VMI not moved yet", state: state("uid-m", func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) { started(ms); ms.Completed = true }),
			want:       &MigrationStatus{Name: "m", Phase: "Succeeded", TargetNode: "node-b"},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{testMigration("m", kubevirtv1.MigrationSucceeded, t0)}},
		{name: "since when: the phase's transition KubeVirt recorded", state: state("uid-m", nil),
			want:       &MigrationStatus{Name: "m", Phase: "PreparingTarget", TargetNode: "node-b", PhaseSince: ptrTime(t0.Add(2 * time.Minute))},
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{withTransitions(testMigration("m", kubevirtv1.MigrationPreparingTarget, t0), kubevirtv1.MigrationPending, kubevirtv1.MigrationScheduling, kubevirtv1.MigrationPreparingTarget)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vmi := newVMI("vm", thisNode, kubevirtv1.Running)
			vmi.Status.MigrationState = tt.state
			got := DescribeMigration(vmi, tt.migrations)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("DescribeMigration() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// evacuatingVM is a node drained by the taint with one LiveMigrate VM on it, marked
// for evacuation.
func evacuatingVM(t *testing.T) (*fixture, *kubevirtv1.VirtualMachineInstance) {
	t.Helper()
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	vmi := newVMI("vm", thisNode, kubevirtv1.Running)
	live := kubevirtv1.EvictionStrategyLiveMigrate
	vmi.Spec.EvictionStrategy = &live
	vmi.Status.EvacuationNodeName = thisNode
	return newFixture(t, n, vmi, launcherPod("virt-launcher-vm", string(vmi.UID), thisNode, corev1.PodRunning)), vmi
}

// A drain's status names each migrating VM's migration and phase, reading the VM's
// migrations when its VMI shows a change (and every migrationRelist while it shows
// nothing of the migration), not on every sync.
func TestSyncStatusNamesTheMigrationListingOnChangesOnly(t *testing.T) {
	f, vmi := evacuatingVM(t)
	setMigration := func(phase kubevirtv1.VirtualMachineInstanceMigrationPhase) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {testMigration("kubevirt-evacuation-x", phase, t0)}}
	}
	setVMI := func(edit func(*kubevirtv1.VirtualMachineInstance)) {
		v := vmi.DeepCopy()
		edit(v)
		if err := f.vmis.Update(v); err != nil {
			t.Fatal(err)
		}
		vmi = v
	}
	// look syncs n times and returns the VM's status and the lists so far.
	look := func(n int) (VMStatus, int) {
		t.Helper()
		for range n {
			if _, err := f.sync(); err != nil {
				t.Fatal(err)
			}
		}
		st, _ := f.engine.Status()
		if len(st.VMs) != 1 {
			t.Fatalf("status %+v", st)
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		return st.VMs[0], f.migrationLists
	}
	check := func(step string, got VMStatus, lists int, want *MigrationStatus, wantDetail string, wantLists int) {
		t.Helper()
		if got.State != StateMigrating || !reflect.DeepEqual(got.Migration, want) || got.Detail != wantDetail {
			t.Errorf("%s: state %s, migration %+v, detail %q; want migrating, %+v, %q", step, got.State, got.Migration, got.Detail, want, wantDetail)
		}
		if lists != wantLists {
			t.Errorf("%s: %d lists of the VM's migrations, want %d", step, lists, wantLists)
		}
	}

	// Marked for evacuation; KubeVirt has not created the migration yet.
	got, lists := look(3)
	check("no migration yet", got, lists, nil, "evacuation requested; KubeVirt schedules the migration", 1)
	setMigration(kubevirtv1.MigrationPending)
	got, lists = look(3)
	check("created, not read again before migrationRelist", got, lists, nil, "evacuation requested; KubeVirt schedules the migration", 1)
	f.clock.Step(migrationRelist)
	got, lists = look(3)
	check("read again after migrationRelist", got, lists, &MigrationStatus{Name: "kubevirt-evacuation-x", Phase: "Pending"}, "migration kubevirt-evacuation-x Pending", 2)
	setMigration(kubevirtv1.MigrationScheduling)
	f.clock.Step(migrationRelist)
	got, lists = look(3)
	check("its target pod waits", got, lists, &MigrationStatus{Name: "kubevirt-evacuation-x", Phase: "Scheduling"}, "migration kubevirt-evacuation-x Scheduling", 3)

	// Handed to the nodes: the VMI names it, which is read at once.
	setMigration(kubevirtv1.MigrationScheduled)
	setVMI(func(v *kubevirtv1.VirtualMachineInstance) {
		v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "uid-kubevirt-evacuation-x", SourceNode: thisNode, TargetNode: "node-b"}
	})
	want := &MigrationStatus{Name: "kubevirt-evacuation-x", Phase: "Scheduled", TargetNode: "node-b"}
	got, lists = look(3)
	check("handed over", got, lists, want, "migration kubevirt-evacuation-x Scheduled to node-b", 4)
	// Started: the VMI says so; no list, however many syncs and however long.
	setVMI(func(v *kubevirtv1.VirtualMachineInstance) { v.Status.MigrationState.StartTimestamp = ptrTime(t0) })
	f.clock.Step(time.Hour)
	got, lists = look(20)
	want.Phase, want.PhaseSince = "Running", ptrTime(t0)
	check("running", got, lists, want, "migration kubevirt-evacuation-x Running to node-b", 4)

	raw, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(raw), `"migration":{"name":"kubevirt-evacuation-x","phase":"Running","targetNode":"node-b","phaseSince":"2030-01-02T03:00:00Z"}`) {
		t.Errorf("JSON %s has no migration", raw)
	}
}

// The migrating VMs of a namespace due for a read in one look are read in one list
// (their kubevirt.io/vmi-name labels in one selector), one per namespace: while
// KubeVirt holds a node's migrations back two at a time, a hundred VMs waiting make a
// list or two every migrationRelist, not a hundred. Each VM still shows its own.
func TestSyncStatusListsTheMigrationsOfANamespaceInOneRequest(t *testing.T) {
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	live := kubevirtv1.EvictionStrategyLiveMigrate
	var objs []runtime.Object
	for _, key := range []string{"ns/a", "ns/b", "ns/c", "other/d", "other/e"} {
		ns, name, _ := strings.Cut(key, "/")
		vmi := newVMI(name, thisNode, kubevirtv1.Running)
		vmi.Namespace, vmi.UID = ns, types.UID("uid-"+key)
		vmi.Spec.EvictionStrategy = &live
		vmi.Status.EvacuationNodeName = thisNode
		pod := launcherPod("virt-launcher-"+name, string(vmi.UID), thisNode, corev1.PodRunning)
		pod.Namespace = ns
		objs = append(objs, vmi, pod)
	}
	f := newFixture(t, n, objs...)
	pending := func(ns, vmi string) kubevirtv1.VirtualMachineInstanceMigration {
		m := testMigration("kubevirt-evacuation-"+vmi, kubevirtv1.MigrationPending, t0)
		m.Namespace, m.Spec.VMIName = ns, vmi
		return m
	}
	f.mu.Lock()
	f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/b": {pending("ns", "b")}, "other/e": {pending("other", "e")}}
	f.mu.Unlock()
	look := func(step string, wantLists []string, wantPhase map[string]string) {
		t.Helper()
		f.mu.Lock()
		f.migrationListed = nil
		f.mu.Unlock()
		for range 3 {
			if _, err := f.sync(); err != nil {
				t.Fatal(err)
			}
		}
		f.mu.Lock()
		got := slices.Sorted(slices.Values(f.migrationListed))
		f.mu.Unlock()
		if !slices.Equal(got, wantLists) {
			t.Errorf("%s: the migrations were listed as %q, want %q", step, got, wantLists)
		}
		st, _ := f.engine.Status()
		for _, vs := range st.VMs {
			phase := ""
			if vs.Migration != nil {
				phase = vs.Migration.Phase
			}
			if vs.State != StateMigrating || phase != wantPhase[vs.Namespace+"/"+vs.Name] {
				t.Errorf("%s: %s/%s %s, migration phase %q; want migrating, %q", step, vs.Namespace, vs.Name, vs.State, phase, wantPhase[vs.Namespace+"/"+vs.Name])
			}
		}
	}
	look("first look", []string{"ns: a,b,c", "other: d,e"}, map[string]string{"ns/b": "Pending", "other/e": "Pending"})
	look("not due", nil, map[string]string{"ns/b": "Pending", "other/e": "Pending"})
	f.mu.Lock()
	f.migrations["ns/a"] = []kubevirtv1.VirtualMachineInstanceMigration{pending("ns", "a")}
	f.mu.Unlock()
	f.clock.Step(migrationRelist)
	look("after migrationRelist", []string{"ns: a,b,c", "other: d,e"}, map[string]string{"ns/a": "Pending", "ns/b": "Pending", "other/e": "Pending"})
}

// A migration KubeVirt holds back (Pending: the node has its two outbound migrations
// running) has no target pod: its VM's migrations are read again every migrationRelist,
// its target pods are not; they are once the migration is Scheduling.
func TestSyncStatusReadsTargetPodsFromScheduling(t *testing.T) {
	f, _ := evacuatingVM(t)
	f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationPending, t0)}}
	targetLists := func() int { f.mu.Lock(); defer f.mu.Unlock(); return f.targetPodLists }
	for i := range 3 {
		if got := f.lookAtTheOneVM(); got.Migration == nil || got.Migration.Phase != "Pending" {
			t.Fatalf("look %d: %+v, want the Pending migration named", i, got)
		}
		f.clock.Step(migrationRelist)
	}
	if n := targetLists(); n != 0 {
		t.Errorf("%d lists of the target pods of a Pending migration, want none", n)
	}
	f.mu.Lock()
	f.migrations["ns/vm"] = []kubevirtv1.VirtualMachineInstanceMigration{testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationScheduling, t0)}
	f.mu.Unlock()
	f.lookAtTheOneVM()
	if n := targetLists(); n != 1 {
		t.Errorf("%d lists of the target pods of a Scheduling migration, want 1", n)
	}
}

// A migration whose target pod the scheduler finds no node for (PodScheduled False,
// Unschedulable) cannot finish until the cluster changes: the VM is reported blocked,
// with the migration and the scheduler's message, and a Warning says so once; once
// the target pod is scheduled it is reported migrating again. The VM is not acted on
// otherwise: a blocked LiveMigrate VM is never shut down.
func TestSyncStatusBlockedWhileTheTargetPodCannotBeScheduled(t *testing.T) {
	f, vmi := evacuatingVM(t)
	f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationScheduling, t0)}}
	const why = "0/3 nodes are available: 1 node(s) had untolerated taint {kubevirt.io/drain: }, 2 node(s) didn't match Pod's node affinity/selector."
	target := launcherPod("virt-launcher-vm-target", string(vmi.UID), "", corev1.PodPending)
	target.Labels[kubevirtv1.MigrationJobLabel] = "uid-kubevirt-evacuation-x"
	target.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: corev1.PodReasonUnschedulable, Message: why}}
	if _, err := f.kube.CoreV1().Pods("ns").Create(context.Background(), target, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	look := func() VMStatus { t.Helper(); return f.lookAtTheOneVM() }

	got := look()
	wantDetail := "migration kubevirt-evacuation-x Scheduling: its target pod cannot be scheduled: " + why
	if got.State != StateBlocked || got.Detail != wantDetail || got.Migration == nil || got.Migration.Name != "kubevirt-evacuation-x" {
		t.Errorf("state %s, detail %q, migration %+v; want blocked, %q, the migration named", got.State, got.Detail, got.Migration, wantDetail)
	}
	f.clock.Step(migrationRelist)
	look()
	var warnings int
	for _, e := range f.events() {
		if strings.HasPrefix(e, "Warning "+ReasonBlocked) && strings.Contains(e, "cannot be scheduled") {
			warnings++
		}
	}
	if warnings != 1 {
		t.Errorf("%d Warning %s events about the target pod over two looks: want one", warnings, ReasonBlocked)
	}
	f.noEvictions("a LiveMigrate VM whose migration waits is not acted on again")

	// The scheduler found a node: migrating again once the pod is read again.
	target.Status.Conditions = nil
	target.Spec.NodeName = "node-b"
	if _, err := f.kube.CoreV1().Pods("ns").Update(context.Background(), target, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.clock.Step(migrationRelist)
	if got := look(); got.State != StateMigrating || got.Detail != "migration kubevirt-evacuation-x Scheduling" {
		t.Errorf("state %s, detail %q once the target pod is scheduled; want migrating, the migration named", got.State, got.Detail)
	}
}

// A migration that stays in a phase only the target node's virt-handler moves on
// (here PreparingTarget: the target's virt-handler does not prepare it) is reported
// blocked once it has been there MigrationStallTimeout, counted from KubeVirt's record
// of the phase, with a Warning once; a migration Running as long is not (virt-handler
// aborts a transfer that makes no progress). When the phase moves on, the VM is
// migrating again. The VM is never acted on otherwise.
func TestSyncStatusBlockedWhileTheMigrationStalls(t *testing.T) {
	f, vmi := evacuatingVM(t)
	// The phase began a minute before the agent looked.
	stuck := withTransitions(testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationPreparingTarget, f.clock.Now().Add(-3*time.Minute)),
		kubevirtv1.MigrationPending, kubevirtv1.MigrationScheduling, kubevirtv1.MigrationPreparingTarget)
	setMigration := func(m kubevirtv1.VirtualMachineInstanceMigration) {
		f.mu.Lock()
		defer f.mu.Unlock()
		f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {m}}
	}
	setMigration(stuck)
	v := vmi.DeepCopy()
	v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: stuck.UID, SourceNode: thisNode, TargetNode: "node-b", TargetPod: "virt-launcher-vm-target"}
	if err := f.vmis.Update(v); err != nil {
		t.Fatal(err)
	}
	look := func() VMStatus { t.Helper(); return f.lookAtTheOneVM() }
	warnings := func() int {
		n := 0
		for _, e := range f.events() {
			if strings.HasPrefix(e, "Warning "+ReasonBlocked) && strings.Contains(e, "has been PreparingTarget") {
				n++
			}
		}
		return n
	}

	if got := look(); got.State != StateMigrating || got.Detail != "migration kubevirt-evacuation-x PreparingTarget to node-b" {
		t.Errorf("a minute in PreparingTarget: state %s, detail %q; want migrating", got.State, got.Detail)
	}
	f.clock.Step(DefaultMigrationStallTimeout - time.Minute - time.Second)
	if got := look(); got.State != StateMigrating {
		t.Errorf("a second short of the stall timeout: state %s, detail %q; want migrating", got.State, got.Detail)
	}
	f.clock.Step(time.Second)
	got := look()
	wantDetail := "migration kubevirt-evacuation-x PreparingTarget to node-b: it has been PreparingTarget for 5m0s (since 2030-01-02T02:59:00Z): the virt-handler of the target node node-b has not moved it on"
	if got.State != StateBlocked || got.Detail != wantDetail || got.Migration == nil || got.Migration.Name != stuck.Name {
		t.Errorf("at the stall timeout: state %s, detail %q, migration %+v; want blocked, %q", got.State, got.Detail, got.Migration, wantDetail)
	}
	f.clock.Step(time.Minute)
	look()
	if n := warnings(); n != 1 {
		t.Errorf("%d Warning %s events about the stalled migration over two looks: want one", n, ReasonBlocked)
	}
	f.noEvictions("a LiveMigrate VM whose migration stalls is not acted on again")

	// The target's virt-handler prepares it: TargetReady, a new phase, migrating again.
	ready := withTransitions(stuck, kubevirtv1.MigrationTargetReady)
	ready.Status.Phase = kubevirtv1.MigrationTargetReady
	ready.Status.PhaseTransitionTimestamps[len(ready.Status.PhaseTransitionTimestamps)-1].PhaseTransitionTimestamp = metav1.NewTime(f.clock.Now())
	setMigration(ready)
	v.Status.MigrationState.TargetNodeAddress = "10.0.0.2"
	if err := f.vmis.Update(v); err != nil {
		t.Fatal(err)
	}
	if got := look(); got.State != StateMigrating || got.Detail != "migration kubevirt-evacuation-x TargetReady to node-b" {
		t.Errorf("once prepared: state %s, detail %q; want migrating", got.State, got.Detail)
	}

	// Running far longer than the stall timeout: still migrating.
	v.Status.MigrationState.StartTimestamp = ptrTime(f.clock.Now())
	if err := f.vmis.Update(v); err != nil {
		t.Fatal(err)
	}
	f.clock.Step(time.Hour)
	if got := look(); got.State != StateMigrating || got.Migration == nil || got.Migration.Phase != "Running" {
		t.Errorf("an hour Running: state %s, detail %q; want migrating", got.State, got.Detail)
	}
}

// A migration is reported stalled only from a list read once the stall timeout had
// passed: the list read before may be one phase behind (the migration controller
// writes PreparingTarget just after the VMI change the list was read for, and nothing
// on the VMI changes with it). A CI run showed a VM blocked "Scheduled for 11s" while
// KubeVirt had been in PreparingTarget for ten seconds.
func TestSyncStatusStalledOnlyFromAReadAfterTheTimeout(t *testing.T) {
	f, vmi := evacuatingVM(t)
	scheduledAt := f.clock.Now().Add(-DefaultMigrationStallTimeout + 5*time.Second)
	m := testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationScheduled, scheduledAt.Add(-time.Minute))
	at := func(p kubevirtv1.VirtualMachineInstanceMigrationPhase, when time.Time) {
		m.Status.Phase = p
		m.Status.PhaseTransitionTimestamps = append(m.Status.PhaseTransitionTimestamps, kubevirtv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{Phase: p, PhaseTransitionTimestamp: metav1.NewTime(when)})
		f.mu.Lock()
		defer f.mu.Unlock()
		f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {*m.DeepCopy()}}
	}
	at(kubevirtv1.MigrationScheduled, scheduledAt)
	v := vmi.DeepCopy()
	v.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: m.UID, SourceNode: thisNode, TargetNode: "node-b", TargetPod: "virt-launcher-vm-target"}
	if err := f.vmis.Update(v); err != nil {
		t.Fatal(err)
	}
	if got := f.lookAtTheOneVM(); got.State != StateMigrating || got.Migration == nil || got.Migration.Phase != "Scheduled" {
		t.Fatalf("Scheduled for 4m55s: state %s, detail %q; want migrating", got.State, got.Detail)
	}
	// KubeVirt moves it on a second later; the VMI shows nothing of it.
	at(kubevirtv1.MigrationPreparingTarget, f.clock.Now().Add(time.Second))
	f.clock.Step(5 * time.Second) // Scheduled would have lasted the stall timeout
	if got := f.lookAtTheOneVM(); got.State != StateMigrating || got.Detail != "migration kubevirt-evacuation-x PreparingTarget to node-b" {
		t.Errorf("at the stall timeout of a phase it left 4 s ago: state %s, detail %q; want migrating in PreparingTarget", got.State, got.Detail)
	}
	for _, e := range f.events() {
		if strings.HasPrefix(e, "Warning "+ReasonBlocked) {
			t.Errorf("event %q about a migration that did not stall", e)
		}
	}
}

// lookAtTheOneVM looks at the node three times and returns the status of its one VM.
func (f *fixture) lookAtTheOneVM() VMStatus {
	f.t.Helper()
	for range 3 {
		if _, err := f.sync(); err != nil {
			f.t.Fatal(err)
		}
	}
	st, _ := f.engine.Status()
	if len(st.VMs) != 1 {
		f.t.Fatalf("status %+v", st)
	}
	return st.VMs[0]
}
