package agent

import (
	"context"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
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
	ReasonShutdownBlockedByVMs = "ShutdownBlocked"
)

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

// withdraw ends a drain whose trigger went away: nothing new is started, and the
// evacuations this drain requested are cancelled.
func (e *Engine) withdraw(ctx context.Context, node *corev1.Node, rec *DrainRecord) error {
	vmis := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, vmi := range e.view.VMIs() {
		vmis[vmi.Namespace+"/"+vmi.Name] = vmi
	}
	cancelled := 0
	for key, action := range rec.Requested {
		vmi, ok := vmis[key]
		if !ok || (action != ActionMigrate && action != ActionExternal) || vmi.Status.EvacuationNodeName != node.Name {
			continue
		}
		if err := CancelEvacuation(ctx, e.clients.Subresources, vmi.Namespace, vmi.Name, node.Name); err != nil {
			return err
		}
		cancelled++
		e.recorder.Eventf(vmi, corev1.EventTypeNormal, ReasonEvacuationCancelled, "Drain of node %s withdrawn: evacuation cancelled", node.Name)
		e.log.WithFields(logrus.Fields{"namespace": vmi.Namespace, "vmi": vmi.Name}).Info("evacuation cancelled")
	}
	if err := e.writeRecord(ctx, node.Name, nil); err != nil {
		return err
	}
	if e.pods != nil {
		e.pods.stop()
	}
	if rec.Completed == nil {
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonDrainWithdrawn, "Drain withdrawn: %d evacuations cancelled", cancelled)
		e.log.WithField("cancelled", cancelled).Info("drain withdrawn")
	}
	return nil
}
