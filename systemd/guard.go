// Package systemd holds the host's shutdown with a systemd-logind inhibitor lock while the agent
// moves the node's virtual machines away.
//
// A Guard takes a logind "delay" lock for "shutdown" (which covers reboot and halt) over the
// system D-Bus with go-systemd's login1, keeps the lock's file open (closing it releases the
// lock), raises logind's InhibitDelayMaxSec to the wanted delay when it is smaller (a
// logind.conf.d drop-in and a reload, never lowering a larger value), and reports
// PrepareForShutdown as Events. It reconnects when the bus or logind goes away and takes the lock
// again; without a bus it keeps trying and reports a degraded Status.
//
// The consumer declares the small interface it needs, e.g.
//
//	type shutdownGuard interface {
//		Events() <-chan systemd.Event
//		Release()
//		Status() systemd.Status
//	}
package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
)

// phase is where the Guard is in a shutdown.
type phase int

const (
	idle     phase = iota // no shutdown: the lock is held (or being taken)
	holding               // PrepareForShutdown(true) seen: the lock holds the shutdown
	released              // Release gave the lock up: the shutdown proceeds
)

// Guard holds a logind inhibitor lock for the agent. Create it with New, run it with Run.
type Guard struct {
	opts    Options
	dial    dialer
	events  chan Event
	running atomic.Bool

	// reloaded: this Guard has had logind reload its drop-in (Run's goroutine only).
	reloaded bool

	mu     sync.Mutex // guards the fields below; never held across a D-Bus call
	phase  phase
	locks  []*os.File
	status Status
}

// New returns a Guard for the system bus (DBUS_SYSTEM_BUS_ADDRESS, default
// /run/dbus/system_bus_socket). Nothing happens until Run.
func New(opts Options) *Guard {
	return newGuard(opts, dialSystemBus)
}

func newGuard(opts Options, dial dialer) *Guard {
	opts = opts.withDefaults()
	return &Guard{
		opts:   opts,
		dial:   dial,
		events: make(chan Event, 16),
		status: Status{Mode: opts.Mode, Degraded: "not started", Since: opts.Clock.Now()},
	}
}

// Events delivers ShutdownStarted and ShutdownCancelled. Read it continuously: Run waits for the
// reader. It is closed when Run returns.
func (g *Guard) Events() <-chan Event { return g.events }

// Status returns the Guard's current state.
func (g *Guard) Status() Status {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.status
}

// Release gives the lock up during a shutdown, so that logind proceeds at once: call it when the
// node is safe or at the deadline. Outside a shutdown it does nothing (the lock stays). The lock
// is taken again if the shutdown is cancelled.
func (g *Guard) Release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.phase != holding {
		g.opts.Log.WithField("phase", g.phase).Info("Release without a shutdown being held: nothing to release")
		return
	}
	closeAll(g.locks)
	g.locks = nil
	g.phase = released
	g.status.LockHeld = false
	g.status.Released = true
	g.opts.Log.Info("released the shutdown inhibitor lock: the shutdown proceeds")
}

// Run connects to the bus, takes the lock, and follows logind until ctx ends; it reconnects with
// backoff whenever the bus or logind goes away. D-Bus failures never end it: they show in
// Status. It returns an error only for invalid Options or a second call; when ctx ends it
// releases the lock, closes Events and returns nil.
func (g *Guard) Run(ctx context.Context) error {
	if err := g.opts.validate(); err != nil {
		return fmt.Errorf("logind guard: %w", err)
	}
	if !g.running.CompareAndSwap(false, true) {
		return errors.New("logind guard: Run called twice")
	}
	defer g.stop()
	backoff := g.opts.RetryMin
	for {
		established, err := g.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if established {
			backoff = g.opts.RetryMin
		}
		g.setDegraded(err.Error())
		g.opts.Log.WithError(err).WithField("retryIn", backoff).Warn("logind guard degraded: reconnecting")
		select {
		case <-ctx.Done():
			return nil
		case <-g.opts.Clock.After(backoff):
		}
		backoff = min(2*backoff, g.opts.RetryMax)
	}
}

// session is one connection's life. established reports that it got as far as holding the lock.
func (g *Guard) session(ctx context.Context) (established bool, err error) {
	b, err := g.dial(ctx)
	if err != nil {
		return false, err
	}
	defer b.Close()
	if err := g.sync(ctx, b); err != nil {
		return false, err
	}
	for {
		select {
		case <-ctx.Done():
			return true, nil
		case s, ok := <-b.Signals():
			if !ok {
				return true, errors.New("system bus connection closed")
			}
			if err := g.handle(ctx, b, s); err != nil {
				return true, err
			}
		}
	}
}

