package agent

import (
	"context"

	corev1 "k8s.io/api/core/v1"
)

// A rollout (every host of the cluster to be rebooted, one after another or many at
// once) can mark the nodes it has not reached yet, so that the VMs moved off the hosts
// that go first land on hosts already done, not on hosts about to go: the operator (or
// the rollout's automation) annotates each node with AnnotationRolloutPending, its
// value the node's current boot ID (status.nodeInfo.bootID). While the value is the
// node's boot ID, the node's own agent keeps the agent's PreferNoSchedule TaintWaiting
// on it (recorded as its own). The reboot changes the boot ID: the mark no longer
// holds, and the agent takes its taint away with the rest of what it added. Removing
// the annotation (a rollout called off) takes the taint away as well. The agent never
// writes the annotation: a stale one (an earlier boot's ID) means nothing.

// AnnotationRolloutPending marks a node not yet reached by a rollout; its value is the
// node's boot ID when it was marked.
const AnnotationRolloutPending = AnnotationPrefix + "rollout-pending"

// OwnedForRollout is the Ownership.Reason of a waiting taint added for a rollout mark.
const OwnedForRollout = "rollout"

// ReasonRolloutPending is the event of a node that carries the waiting taint for a
// rollout's mark.
const ReasonRolloutPending = "RolloutPending"

// RolloutPending says whether node is marked as not yet reached by a rollout: the mark
// names its current boot ID.
func RolloutPending(node *corev1.Node) bool {
	boot := node.Status.NodeInfo.BootID
	return boot != "" && node.Annotations[AnnotationRolloutPending] == boot
}

// reconcileRolloutMark, with no host shutdown pending or being undone: the node carries
// the waiting taint while it is marked as not yet reached by a rollout, and not once
// the mark that had the agent add it is gone.
func (e *Engine) reconcileRolloutMark(ctx context.Context, node *corev1.Node, own Ownership) {
	marked := RolloutPending(node)
	tainted := hasTaint(node, TaintWaiting, corev1.TaintEffectPreferNoSchedule)
	switch {
	case marked && !tainted:
		if !e.nodeWriteDue("rollout-mark") {
			return
		}
		if err := e.markWaiting(ctx, node, OwnedForRollout); err != nil {
			e.nodeWriteFailed(node, "rollout-mark", "cannot add the waiting taint "+TaintWaiting+" for the rollout's mark", err)
			return
		}
		e.nodeWriteOK("rollout-mark")
		e.log.Info("the node is marked as not yet reached by a rollout: added the waiting taint " + TaintWaiting)
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonRolloutPending, "Node marked as not yet reached by a rollout (%s): added the agent's %s:PreferNoSchedule taint, so that VMs moved off other hosts prefer nodes already done", AnnotationRolloutPending, TaintWaiting)
	case !marked && tainted && own.Waiting && own.Reason == OwnedForRollout:
		if !e.nodeWriteDue("reenable") {
			return
		}
		if err := e.reenable(ctx, "the node's rollout mark is gone"); err != nil {
			e.nodeWriteFailed(node, "reenable", "cannot remove the waiting taint after the rollout's mark went", err)
			return
		}
		e.nodeWriteOK("reenable")
	}
}
