package agent

import (
	"encoding/json"
	"testing"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// checkDecision asserts the SPEC's rules that hold for any VMI: a LiveMigrate VM is
// never shut down; a VM is migrated only when virt-handler said LiveMigratable=True;
// a VM left alone says why; a strategy the agent does not know leaves the VM alone.
func checkDecision(t *testing.T, vmi *kubevirtv1.VirtualMachineInstance, cluster *kubevirtv1.EvictionStrategy, d Decision) {
	t.Helper()
	if d.Strategy != EffectiveStrategy(vmi, cluster) {
		t.Fatalf("decision strategy %q, effective %q", d.Strategy, EffectiveStrategy(vmi, cluster))
	}
	migratable, _ := liveMigratable(vmi)
	switch d.Action {
	case ActionMigrate:
		if !migratable {
			t.Fatalf("migrate without LiveMigratable=True: %+v", vmi.Status.Conditions)
		}
	case ActionShutdown:
		if d.Strategy == kubevirtv1.EvictionStrategyLiveMigrate {
			t.Fatalf("a LiveMigrate VM shut down: %+v", d)
		}
		if d.Strategy == kubevirtv1.EvictionStrategyLiveMigrateIfPossible && migratable {
			t.Fatalf("a migratable LiveMigrateIfPossible VM shut down: %+v", d)
		}
	case ActionNone:
		if d.Reason == "" {
			t.Fatalf("left alone without a reason: %+v", d)
		}
	case ActionExternal:
		if d.Strategy != kubevirtv1.EvictionStrategyExternal {
			t.Fatalf("external for strategy %q", d.Strategy)
		}
	default:
		t.Fatalf("unknown action %q", d.Action)
	}
	switch d.Strategy {
	case kubevirtv1.EvictionStrategyLiveMigrate, kubevirtv1.EvictionStrategyLiveMigrateIfPossible,
		kubevirtv1.EvictionStrategyNone, kubevirtv1.EvictionStrategyExternal:
	default:
		if d.Action != ActionNone {
			t.Fatalf("unknown strategy %q acted on: %+v", d.Strategy, d)
		}
	}
}

// FuzzDecide builds a VMI from fuzzed fields: the VMI's and the cluster's
// evictionStrategy (each set or not, any string), and up to two conditions of any
// type, status, reason and message. Properties: checkDecision.
func FuzzDecide(f *testing.F) {
	f.Add("LiveMigrate", true, "", false, string(kubevirtv1.VirtualMachineInstanceIsMigratable), "True", "", "", "", "")
	f.Add("LiveMigrate", true, "", false, string(kubevirtv1.VirtualMachineInstanceIsMigratable), "False", "DisksNotLiveMigratable", "a PVC is RWO", "", "")
	f.Add("", false, "LiveMigrateIfPossible", true, "", "", "", "", "", "")
	f.Add("", false, "LiveMigrateIfPossible", true, string(kubevirtv1.VirtualMachineInstanceIsMigratable), "Unknown", "", "", "", "")
	f.Add("", false, "", false, "Ready", "True", "", "", "", "")
	f.Add("External", true, "None", true, "", "", "", "", "", "")
	f.Add("", true, "LiveMigrate", true, "", "", "", "", "", "")
	f.Add("livemigrate", true, "", false, string(kubevirtv1.VirtualMachineInstanceIsMigratable), "True", "", "", "", "")
	f.Add("LiveMigrate", true, "", false, string(kubevirtv1.VirtualMachineInstanceIsMigratable), "False", "x", "", string(kubevirtv1.VirtualMachineInstanceIsMigratable), "True")
	f.Fuzz(func(t *testing.T, vmiStrategy string, vmiSet bool, clusterStrategy string, clusterSet bool, type1, status1, reason1, message1, type2, status2 string) {
		vmi := &kubevirtv1.VirtualMachineInstance{}
		vmi.Namespace, vmi.Name = "ns", "vm"
		if vmiSet {
			vmi.Spec.EvictionStrategy = strategy(kubevirtv1.EvictionStrategy(vmiStrategy))
		}
		var cluster *kubevirtv1.EvictionStrategy
		if clusterSet {
			cluster = strategy(kubevirtv1.EvictionStrategy(clusterStrategy))
		}
		if type1 != "" {
			vmi.Status.Conditions = append(vmi.Status.Conditions, kubevirtv1.VirtualMachineInstanceCondition{
				Type: kubevirtv1.VirtualMachineInstanceConditionType(type1), Status: corev1.ConditionStatus(status1), Reason: reason1, Message: message1,
			})
		}
		if type2 != "" {
			vmi.Status.Conditions = append(vmi.Status.Conditions, kubevirtv1.VirtualMachineInstanceCondition{
				Type: kubevirtv1.VirtualMachineInstanceConditionType(type2), Status: corev1.ConditionStatus(status2),
			})
		}
		checkDecision(t, vmi, cluster, Decide(vmi, cluster))
	})
}

// FuzzSnapshotObjects decodes a VMI and a virt-launcher pod as the informers would
// (JSON: any field missing, null or absurd) and puts both on this node, then asks what
// the agent reports and decides for them (Snapshot: vmsOnNode, decide, observe; OwnerOf;
// PredictEnd). Properties: no panic; one VM per VMI key or lone pod; every VM has a known
// state, and one left alone while draining is blocked with its reason; the decision
// for the VMI keeps checkDecision.
func FuzzSnapshotObjects(f *testing.F) {
	for _, s := range [][2]string{
		{`{}`, `{}`},
		{`null`, `null`},
		{`{"metadata":{"name":"vm","namespace":"ns","uid":"u1"},"spec":{"evictionStrategy":"LiveMigrate"},"status":{"phase":"Running"}}`,
			`{"metadata":{"name":"virt-launcher-vm-abc","namespace":"ns","labels":{"kubevirt.io/created-by":"u1"}},"status":{"phase":"Running"}}`},
		{`{"metadata":{"name":"vm","namespace":"ns","uid":"u1"},"status":{"phase":"Running","conditions":[{"type":"LiveMigratable","status":"True"}],"migrationState":{"sourceNode":"node-a","targetNode":"node-b","migrationUid":"m1"}}}`,
			`{"metadata":{"name":"virt-launcher-vm-def","namespace":"ns","labels":{"kubevirt.io/created-by":"u1","kubevirt.io/migrationJobUID":"m1"}}}`},
		{`{"metadata":{"name":"vm","namespace":"ns","uid":"u1","deletionTimestamp":"2030-01-02T03:04:05Z"},"status":{"phase":"Succeeded"}}`,
			`{"metadata":{"name":"p","deletionTimestamp":"2030-01-02T03:04:05Z","labels":{"kubevirt.io/created-by":"other"},"annotations":{"kubevirt.io/domain":"vm2"}}}`},
		{`{"metadata":{"name":"vm","namespace":"ns","uid":"u1","ownerReferences":[{"kind":"VirtualMachine","name":"vm","controller":true},{"kind":"X","name":"y","controller":null}]},"status":{"evacuationNodeName":"node-a","migrationState":{"failed":true,"failureReason":"boom"}}}`,
			`{"status":{"phase":"Failed"}}`},
		{`{"spec":{"evictionStrategy":"External"},"status":{"evacuationNodeName":"node-a","migrationState":null,"conditions":null}}`, `{"metadata":{"labels":null}}`},
		{`{"spec":{"evictionStrategy":"Bogus"},"status":{"conditions":[{"type":"LiveMigratable","status":"False","reason":"r","message":"m"},{"type":"LiveMigratable","status":"True"}]}}`, ``},
	} {
		f.Add([]byte(s[0]), []byte(s[1]), "LiveMigrateIfPossible", true)
	}
	f.Fuzz(func(t *testing.T, vmiJSON, podJSON []byte, cluster string, draining bool) {
		var vmis []*kubevirtv1.VirtualMachineInstance
		var pods []*corev1.Pod
		vmi := &kubevirtv1.VirtualMachineInstance{}
		if json.Unmarshal(vmiJSON, vmi) == nil {
			vmi.Status.NodeName = thisNode
			vmis = append(vmis, vmi)
		}
		pod := &corev1.Pod{}
		if json.Unmarshal(podJSON, pod) == nil {
			pod.Spec.NodeName = thisNode
			pods = append(pods, pod)
		}
		cfg := nodeinfo.Config{DrainTaintKey: nodeinfo.DefaultDrainTaintKey, ClusterEvictionStrategy: strategy(kubevirtv1.EvictionStrategy(cluster))}
		got := Snapshot(thisNode, draining, cfg, vmis, pods)
		if want := len(vmsOnNode(thisNode, vmis, pods)); len(got) != want {
			t.Fatalf("%d VMs reported, %d on the node", len(got), want)
		}
		for _, s := range got {
			switch s.State {
			case StateRunning, StatePending, StateMigrating, StateShuttingDown, StateWaitingExternal, StateIncoming, StateStarting:
			case StateBlocked:
				if s.Detail == "" {
					t.Fatalf("blocked without a reason: %+v", s)
				}
			default:
				t.Fatalf("unknown state %q: %+v", s.State, s)
			}
			if draining && s.Action == ActionNone && s.State == StatePending {
				t.Fatalf("left alone but reported pending: %+v", s)
			}
		}
		for _, vmi := range vmis {
			d := Decide(vmi, cfg.ClusterEvictionStrategy)
			checkDecision(t, vmi, cfg.ClusterEvictionStrategy, d)
			kind, _ := OwnerOf(vmi)
			if PredictEnd(d, Owner{Kind: kind}) == "" {
				t.Fatalf("no predicted end for %+v", d)
			}
		}
	})
}
