package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Event reasons.
const (
	ReasonDrainStarted         = "DrainStarted"
	ReasonDrainCompleted       = "DrainCompleted"
	ReasonDrainWithdrawn       = "DrainWithdrawn"
	ReasonConfigError          = "ConfigError"
	ReasonMigrationRequested   = "MigrationRequested"
	ReasonMigrationCreated     = "MigrationCreated"
	ReasonShutdownRequested    = "ShutdownRequested"
	ReasonExternalRequested    = "ExternalEvictionRequested"
	ReasonBlocked              = "DrainBlocked"
	ReasonEvictionRefused      = "EvictionRefused"
	ReasonEvacuationCancelled  = "EvacuationCancelled"
	ReasonNodeReenabled        = "NodeReenabled"
	ReasonNodeUpdateFailed     = "NodeUpdateFailed"
	ReasonShutdownDelayed      = "ShutdownDelayed"
	ReasonShutdownReleased     = "ShutdownReleased"
	ReasonShutdownNotHeld      = "ShutdownNotHeld"
	ReasonShutdownHeldBlind    = "ShutdownHeldBlind"
	ReasonShutdownBlockedByVMs = "ShutdownBlocked"
)

// ReasonEvacuationNotCancelled: a withdrawn drain's evacuation that KubeVirt would not
// cancel (no evacuate/cancel before v1.8, or the request was refused).
const ReasonEvacuationNotCancelled = "EvacuationNotCancelled"

// outcome is what acting on a VM left it as, for the status, until the cluster shows it.
type outcome struct {
	state  VMState
	detail string
}

// act does what the decision says for a VM that the drain has not acted on yet: the
// requests that resolve asks for, one after the other, then what resolve maps their
// answers to (state, event, metric). migrations are the VMI's migrations, read once
// per sync. retry says the VM was refused: act on it again only after its backoff.
func (e *Engine) act(ctx context.Context, node *corev1.Node, v *vm, d Decision, migrations []kubevirtv1.VirtualMachineInstanceMigration) (o outcome, retry bool) {
	log := e.vmLog(v).WithFields(map[string]any{"strategy": d.Strategy, "action": d.Action})
	var pod *corev1.Pod
	if d.Action != ActionNone {
		if pod = v.sourcePod(); pod == nil {
			return outcome{StatePending, "no virt-launcher pod on the node yet"}, false
		}
		log = log.WithField("pod", pod.Name)
	}
	if d.Action == ActionMigrate {
		if name, ok := hasUnfinishedMigration(v.vmi, migrations); ok {
			log.WithField("migration", name).Debug("a migration is already under way; not requesting another")
			return outcome{StateMigrating, "migration " + name + " under way"}, false
		}
		// A failed evacuation migration is retried at KubeVirt's pace, not at every
		// look at the node (KubeVirt would hold an earlier one Pending anyway).
		if wait, failures := migrationBackoff(migrations, e.opts.Clock.Now()); wait > 0 {
			log.WithFields(logrus.Fields{"failures": failures, "retryIn": wait.Round(time.Second).String()}).Debug("migration failed; waiting out KubeVirt's backoff")
			return outcome{StatePending, fmt.Sprintf("%s failed; the next one in %s (KubeVirt's backoff: 20s, doubling)",
				plural(failures, "migration"), wait.Round(time.Second))}, false
		}
	}
	var dry, ev *answer
	for {
		vd := resolve(node.Name, d, dry, ev)
		switch vd.next {
		case callDryRun:
			a := e.evictor.evict(ctx, pod, true)
			dry = &a
		case callEvict:
			a := e.evictor.evict(ctx, pod, false)
			ev = &a
		case callCreateMigration:
			// KubeVirt's evacuation controller migrates the VMs of a node with its own
			// drain taint, webhook or not: a migration of the agent's would race it
			// into a second one.
			if cfg, _ := e.view.Config(); cfg.KubeVirtDrainTaintKey != "" && HasDrainTaint(node, cfg.KubeVirtDrainTaintKey) {
				log.WithField("taintKey", cfg.KubeVirtDrainTaintKey).Debug("eviction not intercepted; KubeVirt's evacuation controller migrates it")
				return outcome{StateMigrating, "KubeVirt's evacuation controller migrates it (taint " + cfg.KubeVirtDrainTaintKey + ")"}, false
			}
			name, err := e.createMigration(ctx, v.vmi)
			if err != nil {
				log.WithError(err).Warn("creating a migration failed; retrying with a backoff")
				return outcome{StatePending, "creating a migration failed"}, true
			}
			e.metrics.Requests.WithLabelValues(string(ActionMigrate), "migration-created").Inc()
			e.recorder.Eventf(v.vmi, corev1.EventTypeNormal, ReasonMigrationCreated, "Eviction not intercepted by KubeVirt; created migration %s to leave node %s", name, node.Name)
			log.WithField("migration", name).Info("eviction not intercepted by KubeVirt; migration created")
			return outcome{StateMigrating, "migration " + name + " created"}, false
		default:
			e.record(node, v, d, vd, log)
			return outcome{vd.state, vd.detail}, vd.retry
		}
	}
}

