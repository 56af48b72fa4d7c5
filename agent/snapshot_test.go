package agent

import (
	"testing"

	kubevirtv1 "kubevirt.io/api/core/v1"
)

func TestPredictEnd(t *testing.T) {
	shutdown := Decision{Action: ActionShutdown}
	vm := func(rs kubevirtv1.VirtualMachineRunStrategy) Owner {
		return Owner{Kind: "VirtualMachine", RunStrategy: rs}
	}
	tests := []struct {
		name  string
		d     Decision
		owner Owner
		want  string
	}{
		{"migrated whatever owns it", Decision{Action: ActionMigrate}, vm(kubevirtv1.RunStrategyManual), "migrated to another node"},
		{"external", Decision{Action: ActionExternal}, Owner{}, "left to the external controller"},
		{"blocked with the reason", Decision{Action: ActionNone, Reason: "not live-migratable"}, vm(kubevirtv1.RunStrategyAlways), "blocked: not live-migratable"},
		{"Always restarts", shutdown, vm(kubevirtv1.RunStrategyAlways), "shut down, restarted on another node (runStrategy Always)"},
		{"Manual stays stopped", shutdown, vm(kubevirtv1.RunStrategyManual), "shut down, stays stopped (runStrategy Manual)"},
		{"Once stays stopped", shutdown, vm(kubevirtv1.RunStrategyOnce), "shut down, stays stopped (runStrategy Once)"},
		{"Halted stays stopped", shutdown, vm(kubevirtv1.RunStrategyHalted), "shut down, stays stopped (runStrategy Halted)"},
		// An evicted VMI ends Succeeded, which RerunOnFailure does not restart (kubevirt/kubevirt#9823).
		{"RerunOnFailure stays stopped", shutdown, vm(kubevirtv1.RunStrategyRerunOnFailure), "shut down, stays stopped (runStrategy RerunOnFailure)"},
		{"VMIRS replaces", shutdown, Owner{Kind: "VirtualMachineInstanceReplicaSet"}, "shut down, replaced on another node by its VMIRS"},
		{"bare VMI", shutdown, Owner{}, "shut down, stays stopped (a bare VMI)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := PredictEnd(tt.d, tt.owner); got != tt.want {
				t.Errorf("PredictEnd() = %q, want %q", got, tt.want)
			}
		})
	}
}
