package agent

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// Snapshot says, from the cluster's objects alone, which VMs are on the node and what
// is happening to each: the view that /safe-to-shutdown serves and that
// `node-agent status` prints from a workstation. Since is left zero.
func Snapshot(node string, draining bool, cfg nodeinfo.Config, vmis []*kubevirtv1.VirtualMachineInstance, pods []*corev1.Pod) []VMStatus {
	out := []VMStatus{}
	for _, v := range vmsOnNode(node, vmis, pods) {
		d := decide(v, cfg)
		state, detail := observe(v, d, node, draining)
		ns, name, _ := strings.Cut(v.key, "/")
		out = append(out, VMStatus{Namespace: ns, Name: name, Strategy: string(d.Strategy), Action: d.Action, State: state, Detail: detail})
	}
	return out
}

// Owner is what owns a VMI, as far as its fate after a shutdown goes.
type Owner struct {
	// Kind is "VirtualMachine", "VirtualMachineInstanceReplicaSet" or "" (a bare VMI).
	Kind string
	// RunStrategy is the VirtualMachine's run strategy.
	RunStrategy kubevirtv1.VirtualMachineRunStrategy
}

// OwnerOf reads the controller owner of a VMI from its owner references.
func OwnerOf(vmi *kubevirtv1.VirtualMachineInstance) (kind, name string) {
	for _, ref := range vmi.OwnerReferences {
		if ref.Controller != nil && *ref.Controller {
			return ref.Kind, ref.Name
		}
	}
	return "", ""
}

// PredictEnd says how a VM ends up after a drain, from its decision and its owner:
// migrated; restarted elsewhere (runStrategy Always); replaced (VMIRS); stays stopped
// (a bare VMI; runStrategy Manual, Once, Halted, and RerunOnFailure, whose evicted VMI
// ends Succeeded: kubevirt/kubevirt#9823); left to the external controller; blocked.
func PredictEnd(d Decision, owner Owner) string {
	switch d.Action {
	case ActionMigrate:
		return "migrated to another node"
	case ActionExternal:
		return "left to the external controller"
	case ActionNone:
		return "blocked: " + d.Reason
	}
	switch owner.Kind {
	case "VirtualMachineInstanceReplicaSet":
		return "shut down, replaced on another node by its VMIRS"
	case "VirtualMachine":
		if owner.RunStrategy == kubevirtv1.RunStrategyAlways {
			return "shut down, restarted on another node (runStrategy Always)"
		}
		return "shut down, stays stopped (runStrategy " + string(owner.RunStrategy) + ")"
	default:
		return "shut down, stays stopped (a bare VMI)"
	}
}
