package agent

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func strategy(s kubevirtv1.EvictionStrategy) *kubevirtv1.EvictionStrategy { return &s }

// migratableCondition is the LiveMigratable condition virt-handler reports.
func migratableCondition(status corev1.ConditionStatus, reason, message string) kubevirtv1.VirtualMachineInstanceCondition {
	return kubevirtv1.VirtualMachineInstanceCondition{
		Type:    kubevirtv1.VirtualMachineInstanceIsMigratable,
		Status:  status,
		Reason:  reason,
		Message: message,
	}
}

func vmiWith(s *kubevirtv1.EvictionStrategy, conds ...kubevirtv1.VirtualMachineInstanceCondition) *kubevirtv1.VirtualMachineInstance {
	vmi := &kubevirtv1.VirtualMachineInstance{}
	vmi.Namespace, vmi.Name = "ns", "vm"
	vmi.Spec.EvictionStrategy = s
	vmi.Status.Conditions = conds
	return vmi
}

func TestEffectiveStrategy(t *testing.T) {
	tests := []struct {
		name    string
		vmi     *kubevirtv1.EvictionStrategy
		cluster *kubevirtv1.EvictionStrategy
		want    kubevirtv1.EvictionStrategy
	}{
		{"VMI overrides cluster", strategy(kubevirtv1.EvictionStrategyNone), strategy(kubevirtv1.EvictionStrategyLiveMigrate), kubevirtv1.EvictionStrategyNone},
		{"VMI set, cluster unset", strategy(kubevirtv1.EvictionStrategyExternal), nil, kubevirtv1.EvictionStrategyExternal},
		{"cluster used when VMI unset", nil, strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible), kubevirtv1.EvictionStrategyLiveMigrateIfPossible},
		{"None when both unset", nil, nil, kubevirtv1.EvictionStrategyNone},
		{"unknown VMI strategy kept as is", strategy("Teleport"), strategy(kubevirtv1.EvictionStrategyNone), "Teleport"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := EffectiveStrategy(vmiWith(tt.vmi), tt.cluster); got != tt.want {
				t.Errorf("EffectiveStrategy() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestDecide(t *testing.T) {
	migratable := migratableCondition(corev1.ConditionTrue, "", "")
	notMigratable := migratableCondition(corev1.ConditionFalse, kubevirtv1.VirtualMachineInstanceReasonDisksNotMigratable, "cannot migrate VMI: PVC rootdisk is not shared")
	otherCondition := kubevirtv1.VirtualMachineInstanceCondition{Type: kubevirtv1.VirtualMachineInstanceReady, Status: corev1.ConditionTrue}

	tests := []struct {
		name    string
		vmi     *kubevirtv1.VirtualMachineInstance
		cluster *kubevirtv1.EvictionStrategy
		want    Decision
		// reasonHas are substrings the Reason must contain (checked instead of an exact Reason).
		reasonHas []string
	}{
		{
			name: "LiveMigrate, migratable: migrate",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrate), otherCondition, migratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionMigrate},
		},
		{
			name:      "LiveMigrate, not migratable: blocked with the condition's reason, never shut down",
			vmi:       vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrate), notMigratable),
			want:      Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionNone},
			reasonHas: []string{"not live-migratable", kubevirtv1.VirtualMachineInstanceReasonDisksNotMigratable, "PVC rootdisk is not shared"},
		},
		{
			name:      "LiveMigrate, condition missing: blocked, never shut down",
			vmi:       vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrate), otherCondition),
			want:      Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionNone},
			reasonHas: []string{"not reported the LiveMigratable condition"},
		},
		{
			name: "LiveMigrateIfPossible, migratable: migrate",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible), migratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrateIfPossible, Action: ActionMigrate},
		},
		{
			name: "LiveMigrateIfPossible, not migratable: shut down",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible), notMigratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrateIfPossible, Action: ActionShutdown},
		},
		{
			name: "LiveMigrateIfPossible, condition Unknown: shut down (virt-handler answered)",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible), migratableCondition(corev1.ConditionUnknown, "", "")),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrateIfPossible, Action: ActionShutdown},
		},
		{
			name:      "LiveMigrateIfPossible, condition missing: left alone, not shut down on a guess",
			vmi:       vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible)),
			want:      Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrateIfPossible, Action: ActionNone},
			reasonHas: []string{"not reported the LiveMigratable condition"},
		},
		{
			name: "None: shut down",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyNone), migratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyNone, Action: ActionShutdown},
		},
		{
			name: "External: request the eviction and wait",
			vmi:  vmiWith(strategy(kubevirtv1.EvictionStrategyExternal), notMigratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyExternal, Action: ActionExternal},
		},
		{
			name:      "unknown strategy: left alone, the reason names it",
			vmi:       vmiWith(strategy("Teleport"), migratable),
			want:      Decision{Strategy: "Teleport", Action: ActionNone},
			reasonHas: []string{`unknown evictionStrategy "Teleport"`},
		},
		{
			name:      "unknown cluster strategy: left alone, the reason names it",
			vmi:       vmiWith(nil, migratable),
			cluster:   strategy("Bogus"),
			want:      Decision{Strategy: "Bogus", Action: ActionNone},
			reasonHas: []string{`"Bogus"`},
		},
		{
			name:    "VMI strategy overrides the cluster's",
			vmi:     vmiWith(strategy(kubevirtv1.EvictionStrategyNone), migratable),
			cluster: strategy(kubevirtv1.EvictionStrategyLiveMigrate),
			want:    Decision{Strategy: kubevirtv1.EvictionStrategyNone, Action: ActionShutdown},
		},
		{
			name:      "cluster strategy used when the VMI has none",
			vmi:       vmiWith(nil, notMigratable),
			cluster:   strategy(kubevirtv1.EvictionStrategyLiveMigrate),
			want:      Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionNone},
			reasonHas: []string{kubevirtv1.VirtualMachineInstanceReasonDisksNotMigratable},
		},
		{
			name: "None when neither the VMI nor the cluster sets one",
			vmi:  vmiWith(nil, migratable),
			want: Decision{Strategy: kubevirtv1.EvictionStrategyNone, Action: ActionShutdown},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Decide(tt.vmi, tt.cluster)
			if got.Strategy != tt.want.Strategy || got.Action != tt.want.Action {
				t.Fatalf("Decide() = %+v, want strategy %q action %q", got, tt.want.Strategy, tt.want.Action)
			}
			if len(tt.reasonHas) == 0 {
				if got.Reason != "" {
					t.Errorf("Decide().Reason = %q, want none", got.Reason)
				}
				return
			}
			for _, s := range tt.reasonHas {
				if !strings.Contains(got.Reason, s) {
					t.Errorf("Decide().Reason = %q, want it to contain %q", got.Reason, s)
				}
			}
		})
	}
}

