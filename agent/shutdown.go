package agent

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"

	"github.com/node-agent/node-agent/systemd"
)

// ShutdownSource is the shutdown lock holder's state as the engine follows it:
// systemd.HolderClient for the holder in its own container (`node-agent inhibit`), or a
// systemd.Holder in the engine's own process. The engine holds no lock itself: a crash of
// the engine must not drop it.
type ShutdownSource interface {
	State() (systemd.ShutdownState, <-chan struct{})
}

var (
	_ ShutdownSource       = (*systemd.Holder)(nil)
	_ ShutdownSource       = (*systemd.HolderClient)(nil)
	_ systemd.SafeChecker  = (*Engine)(nil)
	_ systemd.NodeReporter = (*Engine)(nil)
)

// shutdownTrack is the host shutdown the engine follows.
type shutdownTrack struct {
	active   bool
	since    time.Time
	deadline time.Time
	// delayed, notHeld: the ShutdownDelayed / ShutdownNotHeld events sent for it (the
	// reason of the last ShutdownNotHeld).
	delayed  bool
	notHeld  string
	released bool // the release was seen (and reported unless it came before this process)
	// from is when this process began following the lock holder: a release made before
	// it (the engine restarted after the holder released) is not reported again; one
	// made after it is this process's to report, even if the holder released before
	// the engine first saw the shutdown (a node with nothing to drain).
	from time.Time
	// confirmed: the holder has reached logind once (a shutdown an earlier agent recorded
	// on the Node and that logind does not prepare is then given back).
	confirmed bool
}

// RunShutdown follows the lock holder until ctx ends: on a host shutdown it takes the
// node out of service (drain taint and cordon, recorded as the agent's own) and drains
// it; the holder keeps the shutdown until the node is safe or the deadline. After a
// restart of the engine, a shutdown under way is picked up where it is and the drain
// carries on. A shutdown under way that no lock of ours holds is reported loudly
// (ShutdownNotHeld, metric, readiness). On a cancelled shutdown the engine undoes what
// it added and withdraws the drain. timeout (--shutdown-timeout) is the deadline when
// the holder knows none.
func (e *Engine) RunShutdown(ctx context.Context, src ShutdownSource, timeout time.Duration) {
	tr := shutdownTrack{from: e.opts.Clock.Now()}
	for {
		st, changed := src.State()
		e.followShutdown(ctx, st, &tr, timeout)
		_, statusChanged := e.Status()
		if !tr.active {
			statusChanged = nil
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-statusChanged: // the VMs left, for the events
		}
	}
}

func (e *Engine) followShutdown(ctx context.Context, st systemd.ShutdownState, tr *shutdownTrack, timeout time.Duration) {
	unheld, why := st.Unheld()
	e.mu.Lock()
	e.notHeld = why
	e.mu.Unlock()
	e.metrics.ShutdownNotHeld.Set(boolFloat(unheld))
	if !tr.confirmed && st.Reachable && st.Connected {
		tr.confirmed = true
		if !st.ShuttingDown {
			// Gives back a shutdown an earlier agent recorded on the Node that was
			// cancelled while no agent ran; harmless when there is none.
			e.ShutdownCancelled()
		}
	}
	if !st.ShuttingDown {
		if tr.active && st.Reachable {
			e.log.Info("host shutdown cancelled")
			*tr = shutdownTrack{confirmed: tr.confirmed, from: tr.from}
			e.ShutdownCancelled()
		}
		return
	}
	if !tr.active || !st.Since.Equal(tr.since) {
		deadline := st.Deadline
		if deadline.IsZero() {
			deadline = st.Since.Add(timeout)
		}
		// A release the holder made before this process began following it (the
		// engine restarted after it) is not reported again.
		*tr = shutdownTrack{active: true, confirmed: tr.confirmed, from: tr.from, since: st.Since, deadline: deadline,
			released: st.Released && st.ReleaseOutcome != systemd.OutcomeUnheld && st.ReleasedAt.Before(tr.from)}
		e.hostShutdown(st, deadline)
	}
	status, _ := e.Status()
	if unheld && why != tr.notHeld && status.Ready { // once the VMs left are known
		tr.notHeld = why
		e.reportNotHeld(status, why)
	}
	if !unheld && st.Held && !st.Released && !tr.delayed && status.Draining && len(status.VMs) > 0 {
		if node, err := e.view.Node(); err == nil {
			e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonShutdownDelayed, "Host shutdown held until the node is safe (at most until %s): %d VMs left",
				tr.deadline.Format(time.RFC3339), len(status.VMs))
			tr.delayed = true
		}
	}
	if st.Released && !tr.released {
		tr.released = true
		e.reportReleased(st, status)
	}
}