// sync brings the Guard in line with the logind it (re)connected to: the lock first, then a
// shutdown that started or ended while it was not listening, then the delay.
func (g *Guard) sync(ctx context.Context, b bus) error {
	preparing, err := b.PreparingForShutdown(ctx)
	if err != nil {
		return err
	}
	g.mu.Lock()
	ph := g.phase
	g.mu.Unlock()
	if preparing {
		// logind takes no new lock now (OperationInProgress). Keep what is held; learn the
		// delay for the event's deadline.
		if err := g.adjustDelay(ctx, b); err != nil {
			return err
		}
		g.setConnected()
		if ph == idle {
			g.startShutdown(ctx, "logind was already preparing a shutdown")
		}
		return nil
	}
	if err := g.takeLocks(ctx, b); err != nil {
		if !isOperationInProgress(err) {
			return err
		}
		// A shutdown began just now; its PrepareForShutdown(true) is on its way.
		g.setConnected()
	} else if ph != idle {
		g.endShutdown(ctx, "logind has no shutdown pending any more")
	}
	return g.adjustDelay(ctx, b)
}

func (g *Guard) handle(ctx context.Context, b bus, s busSignal) error {
	switch {
	case s.prepare && s.active:
		g.startShutdown(ctx, "PrepareForShutdown(true)")
	case s.prepare:
		g.mu.Lock()
		ph, held := g.phase, len(g.locks) > 0
		g.mu.Unlock()
		var err error
		if !held {
			err = g.takeLocks(ctx, b)
		}
		if ph != idle {
			g.endShutdown(ctx, "PrepareForShutdown(false)")
		}
		return err
	case s.ownerChanged && s.owner == "":
		g.setDegraded("systemd-logind left the bus")
		g.opts.Log.Warn("systemd-logind left the bus; waiting for it to come back")
	case s.ownerChanged:
		g.opts.Log.WithField("owner", s.owner).Info("systemd-logind (re)started: taking the lock again")
		return g.sync(ctx, b)
	}
	return nil
}

// takeLocks takes a fresh set of locks and only then closes the previous ones, so there is no
// moment without a lock (a restarted logind may have kept the old ones).
func (g *Guard) takeLocks(ctx context.Context, b bus) error {
	var files []*os.File
	for _, mode := range g.opts.Mode.lockModes() {
		why := g.opts.Why
		if mode == "block" {
			why = g.opts.BlockWhy
		}
		f, err := b.Inhibit(ctx, "shutdown", g.opts.Who, why, mode)
		if err != nil {
			closeAll(files)
			return err
		}
		files = append(files, f)
	}
	g.mu.Lock()
	old := g.locks
	g.locks = files
	g.status.LockHeld = true
	g.setHealthyLocked()
	g.mu.Unlock()
	closeAll(old)
	g.opts.Log.WithField("who", g.opts.Who).WithField("mode", g.opts.Mode).Info("holding the logind shutdown inhibitor lock")
	return nil
}

func (g *Guard) startShutdown(ctx context.Context, why string) {
	g.mu.Lock()
	if g.phase != idle {
		g.mu.Unlock()
		return
	}
	g.phase = holding
	ev := Event{Type: ShutdownStarted, At: g.opts.Clock.Now()}
	if d := g.status.EffectiveDelay; d > 0 {
		ev.Deadline = ev.At.Add(d)
	}
	g.status.ShuttingDown, g.status.Released = true, false
	g.mu.Unlock()
	g.opts.Log.WithField("reason", why).WithField("deadline", ev.Deadline).Warn("host shutdown started: holding it until released")
	g.emit(ctx, ev)
}

func (g *Guard) endShutdown(ctx context.Context, why string) {
	g.mu.Lock()
	g.phase = idle
	g.status.ShuttingDown, g.status.Released = false, false
	g.mu.Unlock()
	g.opts.Log.WithField("reason", why).Info("host shutdown cancelled")
	g.emit(ctx, Event{Type: ShutdownCancelled, At: g.opts.Clock.Now()})
}

func (g *Guard) emit(ctx context.Context, ev Event) {
	select {
	case g.events <- ev:
	case <-ctx.Done():
	}
}

func (g *Guard) setHealthyLocked() {
	if !g.status.Connected || g.status.Degraded != "" {
		g.status.Since = g.opts.Clock.Now()
	}
	g.status.Connected, g.status.Degraded = true, ""
}

func (g *Guard) setConnected() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.setHealthyLocked()
}

// setDegraded records why the Guard cannot hold a shutdown now. Lock files are kept open: the
// logind that granted them may still honour them, and they are replaced on reconnection.
func (g *Guard) setDegraded(reason string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.status.Connected || g.status.Degraded != reason {
		g.status.Since = g.opts.Clock.Now()
	}
	g.status.Connected, g.status.LockHeld, g.status.Degraded = false, false, reason
}

// stop ends Run: the locks go (the agent is stopping) and Events is closed.
func (g *Guard) stop() {
	g.mu.Lock()
	closeAll(g.locks)
	g.locks = nil
	g.status.Connected, g.status.LockHeld, g.status.Degraded = false, false, "stopped"
	g.status.Since = g.opts.Clock.Now()
	g.mu.Unlock()
	close(g.events)
}

func closeAll(files []*os.File) {
	for _, f := range files {
		_ = f.Close()
	}
}

func (p phase) String() string {
	switch p {
	case idle:
		return "idle"
	case holding:
		return "holding"
	case released:
		return "released"
	}
	return fmt.Sprintf("phase(%d)", int(p))
}