// TestDecideNeverShutsDownLiveMigrate is the SPEC's first invariant over every
// state of the LiveMigratable condition.
func TestDecideNeverShutsDownLiveMigrate(t *testing.T) {
	conds := [][]kubevirtv1.VirtualMachineInstanceCondition{
		nil,
		{migratableCondition(corev1.ConditionTrue, "", "")},
		{migratableCondition(corev1.ConditionFalse, "", "")},
		{migratableCondition(corev1.ConditionFalse, kubevirtv1.VirtualMachineInstanceReasonInterfaceNotMigratable, "")},
		{migratableCondition(corev1.ConditionUnknown, "", "")},
	}
	for _, c := range conds {
		for _, cluster := range []*kubevirtv1.EvictionStrategy{nil, strategy(kubevirtv1.EvictionStrategyNone)} {
			d := Decide(vmiWith(strategy(kubevirtv1.EvictionStrategyLiveMigrate), c...), cluster)
			if d.Action == ActionShutdown {
				t.Errorf("Decide(LiveMigrate, conditions %+v) = %+v: a LiveMigrate VM must never be shut down", c, d)
			}
			if d.Action == ActionNone && d.Reason == "" {
				t.Errorf("Decide(LiveMigrate, conditions %+v) is blocked without a reason", c)
			}
		}
	}
}
