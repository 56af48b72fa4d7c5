package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/fleet"
)

// A host shutdown's drain waits for its turn across the cluster (fleet.Turns): at most
// --max-concurrent-drains nodes drain for a host shutdown at once, first come first
// served. A node waiting its turn keeps the shutdown held (it is not safe: its VMs are
// on it), stays schedulable but carries the agent's PreferNoSchedule taint
// (TaintWaiting) so that migrated and restarted VMs prefer nodes that are not about to
// go, and says so: the status (/safe-to-shutdown, the state annotation), a
// DrainWaiting event, node_agent_drain_turn_waiting. When its turn comes and its VMs
// fit on the nodes that remain, it is taken out of service and drained; its slot is
// given back when it is safe or its shutdown is cancelled. A node with no VM does not
// wait. A node that waited MaxTurnWait drains out of turn (a Warning event says so):
// a host that powers off with its VMs on it is worse than one drain too many.

// TaintWaiting is the agent's own PreferNoSchedule taint on a node that waits for its
// turn to drain for a host shutdown.
const TaintWaiting = AnnotationPrefix + "shutdown-waiting"

// ReasonDrainWaiting and ReasonDrainOutOfTurn are the events of the turn.
const (
	ReasonDrainWaiting   = "DrainWaiting"
	ReasonDrainOutOfTurn = "DrainOutOfTurn"
)

// DefaultMaxTurnWait is the engine's MaxTurnWait unless set.
const DefaultMaxTurnWait = 5 * time.Minute

// capacityRecheck is how long a node first in line keeps the capacity check's "its
// VMs do not fit" before it reads the cluster again. The check lists every node and
// pod of the cluster (fleet.Fits), and the node is looked at again on every change of
// the queue's Leases (each waiting node renews its ticket every 10 s): without it, a
// fleet reboot would have the first in line list the whole cluster several times a
// second. Room comes back when a host returns from its reboot, minutes, not seconds.
const capacityRecheck = 10 * time.Second

// Turns gives a host shutdown's drain its turn across the cluster (fleet.Turns).
type Turns interface {
	Take(ctx context.Context, since time.Time, fits fleet.FitsFunc) (fleet.Turn, string, error)
	Release(ctx context.Context) error
	Holds() bool
	AddChangeHandler(f func())
}

var _ Turns = (*fleet.Turns)(nil)

// TurnStatus is where a node whose host shuts down stands in the cluster's queue, as
// /safe-to-shutdown and `node-agent status` show it.
type TurnStatus struct {
	// Waiting: the node waits for its turn; its drain has not begun.
	Waiting bool `json:"waiting"`
	// Position among the nodes waiting, from 1 (while waiting).
	Position int `json:"position,omitempty"`
	// Queue counts the nodes waiting.
	Queue int `json:"queue"`
	// Slots is --max-concurrent-drains; Draining names the nodes that hold them.
	Slots    int      `json:"slots"`
	Draining []string `json:"draining,omitempty"`
	// Slot is the slot this node holds (its turn).
	Slot string `json:"slot,omitempty"`
	// Reason says why a node first in line still waits (its VMs do not fit on the
	// nodes that remain; the queue cannot be read).
	Reason string `json:"reason,omitempty"`
	// OutOfTurn: the node waited MaxTurnWait and drains without a turn.
	OutOfTurn bool `json:"outOfTurn,omitempty"`
}

// String is the turn as `node-agent status` and the state annotation show it.
func (t *TurnStatus) String() string {
	if t == nil {
		return ""
	}
	switch {
	case t.OutOfTurn:
		return "draining out of turn: " + t.Reason
	case !t.Waiting:
		return "its turn (" + t.Slot + ")"
	}
	s := fmt.Sprintf("waiting for its turn to drain: %d of %d waiting", t.Position, t.Queue)
	if len(t.Draining) > 0 {
		s += fmt.Sprintf(", draining: %s (%d at a time)", strings.Join(t.Draining, ", "), t.Slots)
	}
	if t.Reason != "" {
		s += "; " + t.Reason
	}
	return s
}

// turnState is the engine's turn for the shutdown under way (under mu).
type turnState struct {
	gen       int // the shutdown notice it is for (e.gen)
	status    *TurnStatus
	announced bool      // DrainWaiting sent
	outOfTurn bool      // draining out of turn (DrainOutOfTurn sent)
	failing   time.Time // since when Take fails (zero while it does not)
	// noRoom is the capacity check's last "do not fit" and when it was read.
	noRoom   string
	noRoomAt time.Time
}

