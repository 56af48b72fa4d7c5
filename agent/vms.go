package agent

import (
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// VMState is what is happening to a VM on the node.
type VMState string

const (
	// StateRunning: not being drained; Decision says what a drain would do.
	StateRunning VMState = "running"
	// StatePending: the drain has not acted on it yet, or its request is being retried.
	StatePending VMState = "pending"
	// StateMigrating: an evacuation or migration is requested or running.
	StateMigrating VMState = "migrating"
	// StateShuttingDown: its virt-launcher pod is terminating.
	StateShuttingDown VMState = "shutting-down"
	// StateWaitingExternal: KubeVirt marked it for evacuation; an external controller acts.
	StateWaitingExternal VMState = "waiting-external"
	// StateBlocked: it cannot leave without help (see Detail).
	StateBlocked VMState = "blocked"
	// StateIncoming: a migration into this node has a target pod here.
	StateIncoming VMState = "incoming-migration"
	// StateStarting: a VM being started here: its virt-launcher pod is on the node
	// before its VMI names the node (not a migration's target pod).
	StateStarting VMState = "starting"
)

// vm is one VM on the node: its VMI (nil for a pod whose VMI is not on this node,
// such as the target of an incoming migration) and its virt-launcher pods here.
type vm struct {
	key  string
	vmi  *kubevirtv1.VirtualMachineInstance
	pods []*corev1.Pod
}

// sourcePod is the pod that runs the VMI, the one to evict: as KubeVirt's own
// CurrentVMIPod reads it, the newest of its virt-launcher pods on the VMI's
// status.nodeName, leaving out the target pod of a migration that has not finished.
// A pod that was a migration's target keeps KubeVirt's kubevirt.io/migrationJobUID
// label for its whole life: once that migration is over it is the running pod like
// any other. nil if there is none (a VM whose VMI runs elsewhere has none here).
func (v *vm) sourcePod() *corev1.Pod {
	if v.vmi == nil {
		return nil
	}
	var cur *corev1.Pod
	for _, p := range v.pods {
		if p.Spec.NodeName != v.vmi.Status.NodeName || unfinishedTarget(v.vmi, p) {
			continue
		}
		if cur == nil || cur.CreationTimestamp.Before(&p.CreationTimestamp) {
			cur = p
		}
	}
	return cur
}

// unfinishedTarget says whether the pod is the target pod of the VMI's migration and
// that migration has not ended (no endTimestamp, not completed, not failed).
func unfinishedTarget(vmi *kubevirtv1.VirtualMachineInstance, p *corev1.Pod) bool {
	job, ok := p.Labels[kubevirtv1.MigrationJobLabel]
	if !ok {
		return false
	}
	ms := vmi.Status.MigrationState
	if ms == nil || ms.Completed || ms.Failed || ms.EndTimestamp != nil {
		// Ended: the target virt-handler sets endTimestamp as it takes the VMI over
		// (status.nodeName becomes its node), before it marks the migration completed.
		return false
	}
	return (ms.MigrationUID != "" && string(ms.MigrationUID) == job) || (ms.TargetPod != "" && ms.TargetPod == p.Name)
}

func (v *vm) terminating() bool {
	if v.vmi != nil && (v.vmi.DeletionTimestamp != nil || v.vmi.IsFinal()) {
		return true
	}
	p := v.sourcePod()
	return p != nil && p.DeletionTimestamp != nil
}

// vmsOnNode lists the VMs on the node: the VMIs whose status.nodeName is the node and
// whose phase is not final, and the virt-launcher pods scheduled here that have not
// terminated (grouped under their VMI, or alone when the VMI runs elsewhere).
func vmsOnNode(node string, vmis []*kubevirtv1.VirtualMachineInstance, pods []*corev1.Pod) []*vm {
	byUID := map[string]*vm{}
	var out []*vm
	for _, vmi := range vmis {
		if vmi.Status.NodeName != node || vmi.IsFinal() {
			continue
		}
		v := &vm{key: vmi.Namespace + "/" + vmi.Name, vmi: vmi}
		byUID[string(vmi.UID)] = v
		out = append(out, v)
	}
	for _, p := range pods {
		if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
			continue
		}
		if v, ok := byUID[p.Labels[kubevirtv1.CreatedByLabel]]; ok {
			v.pods = append(v.pods, p)
			continue
		}
		name := p.Annotations[kubevirtv1.DomainAnnotation]
		if name == "" {
			name = p.Name
		}
		v := &vm{key: p.Namespace + "/" + name, pods: []*corev1.Pod{p}}
		byUID[p.Labels[kubevirtv1.CreatedByLabel]] = v
		out = append(out, v)
	}
	return out
}

