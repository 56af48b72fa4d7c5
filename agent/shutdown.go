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

// Inhibitor is what the shutdown path needs from logind (systemd.Guard provides it).
type Inhibitor interface {
	Events() <-chan systemd.Event
	Release()
	Status() systemd.Status
}

var _ Inhibitor = (*systemd.Guard)(nil)

// RunShutdown follows logind's shutdown notices until ctx ends: on a shutdown it takes
// the node out of service (drain taint and cordon, recorded as the agent's own), drains
// it, and releases the lock as soon as the node is safe or at the deadline; on a
// cancelled shutdown it undoes what it added and withdraws the drain. timeout is
// --shutdown-timeout; logind's own deadline, when earlier, wins.
//
// Until the inhibitor first reaches logind it also watches its status: when logind then
// prepares no shutdown, the engine is told (ShutdownCancelled), so that a shutdown an
// earlier agent recorded on the Node and that was cancelled while no agent ran gives the
// node back.
func (e *Engine) RunShutdown(ctx context.Context, inh Inhibitor, timeout time.Duration) {
	ticker := e.opts.Clock.NewTicker(250 * time.Millisecond)
	defer ticker.Stop()
	first := ticker.C()
	for {
		select {
		case <-ctx.Done():
			return
		case <-first:
			if st := inh.Status(); st.Connected {
				first = nil
				if !st.ShuttingDown {
					e.ShutdownCancelled()
				}
			}
		case ev, ok := <-inh.Events():
			first = nil
			if !ok {
				return
			}
			switch ev.Type {
			case systemd.ShutdownStarted:
				e.hostShutdown(ctx, inh, ev, timeout)
			case systemd.ShutdownCancelled:
				e.ShutdownCancelled()
			}
		}
	}
}

func (e *Engine) hostShutdown(ctx context.Context, inh Inhibitor, ev systemd.Event, timeout time.Duration) {
	deadline := ev.At.Add(timeout)
	if !ev.Deadline.IsZero() && ev.Deadline.Before(deadline) {
		deadline = ev.Deadline
	}
	log := e.log.WithField("deadline", deadline.Format(time.RFC3339))
	log.Info("host shutdown: taking the node out of service and draining it")
	e.ShutdownStarted(ev.At, deadline)
	safe, cancelled := e.waitSafe(ctx, inh.Events(), deadline)
	if cancelled {
		// logind will not shut down (it restarted and forgot the shutdown, say): there is
		// nothing to release, and the Guard holds its lock again.
		log.Info("host shutdown cancelled while it was held")
		e.ShutdownCancelled()
		return
	}
	held := e.opts.Clock.Since(ev.At)
	e.metrics.ShutdownDelay.Observe(held.Seconds())
	inh.Release()
	outcome := "deadline"
	if safe {
		outcome = "safe"
	}
	e.metrics.ShutdownReleases.WithLabelValues(outcome).Inc()
	node, err := e.view.Node()
	if err != nil {
		log.WithError(err).Warn("shutdown released; cannot read the node for the event")
		return
	}
	if safe {
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonShutdownReleased, "Host shutdown released after %s: no VM left on the node", held.Round(time.Second))
		log.WithField("held", held.Round(time.Millisecond).String()).Info("node is safe: shutdown released")
		return
	}
	st, _ := e.Status()
	var left []string
	for _, v := range st.VMs {
		left = append(left, fmt.Sprintf("%s/%s (%s, %s)", v.Namespace, v.Name, v.Strategy, v.State))
	}
	e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonShutdownReleased, "Host shutdown released at the deadline after %s with %d VMs left: %s",
		held.Round(time.Second), len(left), strings.Join(left, ", "))
	log.WithFields(logrus.Fields{"held": held.Round(time.Millisecond).String(), "left": left}).Warn("deadline reached: shutdown released with VMs left")
}

// ShuttingDown says whether a host shutdown is being held.
func (e *Engine) ShuttingDown() bool { return e.shutdownPending() }

// HoldWhileShuttingDown blocks, while a host shutdown is held, until the node is safe,
// the shutdown's deadline passes, the shutdown is cancelled, or ctx ends; it returns at
// once otherwise. The agent calls it on SIGTERM, so that the kubelet's graceful node
// shutdown waits on the agent's pod before it reaches the VMs' pods.
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

// waitSafe waits until the node is safe to power off or the deadline passes, or until
// events says the shutdown was cancelled (cancelled is true then).
func (e *Engine) waitSafe(ctx context.Context, events <-chan systemd.Event, deadline time.Time) (safe, cancelled bool) {
	timer := e.opts.Clock.NewTimer(deadline.Sub(e.opts.Clock.Now()))
	defer timer.Stop()
	reported := false
	for {
		st, changed := e.Status()
		if st.Draining && st.Trigger == TriggerShutdown && st.Safe {
			return true, false
		}
		if !reported && st.Draining && len(st.VMs) > 0 {
			if node, err := e.view.Node(); err == nil {
				e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonShutdownDelayed, "Host shutdown held until the node is safe (at most until %s): %d VMs left",
					deadline.Format(time.RFC3339), len(st.VMs))
				reported = true
			}
		}
		select {
		case <-ctx.Done():
			return false, false
		case <-timer.C():
			return false, false
		case ev, ok := <-events:
			if !ok {
				return false, false
			}
			if ev.Type == systemd.ShutdownCancelled {
				return false, true
			}
		case <-changed:
		}
	}
}
