package drainctl

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

const thisNode = "node-a"

func testNode(taints ...corev1.Taint) *corev1.Node {
	n := &corev1.Node{}
	n.Name, n.Spec.Taints = thisNode, taints
	return n
}

func runningVMI(name string, strategy kubevirtv1.EvictionStrategy) (*kubevirtv1.VirtualMachineInstance, *corev1.Pod) {
	vmi := &kubevirtv1.VirtualMachineInstance{}
	vmi.Namespace, vmi.Name, vmi.UID = "ns", name, types.UID("uid-"+name)
	vmi.Spec.EvictionStrategy = &strategy
	vmi.Status.Phase, vmi.Status.NodeName = kubevirtv1.Running, thisNode
	vmi.Status.Conditions = []kubevirtv1.VirtualMachineInstanceCondition{{Type: kubevirtv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionTrue}}
	pod := &corev1.Pod{}
	pod.Namespace, pod.Name = "ns", "virt-launcher-"+name
	pod.Labels = map[string]string{kubevirtv1.AppLabel: "virt-launcher", kubevirtv1.CreatedByLabel: string(vmi.UID)}
	pod.Spec.NodeName, pod.Status.Phase = thisNode, corev1.PodRunning
	return vmi, pod
}

func TestNewViewByTheAgentsRules(t *testing.T) {
	cfg := nodeinfo.Config{DrainTaintKey: "example.com/drain", DrainTaintKeySource: nodeinfo.SourceFlag}
	web, webPod := runningVMI("web", kubevirtv1.EvictionStrategyLiveMigrate)
	batch, batchPod := runningVMI("batch", kubevirtv1.EvictionStrategyNone)
	vmis, pods := []*kubevirtv1.VirtualMachineInstance{web, batch}, []*corev1.Pod{webPod, batchPod}

	for _, tt := range []struct {
		name      string
		taints    []corev1.Taint
		draining  bool
		wantState agent.VMState
	}{
		{name: "no taint", wantState: agent.StateRunning},
		{name: "the drain taint", taints: []corev1.Taint{{Key: "example.com/drain", Effect: corev1.TaintEffectNoSchedule}}, draining: true, wantState: agent.StatePending},
		{name: "the key with another effect is no drain", taints: []corev1.Taint{{Key: "example.com/drain", Effect: corev1.TaintEffectPreferNoSchedule}}, wantState: agent.StateRunning},
		{name: "another key is no drain", taints: []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}, wantState: agent.StateRunning},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := testNode(tt.taints...)
			n.Spec.Unschedulable = true
			n.Annotations = map[string]string{agent.AnnotationState: "idle: 2 VMs on the node"}
			v := newView(n, cfg, vmis, pods)
			if v.Draining != tt.draining || !v.Cordoned || v.TaintKey != cfg.DrainTaintKey || v.Agent != "idle: 2 VMs on the node" {
				t.Errorf("view %+v", v)
			}
			if len(v.VMs) != 2 || v.Safe() {
				t.Fatalf("VMs %+v, safe %v", v.VMs, v.Safe())
			}
			for _, vm := range v.VMs {
				if vm.State != tt.wantState {
					t.Errorf("%s: state %s, want %s", vm.Name, vm.State, tt.wantState)
				}
			}
		})
	}
	if v := newView(testNode(), cfg, nil, nil); !v.Safe() || v.VMs == nil {
		t.Errorf("an empty node: safe %v, VMs %v (want [] for JSON)", v.Safe(), v.VMs)
	}
	if v := (NodeView{VMs: []agent.VMStatus{}, PodsLeft: -1}); v.Safe() {
		t.Error("a node whose other pods cannot be listed is safe")
	}
}