// observe says what is happening to a VM, from the cluster alone.
func observe(v *vm, d Decision, node string, draining bool) (VMState, string) {
	if v.vmi == nil {
		p := v.pods[0]
		if p.DeletionTimestamp != nil {
			return StateShuttingDown, "virt-launcher pod " + p.Name + " is terminating"
		}
		if _, target := p.Labels[kubevirtv1.MigrationJobLabel]; target {
			return StateIncoming, "virt-launcher pod " + p.Name + " of a VM running elsewhere"
		}
		return StateStarting, "virt-launcher pod " + p.Name + " of a VM being started here (its VMI does not name the node yet)"
	}
	vmi := v.vmi
	if v.terminating() {
		return StateShuttingDown, "the guest is shutting down"
	}
	if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed && !ms.Failed && ms.SourceNode == node && ms.TargetNode != "" {
		return StateMigrating, "to " + ms.TargetNode
	}
	if vmi.Status.EvacuationNodeName == node {
		if d.Strategy == kubevirtv1.EvictionStrategyExternal {
			return StateWaitingExternal, "KubeVirt marked it for evacuation; waiting for the external controller"
		}
		detail := "evacuation requested; KubeVirt schedules the migration"
		if ms := vmi.Status.MigrationState; ms != nil && ms.Failed {
			detail = "the last migration failed; KubeVirt retries it"
			if ms.FailureReason != "" {
				detail += " (" + ms.FailureReason + ")"
			}
		}
		return StateMigrating, detail
	}
	if !draining {
		return StateRunning, ""
	}
	if d.Action == ActionNone {
		return StateBlocked, d.Reason
	}
	return StatePending, ""
}

// hasUnfinishedMigration says whether the VMI has a migration that has not ended, from
// its migration objects and its status (either may lag the other).
func hasUnfinishedMigration(vmi *kubevirtv1.VirtualMachineInstance, migrations []kubevirtv1.VirtualMachineInstanceMigration) (string, bool) {
	if m := UnfinishedMigration(migrations); m != nil {
		return m.Name, true
	}
	if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed && !ms.Failed && ms.StartTimestamp != nil {
		return string(ms.MigrationUID), true
	}
	return "", false
}

// UnfinishedMigration returns the newest of the migrations that has not ended and is
// not being deleted, nil if there is none. The agent asks it before it requests a
// migration; `node-agent status` shows it.
func UnfinishedMigration(migrations []kubevirtv1.VirtualMachineInstanceMigration) *kubevirtv1.VirtualMachineInstanceMigration {
	var found *kubevirtv1.VirtualMachineInstanceMigration
	for i := range migrations {
		m := &migrations[i]
		if m.IsFinal() || m.DeletionTimestamp != nil {
			continue
		}
		if found == nil || found.CreationTimestamp.Before(&m.CreationTimestamp) {
			found = m
		}
	}
	return found
}

// since keeps, per VM, when it entered its current state (for "since when").
type since map[string]struct {
	state VMState
	at    time.Time
}

func (s since) observe(key string, state VMState, now time.Time) time.Time {
	if cur, ok := s[key]; ok && cur.state == state {
		return cur.at
	}
	s[key] = struct {
		state VMState
		at    time.Time
	}{state, now}
	return now
}

func describe(v *vm) string {
	if v.vmi == nil {
		return fmt.Sprintf("pod %s/%s", v.pods[0].Namespace, v.pods[0].Name)
	}
	return "VMI " + v.key
}