// hostShutdown records the intent for a shutdown the holder reported: sync takes the
// node out of service and drains it.
func (e *Engine) hostShutdown(st systemd.ShutdownState, deadline time.Time) {
	log := e.log.WithFields(logrus.Fields{"since": st.Since.Format(time.RFC3339Nano), "deadline": deadline.Format(time.RFC3339), "held": st.Held})
	log.Info("host shutdown: taking the node out of service and draining it")
	e.ShutdownStarted(st.Since, deadline)
}

// vmsLeft names the VMs of a status, for events and logs.
func vmsLeft(st NodeStatus) []string {
	var left []string
	for _, v := range st.VMs {
		left = append(left, fmt.Sprintf("%s/%s (%s, %s)", v.Namespace, v.Name, v.Strategy, v.State))
	}
	return left
}

// reportNotHeld says loudly that the host is going down with no lock of ours holding it.
func (e *Engine) reportNotHeld(st NodeStatus, why string) {
	left := vmsLeft(st)
	e.log.WithFields(logrus.Fields{"notHeld": why, "left": left}).Error("host shutdown under way that no lock of ours holds: the VMs left go down with the host")
	node, err := e.view.Node()
	if err != nil {
		return
	}
	what := "no VM left on the node"
	if len(left) > 0 {
		what = fmt.Sprintf("%d VMs left: %s", len(left), strings.Join(left, ", "))
	}
	e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonShutdownNotHeld, "Host shutdown under way and NOT held by node-agent (%s); it proceeds without waiting for the drain, %s", why, what)
}

// reportReleased reports the holder's release of the shutdown.
func (e *Engine) reportReleased(st systemd.ShutdownState, status NodeStatus) {
	outcome := st.ReleaseOutcome
	e.metrics.ShutdownReleases.WithLabelValues(outcome).Inc()
	if outcome == systemd.OutcomeUnheld {
		return // reportNotHeld said it
	}
	held := st.ReleasedAt.Sub(st.Since)
	e.metrics.ShutdownDelay.Observe(held.Seconds())
	log := e.log.WithFields(logrus.Fields{"held": held.Round(time.Millisecond).String(), "outcome": outcome})
	node, err := e.view.Node()
	if err != nil {
		log.WithError(err).Warn("shutdown released; cannot read the node for the event")
		return
	}
	if outcome == systemd.OutcomeSafe {
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonShutdownReleased, "Host shutdown released after %s: no VM left on the node", held.Round(time.Second))
		log.Info("node is safe: shutdown released")
		return
	}
	left := vmsLeft(status)
	e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonShutdownReleased, "Host shutdown released at the deadline after %s with %d VMs left: %s",
		held.Round(time.Second), len(left), strings.Join(left, ", "))
	log.WithField("left", left).Warn("deadline reached: shutdown released with VMs left")
}

// ShuttingDown says whether a host shutdown is under way.
func (e *Engine) ShuttingDown() bool { return e.shutdownPending() }

// ShutdownNotHeld says why a host shutdown under way is not held by a lock of ours;
// empty when none is under way or it is held.
func (e *Engine) ShutdownNotHeld() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.notHeld
}

