package agent

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// The writes of the Node's spec and of the agent's shutdown and ownership annotations.
// Only sync calls them: the shutdown path records its intent (ShutdownStarted,
// ShutdownCancelled) and enqueues; sync is the one writer of the Node.

// staleShutdown is how long after its deadline a host shutdown recorded on the Node
// (and found there by a restarted agent) is taken as one that did not happen: the host
// would have gone down by then, and its boot ID changed.
const staleShutdown = 5 * time.Minute

// updateNode reads the Node from the API server, lets mutate change it, and writes it
// back (nodeinfo.UpdateNode): a conflict is retried with a fresh read, any other error
// is returned. mutate returns false when there is nothing to write.
func (e *Engine) updateNode(ctx context.Context, mutate func(node *corev1.Node) bool) error {
	return nodeinfo.UpdateNode(ctx, e.clients.Kube, e.opts.NodeName, func(node *corev1.Node) (bool, error) {
		return mutate(node), nil
	})
}

// takeOutOfService records the pending host shutdown on the Node (with the boot ID) and
// adds the drain taint and the cordon, recording in the ownership annotation what the
// agent added, all in one update.
func (e *Engine) takeOutOfService(ctx context.Context, taintKey string, at, deadline time.Time) error {
	return e.updateNode(ctx, func(node *corev1.Node) bool {
		changed := false
		boot := node.Status.NodeInfo.BootID
		var sd ShutdownRecord
		if ok, err := readAnnotation(node, AnnotationShutdown, &sd); err != nil || !ok || sd.BootID != boot || sd.Cancelled != nil {
			sd = ShutdownRecord{BootID: boot, Started: at.UTC(), Deadline: deadline.UTC()}
			setJSONAnnotation(node, AnnotationShutdown, &sd)
			changed = true
		}
		var own Ownership
		if _, err := readAnnotation(node, AnnotationOwned, &own); err != nil {
			e.log.WithError(err).Warn("replacing the unreadable ownership annotation")
		}
		added := false
		if !HasDrainTaint(node, taintKey) {
			node.Spec.Taints = append(node.Spec.Taints, corev1.Taint{Key: taintKey, Value: "shutdown", Effect: corev1.TaintEffectNoSchedule})
			own.TaintKey, added = taintKey, true
		}
		if !node.Spec.Unschedulable {
			node.Spec.Unschedulable = true
			own.Cordoned, added = true, true
		}
		if added {
			own.BootID, own.Reason, own.Since = boot, TriggerShutdown, e.opts.Clock.Now().UTC()
			setJSONAnnotation(node, AnnotationOwned, &own)
		}
		return changed || added
	})
}

// markShutdownCancelled records on the Node, before anything is undone, that the
// pending host shutdown was cancelled: an agent killed or restarted from here on still
// gives the node back.
func (e *Engine) markShutdownCancelled(ctx context.Context) error {
	return e.updateNode(ctx, func(node *corev1.Node) bool {
		var sd ShutdownRecord
		ok, err := readAnnotation(node, AnnotationShutdown, &sd)
		if err != nil || !ok || sd.Cancelled != nil || sd.BootID != node.Status.NodeInfo.BootID {
			return false
		}
		now := e.opts.Clock.Now().UTC()
		sd.Cancelled = &now
		setJSONAnnotation(node, AnnotationShutdown, &sd)
		return true
	})
}

// reenable removes what the agent itself added to its Node (its taint, its cordon) and
// the shutdown record, and says so in an event. An operator's taint or cordon stays.
func (e *Engine) reenable(ctx context.Context, why string) error {
	var removed []string
	err := e.updateNode(ctx, func(node *corev1.Node) bool {
		removed = nil
		_, recorded := node.Annotations[AnnotationShutdown]
		var own Ownership
		ok, err := readAnnotation(node, AnnotationOwned, &own)
		if err != nil {
			e.log.WithError(err).Warn("dropping the unreadable ownership annotation; nothing removed")
		}
		_, owned := node.Annotations[AnnotationOwned]
		if !owned && !recorded {
			return false
		}
		if ok && (own.TaintKey != "" || own.Waiting) {
			var keep []corev1.Taint
			for _, t := range node.Spec.Taints {
				if (t.Key == own.TaintKey && t.Effect == corev1.TaintEffectNoSchedule) || (own.Waiting && t.Key == TaintWaiting && t.Effect == corev1.TaintEffectPreferNoSchedule) {
					removed = append(removed, "taint "+t.Key)
					continue
				}
				keep = append(keep, t)
			}
			node.Spec.Taints = keep
		}
		if ok && own.Cordoned && node.Spec.Unschedulable {
			node.Spec.Unschedulable = false
			removed = append(removed, "cordon")
		}
		delete(node.Annotations, AnnotationOwned)
		delete(node.Annotations, AnnotationShutdown)
		return true
	})
	if err != nil {
		return err
	}
	if len(removed) > 0 {
		if node, err := e.view.Node(); err == nil {
			e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonNodeReenabled, "Node re-enabled (%s): removed the agent's own %s", why, strings.Join(removed, " and "))
		}
		e.log.WithFields(logrus.Fields{"why": why, "removed": removed}).Info("node re-enabled")
	}
	return nil
}