// record reports a verdict: the metric, the event on the VMI (a warning once per VM
// and cause during a drain), the log.
func (e *Engine) record(node *corev1.Node, v *vm, d Decision, vd verdict, log logrus.FieldLogger) {
	if vd.outcome != "" {
		e.metrics.Requests.WithLabelValues(string(d.Action), vd.outcome).Inc()
	}
	if vd.event == "" {
		return
	}
	if !vd.warning {
		e.recorder.Event(v.vmi, vd.eventType(), vd.event, vd.message)
		log.Info(vd.message)
		return
	}
	e.warnOnce(v, vd.event+"/"+vd.cause, func() {
		if v.vmi != nil {
			e.recorder.Event(v.vmi, vd.eventType(), vd.event, vd.message)
		}
		if vd.event == ReasonBlocked {
			e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonBlocked, "%s cannot leave the node: %s", describe(v), vd.detail)
		}
		log.WithField("reason", vd.detail).Warn(vd.message)
	})
}

// warnOnce runs report the first time this VM meets this cause during a drain.
func (e *Engine) warnOnce(v *vm, cause string, report func()) {
	e.warnedMu.Lock()
	causes := e.warned[v.key]
	if causes == nil {
		causes = sets{}
		e.warned[v.key] = causes
	}
	_, done := causes[cause]
	causes[cause] = struct{}{}
	e.warnedMu.Unlock()
	if !done {
		report()
	}
}

// forgetWarned drops what was reported about VMs no longer on the node.
func (e *Engine) forgetWarned(present map[string]bool) {
	e.warnedMu.Lock()
	defer e.warnedMu.Unlock()
	for key := range e.warned {
		if !present[key] {
			delete(e.warned, key)
		}
	}
}

// withdrawRetryFor is how long a withdraw is retried (with the queue's backoff, up to
// 30 s apart) after answers that may change: virt-api or the API server restarting or
// overloaded, a timeout, no connection. After it, or at once for any other refusal,
// what was not undone is reported and the withdraw completes.
const withdrawRetryFor = 2 * time.Minute

// withdrawProgress is what a withdraw retried over several syncs has done so far.
type withdrawProgress struct {
	failingSince time.Time       // first answer that may change; zero if none yet
	cancelled    map[string]bool // evacuations cancelled by an earlier try
}

// retry says whether the withdraw should be tried again after err, now.
func (w *withdrawProgress) retry(err error, now time.Time) bool {
	if !transient(err) {
		return false
	}
	if w.failingSince.IsZero() {
		w.failingSince = now
	}
	return now.Sub(w.failingSince) < withdrawRetryFor
}

func (w *withdrawProgress) done(key string) {
	if w.cancelled == nil {
		w.cancelled = map[string]bool{}
	}
	w.cancelled[key] = true
}

// transient says whether a request's failure may go away by itself: the server is
// unavailable, overloaded or timed out, or there was no answer at all.
func transient(err error) bool {
	var status apierrors.APIStatus
	if !errors.As(err, &status) {
		return true // no answer from the server: a connection or transport error
	}
	return apierrors.IsServiceUnavailable(err) || apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) ||
		apierrors.IsTooManyRequests(err) || apierrors.IsInternalError(err) || status.Status().Code >= http.StatusInternalServerError
}

