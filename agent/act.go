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

// act does what the decision says for a VM that the drain has not acted on yet.
func (e *Engine) act(ctx context.Context, node *corev1.Node, v *vm, d Decision) (outcome, error) {
	log := e.vmLog(v).WithFields(map[string]any{"strategy": d.Strategy, "action": d.Action})
	if d.Action == ActionNone {
		e.warnOnce(v, ReasonBlocked+d.Reason, func() {
			if v.vmi != nil {
				e.recorder.Eventf(v.vmi, corev1.EventTypeWarning, ReasonBlocked, "Cannot leave node %s: %s", node.Name, d.Reason)
			}
			e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonBlocked, "%s cannot leave the node: %s", describe(v), d.Reason)
			log.WithField("reason", d.Reason).Warn("VM blocked: it will not be shut down and cannot migrate")
		})
		return outcome{StateBlocked, d.Reason}, nil
	}
	pod := v.sourcePod()
	if pod == nil {
		return outcome{StatePending, "no virt-launcher pod on the node yet"}, nil
	}
	if d.Action == ActionMigrate {
		migrations, err := e.view.Migrations(ctx, v.vmi.Namespace, v.vmi.Name)
		if err != nil {
			return outcome{StatePending, "cannot list its migrations"}, err
		}
		if name, ok := hasUnfinishedMigration(v.vmi, migrations); ok {
			log.WithField("migration", name).Debug("a migration is already under way; not requesting another")
			return outcome{StateMigrating, "migration " + name + " under way"}, nil
		}
	}
	if d.Action == ActionMigrate || d.Action == ActionExternal {
		// Probe first: where KubeVirt does not intercept the eviction it would delete
		// the pod, shutting down a VM that must migrate or be left to its controller.
		res, msg, err := e.evict(ctx, pod, true)
		if err != nil {
			return outcome{StatePending, msg}, err
		}
		switch res {
		case evicted:
			if d.Action == ActionExternal {
				reason := "KubeVirt does not intercept evictions (no eviction webhook): nothing marks it for the external controller"
				e.warnOnce(v, reason, func() {
					e.recorder.Eventf(v.vmi, corev1.EventTypeWarning, ReasonBlocked, "Cannot leave node %s: %s", node.Name, reason)
					log.Warn(reason)
				})
				return outcome{StateBlocked, reason}, nil
			}
			name, err := e.createMigration(ctx, v.vmi)
			if err != nil {
				return outcome{StatePending, "creating a migration failed"}, err
			}
			e.metrics.Requests.WithLabelValues(string(ActionMigrate), "migration-created").Inc()
			e.recorder.Eventf(v.vmi, corev1.EventTypeNormal, ReasonMigrationCreated, "Eviction not intercepted by KubeVirt; created migration %s to leave node %s", name, node.Name)
			log.WithField("migration", name).Info("eviction not intercepted by KubeVirt; migration created")
			return outcome{StateMigrating, "migration " + name + " created"}, nil
		case gone:
			return outcome{}, nil
		case notMigratable, refused:
			return e.refused(v, node, msg, res), nil
		}
	}
	res, msg, err := e.evict(ctx, pod, false)
	if err != nil {
		e.metrics.Requests.WithLabelValues(string(d.Action), "error").Inc()
		return outcome{StatePending, msg}, err
	}
	switch res {
	case evacuating:
		e.metrics.Requests.WithLabelValues(string(d.Action), "evacuation").Inc()
		reason, what := ReasonMigrationRequested, "KubeVirt evacuates it by live migration"
		if d.Action == ActionExternal {
			reason, what = ReasonExternalRequested, "KubeVirt marked it for the external controller"
		}
		e.recorder.Eventf(v.vmi, corev1.EventTypeNormal, reason, "Eviction from node %s requested: %s", node.Name, what)
		log.WithField("pod", pod.Name).Info("eviction requested: " + what)
		if d.Action == ActionExternal {
			return outcome{StateWaitingExternal, what}, nil
		}
		return outcome{StateMigrating, "evacuation requested"}, nil
	case evicted:
		e.metrics.Requests.WithLabelValues(string(d.Action), "evicted").Inc()
		e.recorder.Eventf(v.vmi, corev1.EventTypeNormal, ReasonShutdownRequested, "Evicted from node %s: the guest shuts down (evictionStrategy %s)", node.Name, d.Strategy)
		log.WithField("pod", pod.Name).Info("virt-launcher pod evicted: the guest shuts down")
		return outcome{StateShuttingDown, "evicted: the guest shuts down"}, nil
	case notMigratable, refused:
		return e.refused(v, node, msg, res), nil
	}
	return outcome{}, nil
}

func (e *Engine) refused(v *vm, node *corev1.Node, msg string, res evictionResult) outcome {
	label, state := "refused", StatePending
	if res == notMigratable {
		label, state = "not-migratable", StateBlocked
	}
	e.metrics.Requests.WithLabelValues("evict", label).Inc()
	e.warnOnce(v, ReasonEvictionRefused+msg, func() {
		e.recorder.Eventf(v.vmi, corev1.EventTypeWarning, ReasonEvictionRefused, "Eviction from node %s refused, retrying: %s", node.Name, msg)
		e.vmLog(v).WithField("reason", msg).Warn("eviction refused; retrying with a backoff")
	})
	return outcome{state, "eviction refused: " + msg}
}

// warnOnce runs report the first time this VM meets this reason during a drain.
func (e *Engine) warnOnce(v *vm, reason string, report func()) {
	key := v.key + "\x00" + reason
	e.warnedMu.Lock()
	_, done := e.warned[key]
	e.warned[key] = struct{}{}
	e.warnedMu.Unlock()
	if !done {
		report()
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