// setJSONAnnotation sets a JSON annotation on the node.
func setJSONAnnotation(node *corev1.Node, key string, v any) {
	if node.Annotations == nil {
		node.Annotations = map[string]string{}
	}
	raw, _ := jsonMarshal(v)
	node.Annotations[key] = raw
}

// shutdownIntent is what the shutdown path asked for, as sync carries it out.
type shutdownIntent struct {
	pending   bool // a host shutdown is pending: take the node out of service, drain
	cancelled bool // a shutdown was cancelled and the node is not given back yet
	// waiting (set by reconcileShutdown on the intent it returns): the pending
	// shutdown's drain waits for its turn (awaitTurn).
	waiting  bool
	at       time.Time
	deadline time.Time
}

// reconcileShutdown brings the Node in line with the shutdown intent, first of all in a
// sync: a pending shutdown is recorded and the node taken out of service; a cancelled
// one is recorded as cancelled, then the node is given back; after a reboot the node is
// given back. A failed write is reported (event, metric, readiness) and retried with a
// backoff, never returned: it must not hold up the drain or the status report. It
// returns the intent that the rest of the sync serves.
func (e *Engine) reconcileShutdown(ctx context.Context, node *corev1.Node, taintKey string) shutdownIntent {
	var sd ShutdownRecord
	recorded, err := readAnnotation(node, AnnotationShutdown, &sd)
	if err != nil {
		e.log.WithError(err).Warn("unreadable shutdown record; it is removed when the node is given back")
		e.metrics.ConfigErrors.WithLabelValues("shutdown-record").Inc()
	}
	boot := node.Status.NodeInfo.BootID
	thisBoot := recorded && sd.BootID == boot
	now := e.opts.Clock.Now()

	e.mu.Lock()
	if !e.loaded {
		// First look at the Node since the agent started: carry on with what an earlier
		// agent recorded on this boot.
		e.loaded = true
		if thisBoot && !e.intent.pending && !e.intent.cancelled {
			if sd.Cancelled != nil {
				e.intent.cancelled = true
			} else {
				e.intent = shutdownIntent{pending: true, at: sd.Started, deadline: sd.Deadline}
				e.adopted = true
				e.log.WithField("deadline", sd.Deadline.Format(time.RFC3339)).Info("a host shutdown recorded on the node is pending: carrying on with it")
			}
		}
	}
	if e.intent.pending && e.adopted && !sd.Deadline.IsZero() && now.After(sd.Deadline.Add(staleShutdown)) {
		e.log.WithField("deadline", sd.Deadline.Format(time.RFC3339)).Warn("the host shutdown recorded on the node did not happen by its deadline: giving the node back")
		e.intent = shutdownIntent{cancelled: true}
	}
	if !e.intent.pending && thisBoot {
		// The Node says a shutdown is pending or being undone, and none is: undo it.
		e.intent.cancelled = true
	}
	intent, gen := e.intent, e.gen
	e.mu.Unlock()

	var own Ownership
	owned, err := readAnnotation(node, AnnotationOwned, &own)
	if err != nil {
		e.log.WithError(err).Warn("unreadable ownership annotation")
	}
	ownStale := owned && own.BootID != "" && own.BootID != boot
	rebooted := ownStale || (recorded && !thisBoot)

	switch {
	case intent.pending:
		if thisBoot && sd.Cancelled == nil && HasDrainTaint(node, taintKey) && node.Spec.Unschedulable {
			e.nodeWriteOK("take-out-of-service")
			break
		}
		if !TaintTriggersDrain(node, taintKey) && !e.awaitTurn(ctx, node, intent) {
			intent.waiting = true
			break
		}
		if !e.nodeWriteDue("take-out-of-service") {
			break
		}
		if err := e.takeOutOfService(ctx, taintKey, intent.at, intent.deadline); err != nil {
			e.nodeWriteFailed(node, "take-out-of-service", "cannot take the node out of service for the host shutdown (draining anyway)", err)
			break
		}
		e.nodeWriteOK("take-out-of-service")
	case rebooted:
		// What an earlier boot recorded: the host went down and came back.
		if !e.nodeWriteDue("reenable") {
			break
		}
		old := own.BootID
		if !ownStale {
			old = sd.BootID
		}
		if err := e.reenable(ctx, fmt.Sprintf("the node rebooted (boot ID %s -> %s)", old, boot)); err != nil {
			e.nodeWriteFailed(node, "reenable", "cannot re-enable the node after its reboot", err)
			break
		}
		e.nodeWriteOK("reenable")
		e.releaseTurn(ctx)
		e.cancelDone(gen)
	case intent.cancelled:
		if !e.nodeWriteDue("reenable") {
			break
		}
		if err := e.markShutdownCancelled(ctx); err != nil {
			e.log.WithError(err).Warn("cannot record the cancelled shutdown on the node; giving the node back anyway")
			e.metrics.NodeUpdateFailures.WithLabelValues("cancel-mark").Inc()
		}
		if err := e.reenable(ctx, "the host shutdown was cancelled"); err != nil {
			e.nodeWriteFailed(node, "reenable", "cannot re-enable the node after the cancelled host shutdown", err)
			break
		}
		e.nodeWriteOK("reenable")
		e.releaseTurn(ctx)
		e.cancelDone(gen)
	default:
		e.reconcileRolloutMark(ctx, node, own)
	}
	return intent
}

