package agent

import (
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

const (
	thisNode  = "node-a"
	otherNode = "node-b"
)

func newVMI(name, node string, phase kubevirtv1.VirtualMachineInstancePhase) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{}
	vmi.Namespace, vmi.Name, vmi.UID = "ns", name, types.UID("uid-"+name)
	vmi.Status.NodeName, vmi.Status.Phase = node, phase
	return vmi
}

// launcherPod is a virt-launcher pod of the VMI with UID vmiUID, scheduled on node.
func launcherPod(name, vmiUID, node string, phase corev1.PodPhase) *corev1.Pod {
	p := &corev1.Pod{}
	p.Namespace, p.Name = "ns", name
	p.Labels = map[string]string{kubevirtv1.AppLabel: "virt-launcher", kubevirtv1.CreatedByLabel: vmiUID}
	p.Spec.NodeName, p.Status.Phase = node, phase
	return p
}

// targetPod is the target pod of a migration of the VMI with UID vmiUID.
func targetPod(name, vmiUID, domain, node string) *corev1.Pod {
	p := launcherPod(name, vmiUID, node, corev1.PodRunning)
	p.Labels[kubevirtv1.MigrationJobLabel] = "migration-uid"
	if domain != "" {
		p.Annotations = map[string]string{kubevirtv1.DomainAnnotation: domain}
	}
	return p
}