// awaitTurn says whether the node may be taken out of service for the pending host
// shutdown intent: its turn came, it has no VM to move, there is no queue (no Turns),
// or it waited MaxTurnWait. While it waits, the node carries TaintWaiting and the
// status says where it stands.
func (e *Engine) awaitTurn(ctx context.Context, node *corev1.Node, intent shutdownIntent) bool {
	if e.opts.Turns == nil {
		return true
	}
	if len(vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods())) == 0 {
		return true
	}
	e.mu.Lock()
	gen := e.gen
	if e.turn.gen != gen {
		e.turn = turnState{gen: gen}
	}
	e.mu.Unlock()
	log := e.log.WithField("since", intent.at.Format(time.RFC3339))
	now := e.opts.Clock.Now()
	e.mu.Lock()
	out := e.turn.outOfTurn
	e.mu.Unlock()
	if out {
		return true
	}
	if limit, why := e.turnWaitLimit(intent); now.Sub(intent.at) >= limit {
		e.drainOutOfTurn(node, log, fmt.Sprintf("no turn to drain came within %s (%s)", limit, why))
		return true
	}
	fits := func(ctx context.Context, draining, ahead, behind []string) (string, error) {
		e.mu.Lock()
		why, at := e.turn.noRoom, e.turn.noRoomAt
		e.mu.Unlock()
		if why != "" && now.Sub(at) < capacityRecheck {
			return why, nil
		}
		why, err := e.fits(ctx, e.clients.Kube, e.opts.NodeName, e.toPlace(node), draining, ahead, behind, ShutdownPendingOnNode)
		if err != nil {
			return "", capacityError{err}
		}
		e.mu.Lock()
		e.turn.noRoom, e.turn.noRoomAt = why, now
		e.mu.Unlock()
		return why, nil
	}
	turn, why, err := e.opts.Turns.Take(ctx, intent.at, fits)
	st := &TurnStatus{Waiting: !turn.Granted, Position: turn.Position, Queue: turn.Waiting, Slots: turn.Slots, Draining: turn.Draining, Slot: turn.Slot, Reason: why}
	e.mu.Lock()
	if err == nil {
		e.turn.failing = time.Time{}
	} else if e.turn.failing.IsZero() {
		e.turn.failing = now
	}
	failing := e.turn.failing
	e.mu.Unlock()
	if err != nil {
		// The queue cannot be used (RBAC, the namespace, the API server), or the
		// capacity check cannot read the cluster: a while, then the node drains as if
		// there were no queue.
		cause, waiting := "the queue of turns cannot be used: ", "the queue cannot be read or written: "
		if errors.As(err, new(capacityError)) {
			cause = "the capacity check cannot read the cluster: "
			waiting = cause
		}
		if now.Sub(failing) >= queueFailureGrace {
			e.drainOutOfTurn(node, log, cause+err.Error())
			return true
		}
		log.WithError(err).Warn("cannot take a turn to drain; waiting")
		st.Waiting, st.Reason = true, waiting+err.Error()
	}
	e.mu.Lock()
	e.turn.status = st
	announce := st.Waiting && !e.turn.announced
	if announce {
		e.turn.announced = true
	}
	e.mu.Unlock()
	e.metrics.TurnWaiting.Set(boolFloat(st.Waiting))
	if !st.Waiting {
		log.WithFields(logrus.Fields{"slot": st.Slot, "draining": st.Draining}).Info("host shutdown: its turn to drain")
		return true
	}
	if announce {
		log.WithFields(logrus.Fields{"position": st.Position, "queue": st.Queue, "draining": st.Draining, "reason": why}).Info("host shutdown: waiting for a turn to drain")
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonDrainWaiting, "Host shutdown held while the node waits for its turn to drain (%d at a time across the cluster): %s", e.opts.MaxConcurrentDrains, st)
	}
	if err := e.markWaiting(ctx, node, TriggerShutdown); err != nil {
		e.log.WithError(err).Warn("cannot add the waiting taint " + TaintWaiting)
	}
	after := e.opts.Resync
	if turn.Settling > 0 && turn.Settling < after {
		after = turn.Settling
	}
	e.queue.AddAfter(e.opts.NodeName, after)
	return false
}

// toPlace are the pods the node's VMs need on other nodes once it drains: for those to
// be live-migrated, and those shut down that their VirtualMachine starts again (an
// owner reference to one); a bare VMI shut down, or one left to an external
// controller, needs none. Each is its virt-launcher pod as KubeVirt renders the next
// one, from the VMI's current spec: the VMI's node selector (with KubeVirt's own
// kubevirt.io labels the pod asks for), affinity and tolerations, the pod's requests.
func (e *Engine) toPlace(node *corev1.Node) []*corev1.Pod {
	cfg, _ := e.view.Config()
	var out []*corev1.Pod
	for _, v := range vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods()) {
		pod := v.sourcePod()
		if v.vmi == nil || pod == nil {
			continue
		}
		d := decide(v, cfg)
		if d.Action == ActionMigrate || (d.Action == ActionShutdown && ownedByVM(v.vmi)) {
			out = append(out, nextPod(v.vmi, pod))
		}
	}
	return out
}

// nextPod is pod as KubeVirt would render it again for vmi (the target of a migration,
// the pod of a restarted VM): the placement fields from the VMI's spec, which may have
// changed since pod was made (a VM's node selector or affinity updated live).
func nextPod(vmi *kubevirtv1.VirtualMachineInstance, pod *corev1.Pod) *corev1.Pod {
	p := pod.DeepCopy()
	sel := map[string]string{}
	for k, v := range pod.Spec.NodeSelector {
		if strings.Contains(k, "kubevirt.io/") {
			sel[k] = v
		}
	}
	for k, v := range vmi.Spec.NodeSelector {
		sel[k] = v
	}
	p.Spec.NodeSelector = sel
	p.Spec.Affinity = vmi.Spec.Affinity.DeepCopy()
	p.Spec.Tolerations = append(append([]corev1.Toleration{}, pod.Spec.Tolerations...), vmi.Spec.Tolerations...)
	return p
}