// withdraw ends a drain whose trigger went away: nothing new is started, the
// evacuations this drain requested are cancelled and the migrations the agent created
// itself are deleted. What cannot be undone (a KubeVirt without evacuate/cancel, a
// refused request) is named in events and the log, and does not hold the withdraw up:
// the record is cleared and the node is reported as not draining whatever KubeVirt
// answers.
func (e *Engine) withdraw(ctx context.Context, node *corev1.Node, rec *DrainRecord) error {
	vmis := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, vmi := range e.view.VMIs() {
		vmis[vmi.Namespace+"/"+vmi.Name] = vmi
	}
	keys := make([]string, 0, len(rec.Requested))
	for key := range rec.Requested {
		keys = append(keys, key)
	}
	sort.Strings(keys)
	cancelled := 0
	var left []string // what could not be undone, for the node's event
	for _, key := range keys {
		vmi, ok := vmis[key]
		// Whatever the action recorded: KubeVirt's webhook turns the eviction of a VM
		// the agent meant to shut down into an evacuation when the VM has become
		// migratable since, and that evacuation is this drain's too.
		if !ok || rec.Requested[key] == ActionNone || vmi.Status.EvacuationNodeName != node.Name {
			continue
		}
		if e.withdrawing.cancelled[key] {
			cancelled++ // by an earlier try of this withdraw; the cache does not show it yet
			continue
		}
		log := e.log.WithFields(logrus.Fields{"namespace": vmi.Namespace, "vmi": vmi.Name})
		if err := CancelEvacuation(ctx, e.clients.Subresources, vmi.Namespace, vmi.Name, node.Name); err != nil {
			if ctx.Err() != nil {
				return err
			}
			if e.withdrawing.retry(err, e.opts.Clock.Now()) {
				log.WithError(err).Warn("cancelling the evacuation failed for now; retrying the withdraw")
				return fmt.Errorf("withdrawing the drain: %w", err)
			}
			why := cancelFailure(err)
			left = append(left, fmt.Sprintf("evacuation of %s (%s)", key, why))
			e.metrics.Withdrawals.WithLabelValues("evacuation", "failed").Inc()
			e.recorder.Eventf(vmi, corev1.EventTypeWarning, ReasonEvacuationNotCancelled, "Drain of node %s withdrawn, but the evacuation could not be cancelled: KubeVirt may still migrate the VM: %s", node.Name, why)
			log.WithError(err).Warn("drain withdrawn, but the evacuation could not be cancelled: KubeVirt may still migrate the VM")
			continue
		}
		cancelled++
		e.withdrawing.done(key)
		e.metrics.Withdrawals.WithLabelValues("evacuation", "cancelled").Inc()
		e.recorder.Eventf(vmi, corev1.EventTypeNormal, ReasonEvacuationCancelled, "Drain of node %s withdrawn: evacuation cancelled", node.Name)
		log.Info("evacuation cancelled")
	}
	deleted, failed, err := deleteOwnMigrations(ctx, e.clients.KubeVirt, node.Name)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		if e.withdrawing.retry(err, e.opts.Clock.Now()) {
			e.log.WithError(err).Warn("listing the migrations the agent created failed for now; retrying the withdraw")
			return fmt.Errorf("withdrawing the drain: %w", err)
		}
		left = append(left, "the migrations the agent created ("+err.Error()+")")
		e.metrics.Withdrawals.WithLabelValues("migration", "failed").Inc()
		e.log.WithError(err).Warn("drain withdrawn, but the migrations the agent created could not be listed: they go on")
	}
	for _, key := range deleted {
		e.metrics.Withdrawals.WithLabelValues("migration", "deleted").Inc()
		e.log.WithField("migration", key).Info("migration the agent created deleted")
	}
	for key, err := range failed {
		left = append(left, "migration "+key+" ("+err.Error()+")")
		e.metrics.Withdrawals.WithLabelValues("migration", "failed").Inc()
		e.log.WithError(err).WithField("migration", key).Warn("drain withdrawn, but a migration the agent created could not be deleted: it goes on")
	}
	sort.Strings(left)
	if err := e.writeRecord(ctx, node.Name, nil); err != nil {
		return err
	}
	e.withdrawing = withdrawProgress{}
	if e.pods != nil {
		e.pods.Stop()
	}
	if rec.Completed == nil || len(left) > 0 {
		msg := fmt.Sprintf("Drain withdrawn: %s cancelled, %s the agent created deleted", plural(cancelled, "evacuation"), plural(len(deleted), "migration"))
		kind := corev1.EventTypeNormal
		if len(left) > 0 {
			kind = corev1.EventTypeWarning
			msg += "; not undone: " + strings.Join(left, "; ")
		}
		e.recorder.Event(node, kind, ReasonDrainWithdrawn, msg)
		e.log.WithFields(logrus.Fields{"cancelled": cancelled, "migrationsDeleted": len(deleted), "notUndone": left}).Info("drain withdrawn")
	}
	return nil
}
