// Package agent is node-agent's drain engine: what to do with each VM on the node,
// doing it through KubeVirt's eviction path, and reporting when the node is safe to
// power off.
package agent

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Action is what the agent does to move a VM off its node.
type Action string

const (
	// ActionMigrate live-migrates the VM: the eviction is turned into an evacuation by
	// KubeVirt, whose controllers run (and retry) the migration.
	ActionMigrate Action = "migrate"
	// ActionShutdown evicts the virt-launcher pod: the guest shuts down gracefully.
	ActionShutdown Action = "shutdown"
	// ActionExternal requests the eviction, which KubeVirt records on the VMI, then
	// waits for an external controller to move the VM.
	ActionExternal Action = "external"
	// ActionNone leaves the VM where it is and reports it blocked: it must not be shut
	// down and cannot migrate (or its state is not known yet).
	ActionNone Action = "none"
)

// Decision is the action for one VM and why.
type Decision struct {
	// Strategy is the effective eviction strategy, as configured (it may be unknown).
	Strategy kubevirtv1.EvictionStrategy
	Action   Action
	// Reason says why a VM is blocked (ActionNone); empty otherwise.
	Reason string
}

// EffectiveStrategy is the VMI's spec.evictionStrategy, else the cluster's, else None.
func EffectiveStrategy(vmi *kubevirtv1.VirtualMachineInstance, cluster *kubevirtv1.EvictionStrategy) kubevirtv1.EvictionStrategy {
	switch {
	case vmi.Spec.EvictionStrategy != nil:
		return *vmi.Spec.EvictionStrategy
	case cluster != nil:
		return *cluster
	default:
		return kubevirtv1.EvictionStrategyNone
	}
}

// Decide is the SPEC's table "What happens to each VM":
//
//	effective strategy                           action
//	LiveMigrate, LiveMigratable=True             live-migrate
//	LiveMigrate, not migratable                  none: blocked, never shut down
//	LiveMigrateIfPossible, LiveMigratable=True   live-migrate
//	LiveMigrateIfPossible, not migratable        shut down (evict the virt-launcher pod)
//	None                                         shut down (evict the virt-launcher pod)
//	External                                     request the eviction, then wait
//
// A strategy it does not know, and a migratable-or-not question that virt-handler has
// not answered yet, leave the VM alone (blocked with the reason): a VM is never shut
// down on a guess.
func Decide(vmi *kubevirtv1.VirtualMachineInstance, cluster *kubevirtv1.EvictionStrategy) Decision {
	strategy := EffectiveStrategy(vmi, cluster)
	migratable, why := liveMigratable(vmi)
	d := Decision{Strategy: strategy}
	switch strategy {
	case kubevirtv1.EvictionStrategyLiveMigrate:
		if migratable {
			d.Action = ActionMigrate
		} else {
			d.Action, d.Reason = ActionNone, why
		}
	case kubevirtv1.EvictionStrategyLiveMigrateIfPossible:
		switch {
		case migratable:
			d.Action = ActionMigrate
		case why == reasonNotReported:
			d.Action, d.Reason = ActionNone, why
		default:
			d.Action = ActionShutdown
		}
	case kubevirtv1.EvictionStrategyNone:
		d.Action = ActionShutdown
	case kubevirtv1.EvictionStrategyExternal:
		d.Action = ActionExternal
	default:
		d.Action, d.Reason = ActionNone, fmt.Sprintf("unknown evictionStrategy %q: left alone", strategy)
	}
	return d
}

const reasonNotReported = "not live-migratable: virt-handler has not reported the LiveMigratable condition yet"

// liveMigratable reads the VMI's LiveMigratable condition; when it is not True, the
// second result says why, with the condition's reason and message.
func liveMigratable(vmi *kubevirtv1.VirtualMachineInstance) (bool, string) {
	for _, c := range vmi.Status.Conditions {
		if c.Type != kubevirtv1.VirtualMachineInstanceIsMigratable {
			continue
		}
		if c.Status == corev1.ConditionTrue {
			return true, ""
		}
		why := "not live-migratable"
		if c.Reason != "" {
			why += ": " + c.Reason
		}
		if c.Message != "" {
			why += ": " + c.Message
		}
		return false, why
	}
	return false, reasonNotReported
}