func ownedByVM(vmi *kubevirtv1.VirtualMachineInstance) bool {
	for _, o := range vmi.OwnerReferences {
		if o.Kind == "VirtualMachine" {
			return true
		}
	}
	return false
}

// turnWaitLimit is how long after its shutdown began a node waits for its turn: at most
// MaxTurnWait, and at most half the time the shutdown is held (to its deadline), so
// that the other half is left for its own drain.
func (e *Engine) turnWaitLimit(intent shutdownIntent) (time.Duration, string) {
	if hold := intent.deadline.Sub(intent.at); !intent.deadline.IsZero() && hold/2 < e.opts.MaxTurnWait {
		return hold / 2, "half the shutdown's hold of " + hold.String()
	}
	return e.opts.MaxTurnWait, "--max-turn-wait"
}

// capacityError is an error of the capacity check (fleet.Fits) when the turn is to be
// taken, told apart from the queue's own in what the node says.
type capacityError struct{ err error }

func (e capacityError) Error() string { return e.err.Error() }
func (e capacityError) Unwrap() error { return e.err }

// queueFailureGrace is how long the queue may fail (its Leases cannot be read or
// written), or the capacity check, before a node drains without a turn.
const queueFailureGrace = 30 * time.Second

// drainOutOfTurn has the pending shutdown's drain start without a turn (why), said once.
func (e *Engine) drainOutOfTurn(node *corev1.Node, log logrus.FieldLogger, why string) {
	e.mu.Lock()
	e.turn.outOfTurn = true
	e.turn.status = &TurnStatus{OutOfTurn: true, Slots: e.opts.MaxConcurrentDrains, Reason: why}
	e.mu.Unlock()
	e.metrics.TurnWaiting.Set(0)
	log.WithField("reason", why).Warn("host shutdown: draining out of turn")
	e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonDrainOutOfTurn, "Host shutdown: %s; draining out of turn, so more than %d nodes may drain at once", why, e.opts.MaxConcurrentDrains)
}

// markWaiting adds the agent's PreferNoSchedule TaintWaiting to the Node, recorded as
// the agent's own (for reason, when the agent owned nothing yet).
func (e *Engine) markWaiting(ctx context.Context, node *corev1.Node, reason string) error {
	if hasTaint(node, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
		return nil
	}
	return e.updateNode(ctx, func(node *corev1.Node) bool {
		if hasTaint(node, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
			return false
		}
		var own Ownership
		if _, err := readAnnotation(node, AnnotationOwned, &own); err != nil {
			e.log.WithError(err).Warn("replacing the unreadable ownership annotation")
		}
		node.Spec.Taints = append(node.Spec.Taints, corev1.Taint{Key: TaintWaiting, Value: "shutdown", Effect: corev1.TaintEffectPreferNoSchedule})
		own.Waiting = true
		if own.BootID == "" {
			own.BootID, own.Reason, own.Since = node.Status.NodeInfo.BootID, reason, e.opts.Clock.Now().UTC()
		}
		setJSONAnnotation(node, AnnotationOwned, &own)
		return true
	})
}

func hasTaint(node *corev1.Node, key string, effect corev1.TaintEffect) bool {
	for _, t := range node.Spec.Taints {
		if t.Key == key && t.Effect == effect {
			return true
		}
	}
	return false
}

// keepTurn, during a host shutdown's drain: the slot is renewed while the node is not
// safe, and given back (with the ticket) once it is.
func (e *Engine) keepTurn(ctx context.Context, intent shutdownIntent, safe bool) {
	if e.opts.Turns == nil {
		return
	}
	if safe {
		e.releaseTurn(ctx)
		return
	}
	if !e.opts.Turns.Holds() {
		return
	}
	if _, _, err := e.opts.Turns.Take(ctx, intent.at, nil); err != nil {
		e.log.WithError(err).Warn("cannot renew the turn to drain")
	}
}

// releaseTurn gives back the node's slot and ticket, if it holds any.
func (e *Engine) releaseTurn(ctx context.Context) {
	if e.opts.Turns == nil {
		return
	}
	e.metrics.TurnWaiting.Set(0)
	if !e.opts.Turns.Holds() {
		return
	}
	if err := e.opts.Turns.Release(ctx); err != nil {
		e.log.WithError(err).Warn("cannot give back the turn to drain; it expires by itself")
		return
	}
	e.log.Info("turn to drain given back")
}

// turnStatus is the turn to show in the status while a host shutdown is pending.
func (e *Engine) turnStatus() *TurnStatus {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.intent.pending || e.turn.gen != e.gen || e.turn.status == nil {
		return nil
	}
	st := *e.turn.status
	return &st
}
