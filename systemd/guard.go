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
	notHeld               // a shutdown is under way that no lock of ours holds
	released              // Release gave the lock up: the shutdown proceeds
)

// notHeldAtConnect is why a shutdown found under way when (re)connecting without a lock of
// ours is not held: logind refuses new locks while it prepares a shutdown.
const notHeldAtConnect = "logind was already preparing the shutdown when this lock holder connected: " +
	"no lock of ours holds it (logind takes no new lock during a shutdown)"

// notHeldBusLost is why a held shutdown is reported as not held while the bus is gone.
const notHeldBusLost = "the system bus connection was lost during the shutdown: the hold cannot be confirmed"

// Guard holds a logind inhibitor lock for the agent. Create it with New, run it with Run.
type Guard struct {
	opts    Options
	dial    dialer
	events  chan Event
	running atomic.Bool

	// reloaded: this Guard has had logind reload its drop-in (Run's goroutine only).
	reloaded bool

	// blockCh wakes the session to apply blockWhy (ModeBlock).
	blockCh chan struct{}

	mu    sync.Mutex // guards the fields below; never held across a D-Bus call
	phase phase
	locks []*os.File // the delay lock
	block *os.File   // the block lock (ModeBlock, while SetBlock asks for it)
	// blockWhy is the block lock wanted (its reason); "" for none. blockHeldWhy is the
	// reason of the block lock held.
	blockWhy, blockHeldWhy string
	status                 Status
}

// New returns a Guard for the system bus (DBUS_SYSTEM_BUS_ADDRESS, default
// /run/dbus/system_bus_socket). Nothing happens until Run.
func New(opts Options) *Guard {
	return newGuard(opts, dialSystemBus)
}