// cancelDone clears the cancel carried out, unless a shutdown notice came since (gen).
func (e *Engine) cancelDone(gen int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.gen == gen {
		e.intent.cancelled = false
	}
}

// nodeWriteDue says whether a write that failed before may be tried again: the backoff
// holds even when informer events look at the node sooner. When it is not due, the node
// is looked at again when it is (the queue keeps only the earliest of several delayed
// looks, so the one nodeWriteFailed asked for may have been dropped).
func (e *Engine) nodeWriteDue(what string) bool {
	e.mu.Lock()
	next, ok := e.nodeRetry[what]
	e.mu.Unlock()
	now := e.opts.Clock.Now()
	if !ok || !now.Before(next) {
		return true
	}
	e.queue.AddAfter(e.opts.NodeName, next.Sub(now))
	return false
}

// nodeWriteFailed reports a failed write of the Node (a Warning event once per write
// and error, the log, a metric, the readiness reason) and schedules a retry with a
// backoff.
func (e *Engine) nodeWriteFailed(node *corev1.Node, what, msg string, err error) {
	delay := e.nodeBackoff.When(what)
	full := msg + ": " + err.Error()
	e.mu.Lock()
	e.nodeRetry[what] = e.opts.Clock.Now().Add(delay)
	repeated := e.nodeErr[what] == full
	e.nodeErr[what] = full
	e.status.NodeError = e.nodeErrorLocked()
	e.mu.Unlock()
	e.statusChanged()
	e.metrics.NodeUpdateFailures.WithLabelValues(what).Inc()
	if what == "reenable" {
		e.metrics.ReenableFailing.Set(1)
	}
	log := e.log.WithError(err).WithFields(logrus.Fields{"write": what, "retryIn": delay.String()})
	if repeated {
		log.Warn(msg + "; retrying")
	} else {
		e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonNodeUpdateFailed, "%s, retrying in %s: %v", msg, delay.Round(time.Millisecond), err)
		log.Error(msg + "; retrying")
	}
	e.queue.AddAfter(e.opts.NodeName, delay)
}

// nodeWriteOK clears what nodeWriteFailed reported for this write.
func (e *Engine) nodeWriteOK(what string) {
	e.nodeBackoff.Forget(what)
	e.mu.Lock()
	_, failed := e.nodeErr[what]
	delete(e.nodeErr, what)
	delete(e.nodeRetry, what)
	e.status.NodeError = e.nodeErrorLocked()
	e.mu.Unlock()
	if !failed {
		return
	}
	e.statusChanged()
	if what == "reenable" {
		e.metrics.ReenableFailing.Set(0)
	}
	e.log.WithField("write", what).Info("the node could be written again")
}

// nodeErrorLocked is the readiness reason for the failing writes of the Node.
func (e *Engine) nodeErrorLocked() string {
	msgs := make([]string, 0, len(e.nodeErr))
	for _, m := range e.nodeErr {
		msgs = append(msgs, m)
	}
	sort.Strings(msgs)
	return strings.Join(msgs, "; ")
}

// TaintTriggersDrain says whether the drain taint on the node asks for a drain: the
// key:NoSchedule taint, put there by someone other than the agent. The agent's own,
// added for a host shutdown, serves that shutdown only: it is no trigger once that
// shutdown is no longer pending (it is removed when the node is given back; until
// then it starts no drain). The engine and the workstation's status (drainctl) both
// read the taint through it.
func TaintTriggersDrain(node *corev1.Node, taintKey string) bool {
	if !HasDrainTaint(node, taintKey) {
		return false
	}
	var own Ownership
	ok, _ := readAnnotation(node, AnnotationOwned, &own)
	return !ok || own.TaintKey != taintKey
}

// ShutdownPendingOnNode says whether the Node records a host shutdown of its current
// boot that was not cancelled: the agent on the node drains it for that shutdown.
func ShutdownPendingOnNode(node *corev1.Node) bool {
	var sd ShutdownRecord
	ok, err := readAnnotation(node, AnnotationShutdown, &sd)
	return err == nil && ok && sd.Cancelled == nil && sd.BootID == node.Status.NodeInfo.BootID
}