func deleting[T metav1.Object](obj T) T {
	now := metav1.NewTime(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	obj.SetDeletionTimestamp(&now)
	return obj
}

// vmView is a vm as a test compares it: its key, its VMI's name ("" for none) and
// its pods' names.
type vmView struct {
	Key  string
	VMI  string
	Pods []string
}

func viewOf(vms []*vm) []vmView {
	out := []vmView{}
	for _, v := range vms {
		w := vmView{Key: v.key}
		if v.vmi != nil {
			w.VMI = v.vmi.Name
		}
		for _, p := range v.pods {
			w.Pods = append(w.Pods, p.Name)
		}
		out = append(out, w)
	}
	return out
}

func TestVMsOnNode(t *testing.T) {
	tests := []struct {
		name string
		vmis []*kubevirtv1.VirtualMachineInstance
		pods []*corev1.Pod
		want []vmView
	}{
		{
			name: "nothing on the node",
			want: []vmView{},
		},
		{
			name: "VMIs on other nodes and in a final phase are excluded",
			vmis: []*kubevirtv1.VirtualMachineInstance{
				newVMI("here", thisNode, kubevirtv1.Running),
				newVMI("elsewhere", otherNode, kubevirtv1.Running),
				newVMI("unscheduled", "", kubevirtv1.Pending),
				newVMI("succeeded", thisNode, kubevirtv1.Succeeded),
				newVMI("failed", thisNode, kubevirtv1.Failed),
				newVMI("scheduling", thisNode, kubevirtv1.Scheduled),
			},
			want: []vmView{{Key: "ns/here", VMI: "here"}, {Key: "ns/scheduling", VMI: "scheduling"}},
		},
		{
			name: "pods grouped under their VMI by kubevirt.io/created-by",
			vmis: []*kubevirtv1.VirtualMachineInstance{
				newVMI("a", thisNode, kubevirtv1.Running),
				newVMI("b", thisNode, kubevirtv1.Running),
			},
			pods: []*corev1.Pod{
				launcherPod("launcher-b", "uid-b", thisNode, corev1.PodRunning),
				launcherPod("launcher-a", "uid-a", thisNode, corev1.PodRunning),
				launcherPod("launcher-a-new", "uid-a", thisNode, corev1.PodPending),
			},
			want: []vmView{
				{Key: "ns/a", VMI: "a", Pods: []string{"launcher-a", "launcher-a-new"}},
				{Key: "ns/b", VMI: "b", Pods: []string{"launcher-b"}},
			},
		},
		{
			name: "Succeeded and Failed pods are excluded",
			vmis: []*kubevirtv1.VirtualMachineInstance{newVMI("a", thisNode, kubevirtv1.Running)},
			pods: []*corev1.Pod{
				launcherPod("old-succeeded", "uid-a", thisNode, corev1.PodSucceeded),
				launcherPod("old-failed", "uid-a", thisNode, corev1.PodFailed),
				launcherPod("launcher-a", "uid-a", thisNode, corev1.PodRunning),
				launcherPod("gone-succeeded", "uid-gone", thisNode, corev1.PodSucceeded),
				launcherPod("gone-failed", "uid-gone", thisNode, corev1.PodFailed),
			},
			want: []vmView{{Key: "ns/a", VMI: "a", Pods: []string{"launcher-a"}}},
		},
		{
			name: "a lone target pod of an incoming migration is listed on its own, named after its domain",
			vmis: []*kubevirtv1.VirtualMachineInstance{
				newVMI("a", thisNode, kubevirtv1.Running),
				newVMI("incoming", otherNode, kubevirtv1.Running),
			},
			pods: []*corev1.Pod{
				launcherPod("launcher-a", "uid-a", thisNode, corev1.PodRunning),
				targetPod("launcher-incoming-target", "uid-incoming", "incoming", thisNode),
			},
			want: []vmView{
				{Key: "ns/a", VMI: "a", Pods: []string{"launcher-a"}},
				{Key: "ns/incoming", Pods: []string{"launcher-incoming-target"}},
			},
		},
		{
			name: "a lone pod without a domain annotation is named after the pod",
			pods: []*corev1.Pod{targetPod("launcher-x", "uid-x", "", thisNode)},
			want: []vmView{{Key: "ns/launcher-x", Pods: []string{"launcher-x"}}},
		},
		{
			name: "lone pods of one VMI are grouped together",
			pods: []*corev1.Pod{
				targetPod("target-1", "uid-x", "x", thisNode),
				targetPod("target-2", "uid-x", "x", thisNode),
				targetPod("target-y", "uid-y", "y", thisNode),
			},
			want: []vmView{
				{Key: "ns/x", Pods: []string{"target-1", "target-2"}},
				{Key: "ns/y", Pods: []string{"target-y"}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := viewOf(vmsOnNode(thisNode, tt.vmis, tt.pods))
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("vmsOnNode() =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

func TestSourcePod(t *testing.T) {
	vmi := newVMI("a", thisNode, kubevirtv1.Running)
	migrating := func(completed, failed bool) *kubevirtv1.VirtualMachineInstance {
		m := newVMI("a", thisNode, kubevirtv1.Running)
		m.Status.MigrationState = &kubevirtv1.VirtualMachineInstanceMigrationState{
			MigrationUID: "migration-uid", TargetPod: "target", Completed: completed, Failed: failed,
		}
		return m
	}
	at := func(p *corev1.Pod, sec int) *corev1.Pod {
		p.CreationTimestamp = metav1.NewTime(time.Date(2030, 1, 1, 0, 0, sec, 0, time.UTC))
		return p
	}
	source := launcherPod("source", "uid-a", thisNode, corev1.PodRunning)
	target := targetPod("target", "uid-a", "a", thisNode)
	elsewhere := launcherPod("elsewhere", "uid-a", otherNode, corev1.PodRunning)
	old := at(launcherPod("old", "uid-a", thisNode, corev1.PodRunning), 1)
	newer := at(targetPod("newer", "uid-a", "a", thisNode), 2)
	tests := []struct {
		name string
		v    *vm
		want *corev1.Pod
	}{
		{"no pods", &vm{vmi: vmi}, nil},
		{"the source pod", &vm{vmi: vmi, pods: []*corev1.Pod{source}}, source},
		{"never the target pod of an unfinished migration, whatever the order", &vm{vmi: migrating(false, false), pods: []*corev1.Pod{target, source}}, source},
		{"only the target pod of an unfinished migration: none", &vm{vmi: migrating(false, false), pods: []*corev1.Pod{target}}, nil},
		{"the pod a finished migration brought in runs the VM, its label kept", &vm{vmi: migrating(true, false), pods: []*corev1.Pod{target}}, target},
		{"the target pod runs the VM from the migration's endTimestamp on, before it is marked completed", &vm{vmi: func() *kubevirtv1.VirtualMachineInstance {
			m := migrating(false, false)
			m.Status.MigrationState.EndTimestamp = ptrTime(time.Date(2030, 1, 1, 0, 1, 0, 0, time.UTC))
			return m
		}(), pods: []*corev1.Pod{target}}, target},
		{"a pod with the label and no migration under way runs the VM", &vm{vmi: vmi, pods: []*corev1.Pod{target}}, target},
		{"a failed migration's target on the VMI's node is not taken for unfinished", &vm{vmi: migrating(false, true), pods: []*corev1.Pod{target}}, target},
		{"the newest pod on the VMI's node, as KubeVirt's CurrentVMIPod", &vm{vmi: vmi, pods: []*corev1.Pod{newer, old}}, newer},
		{"a pod on another node than the VMI: none", &vm{vmi: vmi, pods: []*corev1.Pod{elsewhere}}, nil},
		{"a lone target pod: none", &vm{pods: []*corev1.Pod{target}}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.v.sourcePod()
			if got != tt.want {
				t.Errorf("sourcePod() = %v, want %v", podName(got), podName(tt.want))
			}
		})
	}
}

func ptrTime(t time.Time) *metav1.Time {
	mt := metav1.NewTime(t)
	return &mt
}

func podName(p *corev1.Pod) string {
	if p == nil {
		return "<nil>"
	}
	return p.Name
}

func TestObserve(t *testing.T) {
	started := metav1.NewTime(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	running := func(mutate ...func(*kubevirtv1.VirtualMachineInstance)) *kubevirtv1.VirtualMachineInstance {
		vmi := newVMI("a", thisNode, kubevirtv1.Running)
		for _, m := range mutate {
			m(vmi)
		}
		return vmi
	}
	migrationState := func(ms kubevirtv1.VirtualMachineInstanceMigrationState) func(*kubevirtv1.VirtualMachineInstance) {
		return func(vmi *kubevirtv1.VirtualMachineInstance) { vmi.Status.MigrationState = &ms }
	}
	evacuating := func(node string) func(*kubevirtv1.VirtualMachineInstance) {
		return func(vmi *kubevirtv1.VirtualMachineInstance) { vmi.Status.EvacuationNodeName = node }
	}
	source := func() *corev1.Pod { return launcherPod("source", "uid-a", thisNode, corev1.PodRunning) }
	migrate := Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionMigrate}
	shutdown := Decision{Strategy: kubevirtv1.EvictionStrategyNone, Action: ActionShutdown}
	external := Decision{Strategy: kubevirtv1.EvictionStrategyExternal, Action: ActionExternal}
	blocked := Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionNone, Reason: "not live-migratable: DisksNotLiveMigratable"}

	tests := []struct {
		name       string
		v          *vm
		d          Decision
		draining   bool
		want       VMState
		detailHas  string
		wantDetail bool // false: the detail must be empty
	}{
		{
			name: "running when not draining",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: migrate,
			want: StateRunning,
		},
		{
			name: "running when not draining, even if a drain would be blocked",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: blocked,
			want: StateRunning,
		},
		{
			name: "pending while draining and nothing happened yet",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "pending shutdown while draining",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: shutdown, draining: true,
			want: StatePending,
		},
		{
			name: "blocked while draining, with the decision's reason",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: blocked, draining: true,
			want: StateBlocked, detailHas: "DisksNotLiveMigratable", wantDetail: true,
		},
		{
			name: "migrating from status.migrationState, with the target node",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: thisNode, TargetNode: otherNode, StartTimestamp: &started,
			})), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StateMigrating, detailHas: otherNode, wantDetail: true,
		},
		{
			name: "migrating is seen when not draining too",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: thisNode, TargetNode: otherNode,
			})), pods: []*corev1.Pod{source()}}, d: migrate,
			want: StateMigrating, detailHas: otherNode, wantDetail: true,
		},
		{
			name: "a completed migration is not migrating",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: thisNode, TargetNode: otherNode, Completed: true,
			})), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "a failed migration is not migrating",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: thisNode, TargetNode: otherNode, Failed: true,
			})), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "an incoming migration's state (source elsewhere) is not migrating away",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: otherNode, TargetNode: thisNode,
			})), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "evacuation requested via status.evacuationNodeName",
			v:    &vm{vmi: running(evacuating(thisNode)), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StateMigrating, detailHas: "evacuation requested", wantDetail: true,
		},
		{
			name: "evacuation requested after a failed migration says KubeVirt retries it, with the reason",
			v: &vm{vmi: running(evacuating(thisNode), migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{
				SourceNode: thisNode, TargetNode: otherNode, Failed: true, FailureReason: "target pod crashed",
			})), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StateMigrating, detailHas: "retries it (target pod crashed)", wantDetail: true,
		},
		{
			name: "an evacuation of another node is not this node's",
			v:    &vm{vmi: running(evacuating(otherNode)), pods: []*corev1.Pod{source()}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "External waits once KubeVirt marked it for evacuation",
			v:    &vm{vmi: running(evacuating(thisNode)), pods: []*corev1.Pod{source()}}, d: external, draining: true,
			want: StateWaitingExternal, detailHas: "external controller", wantDetail: true,
		},
		{
			name: "External is pending until KubeVirt marks it",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{source()}}, d: external, draining: true,
			want: StatePending,
		},
		{
			name: "shutting down when the source pod has a deletionTimestamp",
			v:    &vm{vmi: running(), pods: []*corev1.Pod{deleting(source())}}, d: shutdown, draining: true,
			want: StateShuttingDown, detailHas: "shutting down", wantDetail: true,
		},
		{
			name: "shutting down wins over an evacuation mark",
			v:    &vm{vmi: running(evacuating(thisNode)), pods: []*corev1.Pod{deleting(source())}}, d: shutdown, draining: true,
			want: StateShuttingDown, detailHas: "shutting down", wantDetail: true,
		},
		{
			name: "shutting down when the VMI is being deleted",
			v:    &vm{vmi: deleting(running()), pods: []*corev1.Pod{source()}}, d: shutdown, draining: true,
			want: StateShuttingDown, detailHas: "shutting down", wantDetail: true,
		},
		{
			name: "a terminating migration target pod is not the VM shutting down",
			v: &vm{vmi: running(migrationState(kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "migration-uid"})), pods: []*corev1.Pod{
				deleting(targetPod("target", "uid-a", "a", thisNode)), source(),
			}}, d: migrate, draining: true,
			want: StatePending,
		},
		{
			name: "a lone target pod is an incoming migration",
			v:    &vm{key: "ns/x", pods: []*corev1.Pod{targetPod("target-x", "uid-x", "x", thisNode)}}, d: decide(&vm{}, testConfig()), draining: true,
			want: StateIncoming, detailHas: "target-x", wantDetail: true,
		},
		{
			name: "a lone pod that is no migration's target is a VM being started",
			v:    &vm{key: "ns/x", pods: []*corev1.Pod{launcherPod("virt-launcher-x", "uid-x", thisNode, corev1.PodPending)}}, d: decide(&vm{}, testConfig()), draining: true,
			want: StateStarting, detailHas: "virt-launcher-x of a VM being started here", wantDetail: true,
		},
		{
			name: "a lone terminating pod is shutting down",
			v:    &vm{key: "ns/x", pods: []*corev1.Pod{deleting(targetPod("target-x", "uid-x", "x", thisNode))}}, d: decide(&vm{}, testConfig()), draining: true,
			want: StateShuttingDown, detailHas: "target-x", wantDetail: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, detail := observe(tt.v, tt.d, thisNode, tt.draining)
			if state != tt.want {
				t.Fatalf("observe() state = %q (%q), want %q", state, detail, tt.want)
			}
			if tt.wantDetail && !strings.Contains(detail, tt.detailHas) {
				t.Errorf("observe() detail = %q, want it to contain %q", detail, tt.detailHas)
			}
			if !tt.wantDetail && detail != "" {
				t.Errorf("observe() detail = %q, want none", detail)
			}
		})
	}
}