// WaitSafe answers whether the node is safe to power off (as /safe-to-shutdown does),
// waiting up to wait for it to become safe. A lock holder in the engine's own process
// asks it.
func (e *Engine) WaitSafe(ctx context.Context, wait time.Duration) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		st, changed := e.Status()
		if st.ReadyToPowerOff() {
			return true, nil
		}
		select {
		case <-ctx.Done():
			return false, nil
		case <-changed:
		}
	}
}

// blindGrace is how long the view may be not synced before a held shutdown is reported
// as held blind.
const blindGrace = 10 * time.Second

// notSynced reports an engine that cannot read everything it watches (the VMIs refused
// by RBAC, KubeVirt's CRD missing, the API server not answering): not ready, with the
// reason. With proofOK, the node is still safe to power off when the virt-launcher pods
// were listed and none runs on the node (without it, as when the API server does not
// answer, that list may be out of date); else a host shutdown stays held (until the
// deadline), and a Warning event says why.
func (e *Engine) notSynced(why string, proofOK bool) {
	blind := ""
	if proofOK && e.view.LauncherPodsListed() && len(e.view.LauncherPods()) == 0 {
		blind = "no virt-launcher pod on the node, although the agent cannot read everything (" + why + ")"
	}
	e.metrics.ViewSynced.Set(0)
	e.setStatus(func(s *NodeStatus) {
		s.Ready, s.Reason, s.SafeBlind, s.Safe = false, why, blind, blind != ""
		if blind != "" {
			s.VMs = []VMStatus{}
		}
	})
	now := e.opts.Clock.Now()
	e.mu.Lock()
	if e.blindSince.IsZero() {
		e.blindSince = now
	}
	// The informers' first list at start takes moments: only a view that stays blind
	// (refused, missing) is reported.
	report := e.intent.pending && now.Sub(e.blindSince) >= blindGrace && e.blindReported != why+blind
	if report {
		e.blindReported = why + blind
	}
	e.mu.Unlock()
	if !report {
		return
	}
	log := e.log.WithField("reason", why)
	if blind != "" {
		log.Warn("host shutdown: the agent cannot read everything, but no virt-launcher pod runs on the node: safe to power off")
		return
	}
	log.Error("host shutdown held although the agent cannot read the node's VMs: it is held until the deadline or until they can be read")
	if node, err := e.view.Node(); err == nil {
		e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonShutdownHeldBlind,
			"Host shutdown held although node-agent cannot see the node's VMs (%s): virt-launcher pods may be on the node; held until the deadline or until they can be read", why)
	}
}

// NodeVMs reports the VMs on the node and the drain taint key in force, for a lock
// holder in block mode in the engine's own process.
func (e *Engine) NodeVMs(context.Context) (int, string, error) {
	st, _ := e.Status()
	if !st.Ready {
		return 0, "", fmt.Errorf("not ready: %s", st.Reason)
	}
	return len(st.VMs), st.TaintKey, nil
}

// HoldWhileShuttingDown blocks, while a host shutdown is under way, until the node is
// safe, the shutdown's deadline passes, the shutdown is cancelled, or ctx ends; it
// returns at once otherwise. The agent calls it on SIGTERM, so that the drain goes on
// while the kubelet's graceful node shutdown stops the agent's pod.
func (e *Engine) HoldWhileShuttingDown(ctx context.Context) {
	e.mu.Lock()
	deadline := e.intent.deadline
	e.mu.Unlock()
	timer := e.opts.Clock.NewTimer(deadline.Sub(e.opts.Clock.Now()))
	defer timer.Stop()
	for e.shutdownPending() && e.opts.Clock.Now().Before(deadline) {
		st, changed := e.Status()
		if st.Draining && st.Trigger == TriggerShutdown && st.Safe {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-timer.C():
			return
		case <-changed:
		}
	}
}