func newGuard(opts Options, dial dialer) *Guard {
	opts = opts.withDefaults()
	return &Guard{
		opts:    opts,
		dial:    dial,
		events:  make(chan Event, 16),
		blockCh: make(chan struct{}, 1),
		status:  Status{Mode: opts.Mode, Degraded: "not started", Since: opts.Clock.Now()},
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
// node is safe or at the deadline. It reports whether a lock of ours was holding the shutdown
// and is now released; a shutdown that no lock of ours held is marked released without a claim
// (false). Outside a shutdown it does nothing (the lock stays). The lock is taken again if the
// shutdown is cancelled.
func (g *Guard) Release() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch g.phase {
	case holding:
	case notHeld:
		g.phase = released
		g.status.Released = true
		g.opts.Log.WithField("notHeld", g.status.NotHeld).Warn("the shutdown was not held by a lock of ours: nothing to release")
		return false
	default:
		g.opts.Log.WithField("phase", g.phase).Info("Release without a shutdown being held: nothing to release")
		return false
	}
	held := len(g.locks) > 0 && g.status.NotHeld == ""
	closeAll(g.locks)
	g.locks = nil
	g.closeBlockLocked()
	g.phase = released
	g.status.LockHeld = false
	g.status.Released = true
	if !held {
		g.opts.Log.WithField("notHeld", g.status.NotHeld).Warn("the shutdown was not held by a lock of ours: nothing to release")
		return false
	}
	g.status.NotHeld = ""
	g.opts.Log.Info("released the shutdown inhibitor lock: the shutdown proceeds")
	return true
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
	conn, err := g.dial(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	b := timedBus{bus: conn, timeout: g.opts.CallTimeout}
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
		case <-g.blockCh:
			if err := g.applyBlock(ctx, b); err != nil {
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
		g.mu.Lock()
		if g.phase == holding && len(g.locks) > 0 {
			// Our lock, kept across the lost connection, still holds it.
			g.status.NotHeld = ""
		}
		g.mu.Unlock()
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
	if err := g.adjustDelay(ctx, b); err != nil {
		return err
	}
	g.mu.Lock()
	g.blockHeldWhy = "" // a new connection (or logind): take the block lock again if wanted
	g.mu.Unlock()
	return g.applyBlock(ctx, b)
}

// SetBlock asks for the block lock (ModeBlock only) with why as its reason, or for none when
// why is empty. The lock holder calls it while VMs are on the node: logind then refuses a
// shutdown request outright, naming why. A change of why takes a new lock before the old one
// is closed.
func (g *Guard) SetBlock(why string) {
	if g.opts.Mode != ModeBlock {
		return
	}
	g.mu.Lock()
	g.blockWhy = why
	g.mu.Unlock()
	select {
	case g.blockCh <- struct{}{}:
	default:
	}
}

// applyBlock takes, replaces or closes the block lock to match blockWhy. During a shutdown
// nothing is taken (logind refuses it, and the shutdown is past blocking).
func (g *Guard) applyBlock(ctx context.Context, b bus) error {
	g.mu.Lock()
	why, held, ph := g.blockWhy, g.blockHeldWhy, g.phase
	g.mu.Unlock()
	if why == held && (why == "") == (g.blockFile() == nil) {
		return nil // as wanted
	}
	var f *os.File
	if why != "" && ph == idle {
		var err error
		if f, err = b.Inhibit(ctx, "shutdown", g.opts.Who, why, "block"); err != nil {
			if isOperationInProgress(err) {
				return nil
			}
			return err
		}
	}
	g.mu.Lock()
	old := g.block
	if old != nil {
		// Closed before the status says so: whoever reads "not held" finds it let go.
		_ = old.Close()
	}
	g.block, g.blockHeldWhy = f, why
	if f == nil {
		g.blockHeldWhy = ""
	}
	g.status.BlockHeld, g.status.BlockWhy = f != nil, g.blockHeldWhy
	g.mu.Unlock()
	if f != nil {
		g.opts.Log.WithField("why", why).Info("holding the logind block lock: shutdown requests are refused")
	} else if old != nil {
		g.opts.Log.Info("released the logind block lock: no VM on the node")
	}
	return nil
}

func (g *Guard) blockFile() *os.File {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.block
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
		if err != nil {
			return err
		}
		return g.applyBlock(ctx, b)
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
	f, err := b.Inhibit(ctx, "shutdown", g.opts.Who, g.opts.Why, "delay")
	if err != nil {
		return err
	}
	files := []*os.File{f}
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
	ev := Event{Type: ShutdownStarted, At: g.opts.Clock.Now(), Held: len(g.locks) > 0}
	if d := g.status.EffectiveDelay; d > 0 {
		ev.Deadline = ev.At.Add(d)
	}
	g.phase = holding
	if !ev.Held {
		g.phase, ev.NotHeld = notHeld, notHeldAtConnect
	}
	g.status.ShuttingDown, g.status.Released, g.status.NotHeld = true, false, ev.NotHeld
	g.mu.Unlock()
	log := g.opts.Log.WithField("reason", why).WithField("deadline", ev.Deadline)
	if ev.Held {
		log.Warn("host shutdown started: holding it until released")
	} else {
		log.WithField("notHeld", ev.NotHeld).Error("host shutdown under way that no lock of ours holds")
	}
	g.emit(ctx, ev)
}

func (g *Guard) endShutdown(ctx context.Context, why string) {
	g.mu.Lock()
	g.phase = idle
	g.status.ShuttingDown, g.status.Released, g.status.NotHeld = false, false, ""
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
	if g.phase == holding {
		g.status.NotHeld = notHeldBusLost
	}
}

// stop ends Run: the locks go (the agent is stopping) and Events is closed.
func (g *Guard) stop() {
	g.mu.Lock()
	closeAll(g.locks)
	g.locks = nil
	g.closeBlockLocked()
	g.status.Connected, g.status.LockHeld, g.status.Degraded = false, false, "stopped"
	g.status.Since = g.opts.Clock.Now()
	g.mu.Unlock()
	close(g.events)
}

func (g *Guard) closeBlockLocked() {
	if g.block != nil {
		_ = g.block.Close()
	}
	g.block, g.blockHeldWhy = nil, ""
	g.status.BlockHeld, g.status.BlockWhy = false, ""
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
	case notHeld:
		return "not-held"
	case released:
		return "released"
	}
	return fmt.Sprintf("phase(%d)", int(p))
}