func TestHasUnfinishedMigration(t *testing.T) {
	started := metav1.NewTime(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC))
	migration := func(name string, phase kubevirtv1.VirtualMachineInstanceMigrationPhase) kubevirtv1.VirtualMachineInstanceMigration {
		m := kubevirtv1.VirtualMachineInstanceMigration{}
		m.Namespace, m.Name, m.Status.Phase = "ns", name, phase
		return m
	}
	withState := func(ms *kubevirtv1.VirtualMachineInstanceMigrationState) *kubevirtv1.VirtualMachineInstance {
		vmi := newVMI("a", thisNode, kubevirtv1.Running)
		vmi.Status.MigrationState = ms
		return vmi
	}
	tests := []struct {
		name       string
		vmi        *kubevirtv1.VirtualMachineInstance
		migrations []kubevirtv1.VirtualMachineInstanceMigration
		wantName   string
		want       bool
	}{
		{name: "none", vmi: withState(nil)},
		{
			name:       "only finished migration objects",
			vmi:        withState(nil),
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{migration("ok", kubevirtv1.MigrationSucceeded), migration("ko", kubevirtv1.MigrationFailed)},
		},
		{
			name:       "a running migration object",
			vmi:        withState(nil),
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{migration("ok", kubevirtv1.MigrationSucceeded), migration("live", kubevirtv1.MigrationRunning)},
			wantName:   "live", want: true,
		},
		{
			name:       "a migration object without a phase yet",
			vmi:        withState(nil),
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{migration("new", "")},
			wantName:   "new", want: true,
		},
		{
			name:       "a migration object being deleted does not count",
			vmi:        withState(nil),
			migrations: []kubevirtv1.VirtualMachineInstanceMigration{*deleting(ptr(migration("going", kubevirtv1.MigrationRunning)))},
		},
		{
			name:     "the VMI status shows a started migration the objects do not (lagging cache)",
			vmi:      withState(&kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "m-uid", StartTimestamp: &started}),
			wantName: "m-uid", want: true,
		},
		{
			name: "a completed migration in the status",
			vmi:  withState(&kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "m-uid", StartTimestamp: &started, Completed: true}),
		},
		{
			name: "a failed migration in the status",
			vmi:  withState(&kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "m-uid", StartTimestamp: &started, Failed: true}),
		},
		{
			name: "a status migration that has not started",
			vmi:  withState(&kubevirtv1.VirtualMachineInstanceMigrationState{MigrationUID: "m-uid"}),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name, got := hasUnfinishedMigration(tt.vmi, tt.migrations)
			if got != tt.want || name != tt.wantName {
				t.Errorf("hasUnfinishedMigration() = %q, %v; want %q, %v", name, got, tt.wantName, tt.want)
			}
		})
	}
}

func TestSinceKeepsTheTimeOfTheState(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	s := since{}
	if got := s.observe("ns/a", StatePending, t0); !got.Equal(t0) {
		t.Fatalf("first observation = %v, want %v", got, t0)
	}
	if got := s.observe("ns/a", StatePending, t0.Add(time.Minute)); !got.Equal(t0) {
		t.Errorf("same state later = %v, want the time it entered it, %v", got, t0)
	}
	if got := s.observe("ns/a", StateMigrating, t0.Add(2*time.Minute)); !got.Equal(t0.Add(2 * time.Minute)) {
		t.Errorf("new state = %v, want %v", got, t0.Add(2*time.Minute))
	}
}

func testConfig() nodeinfo.Config {
	return nodeinfo.Config{DrainTaintKey: nodeinfo.DefaultDrainTaintKey, DrainTaintKeySource: nodeinfo.SourceDefault}
}

func ptr[T any](v T) *T { return &v }