// The drain taint the agent added for a host shutdown is a drain while that shutdown
// is pending and none once it was cancelled (it stays on until the node is given
// back), as the agent on the node reads it; someone else's taint is a drain.
func TestNewViewReadsTheAgentsOwnTaintAsTheAgentDoes(t *testing.T) {
	cfg := nodeinfo.Config{DrainTaintKey: nodeinfo.DefaultDrainTaintKey}
	drainTaint := corev1.Taint{Key: cfg.DrainTaintKey, Effect: corev1.TaintEffectNoSchedule}
	const boot = "boot-1"
	started := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	cancelled := started.Add(time.Minute)
	node := func(own *agent.Ownership, sd *agent.ShutdownRecord) *corev1.Node {
		n := testNode(drainTaint)
		n.Spec.Unschedulable = true
		n.Status.NodeInfo.BootID = boot
		n.Annotations = map[string]string{}
		for key, v := range map[string]any{agent.AnnotationOwned: own, agent.AnnotationShutdown: sd} {
			if reflect.ValueOf(v).IsNil() {
				continue
			}
			raw, err := json.Marshal(v)
			if err != nil {
				t.Fatal(err)
			}
			n.Annotations[key] = string(raw)
		}
		return n
	}
	own := &agent.Ownership{TaintKey: cfg.DrainTaintKey, Cordoned: true, BootID: boot, Reason: "shutdown", Since: started}
	for _, tt := range []struct {
		name string
		node *corev1.Node
		want bool
	}{
		{"an operator's taint", node(nil, nil), true},
		{"the agent's taint for a pending shutdown", node(own, &agent.ShutdownRecord{BootID: boot, Started: started}), true},
		{"the agent's taint for a cancelled shutdown", node(own, &agent.ShutdownRecord{BootID: boot, Started: started, Cancelled: &cancelled}), false},
		{"the agent's taint, the shutdown record gone", node(own, nil), false},
		{"the agent's taint for a shutdown of an earlier boot", node(own, &agent.ShutdownRecord{BootID: "boot-0", Started: started}), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if v := newView(tt.node, cfg, nil, nil); v.Draining != tt.want {
				t.Errorf("draining %v, want %v", v.Draining, tt.want)
			}
		})
	}
}

func TestDescribeMigrationNamesTheLiveOne(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	vmi, _ := runningVMI("web", kubevirtv1.EvictionStrategyLiveMigrate)
	vmi.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "live-uid", TargetNode: "node-b"}
	migration := func(name string, phase kubevirtv1.VirtualMachineInstanceMigrationPhase, age time.Duration) kubevirtv1.VirtualMachineInstanceMigration {
		m := kubevirtv1.VirtualMachineInstanceMigration{}
		m.Namespace, m.Name, m.Status.Phase, m.CreationTimestamp = "ns", name, phase, metav1.NewTime(t0.Add(-age))
		m.UID = types.UID(name + "-uid")
		return m
	}
	deleting := migration("deleting", kubevirtv1.MigrationRunning, 0)
	deleting.DeletionTimestamp = &metav1.Time{Time: t0}

	vm := agent.VMStatus{Namespace: "ns", Name: "web", State: agent.StateMigrating, Detail: "to node-b"}
	vm.SetMigration(agent.DescribeMigration(vmi, []kubevirtv1.VirtualMachineInstanceMigration{
		migration("old", kubevirtv1.MigrationFailed, time.Hour), migration("live", kubevirtv1.MigrationRunning, time.Minute), deleting,
	}))
	if want := "migration live Running to node-b"; vm.Detail != want {
		t.Errorf("detail %q, want %q", vm.Detail, want)
	}
	if want := (agent.MigrationStatus{Name: "live", Phase: "Running", TargetNode: "node-b"}); vm.Migration == nil || !reflect.DeepEqual(*vm.Migration, want) {
		t.Errorf("migration %+v, want %+v", vm.Migration, want)
	}
	vm.Detail = "to node-b"
	vm.Migration = nil
	vm.SetMigration(agent.DescribeMigration(vmi, []kubevirtv1.VirtualMachineInstanceMigration{deleting, migration("old", kubevirtv1.MigrationSucceeded, time.Hour)}))
	if vm.Detail != "to node-b" || vm.Migration != nil {
		t.Errorf("with no live migration the detail changed to %q", vm.Detail)
	}
}
