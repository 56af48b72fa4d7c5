package systemd

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/utils/clock"
)

// Release outcomes of a host shutdown (ShutdownState.ReleaseOutcome).
const (
	// OutcomeSafe: the drain engine said the node is safe; the lock was released.
	OutcomeSafe = "safe"
	// OutcomeDeadline: the deadline passed first; the lock was released with VMs maybe left.
	OutcomeDeadline = "deadline"
	// OutcomeUnheld: no lock of ours held the shutdown; nothing was released.
	OutcomeUnheld = "unheld"
)

// ShutdownState is what a lock holder knows about the host's shutdown; it is served as JSON on
// GET /v1/shutdown and followed by the drain engine.
type ShutdownState struct {
	// Generation changes with every change of the state (it starts from the holder's start
	// time, so a restarted holder never repeats one).
	Generation uint64 `json:"generation"`
	// HolderStarted is when the lock holder process started.
	HolderStarted time.Time `json:"holderStarted"`
	// Reachable is false when the engine cannot reach the holder (set by HolderClient only).
	Reachable bool `json:"reachable"`
	// Connected: the holder has a system bus connection on which logind answers.
	Connected bool `json:"connected"`
	// LockHeld: the holder holds its inhibitor lock(s) now.
	LockHeld bool `json:"lockHeld"`
	Mode     Mode `json:"mode"`
	// BlockHeld: the block lock is held (mode block, VMs on the node), with BlockWhy.
	BlockHeld bool   `json:"blockHeld,omitempty"`
	BlockWhy  string `json:"blockWhy,omitempty"`
	// ShuttingDown: logind announced a shutdown (PrepareForShutdown(true)) not cancelled since.
	ShuttingDown bool `json:"shuttingDown"`
	// Held: a shutdown is under way and a lock of ours holds it.
	Held bool `json:"held"`
	// NotHeld says why a shutdown under way is not held by a lock of ours.
	NotHeld string `json:"notHeld,omitempty"`
	// Since is when the holder saw the shutdown begin; Deadline is when it lets it go at the
	// latest (Since plus the effective delay; zero when unknown).
	Since    time.Time `json:"since,omitempty"`
	Deadline time.Time `json:"deadline,omitempty"`
	// Released: the shutdown was let go (ReleaseOutcome says how) at ReleasedAt.
	Released       bool      `json:"released"`
	ReleaseOutcome string    `json:"releaseOutcome,omitempty"`
	ReleasedAt     time.Time `json:"releasedAt,omitempty"`
	// Degraded says why the holder cannot hold a shutdown now.
	Degraded string `json:"degraded,omitempty"`
	// EffectiveDelay is how long a shutdown can be held (the smaller of --shutdown-timeout and
	// logind's InhibitDelayMaxSec); LogindDelay is logind's value. Both in seconds.
	EffectiveDelay float64 `json:"effectiveDelaySeconds"`
	LogindDelay    float64 `json:"logindDelaySeconds"`
	DelayProblem   string  `json:"delayProblem,omitempty"`
}

// Unheld reports whether a shutdown is under way that no lock of ours holds, and why.
func (s ShutdownState) Unheld() (bool, string) {
	switch {
	case !s.ShuttingDown:
		return false, ""
	case s.Released && s.ReleaseOutcome == OutcomeUnheld:
		if s.NotHeld == "" {
			return true, "no lock of ours held the shutdown"
		}
		return true, s.NotHeld
	case s.Released:
		return false, ""
	case s.NotHeld != "":
		return true, s.NotHeld
	}
	return false, ""
}

// SafeChecker asks the drain engine whether the node is safe to power off.
type SafeChecker interface {
	// WaitSafe answers true as soon as the node is safe, or false when wait passes first.
	WaitSafe(ctx context.Context, wait time.Duration) (bool, error)
}

// NodeReporter tells the lock holder what is on the node, for the block lock (ModeBlock).
type NodeReporter interface {
	// NodeVMs returns how many VMs are on the node and the drain taint key in force.
	NodeVMs(ctx context.Context) (vms int, taintKey string, err error)
}

// BlockWhy is the block lock's reason: it names the node, the drain taint key in force and the
// commands that drain the node.
func BlockWhy(node, taintKey string) string {
	return fmt.Sprintf("VMs are running on node %s: drain it first (node-agent drain %s, or kubectl taint nodes %s %s=:NoSchedule), then retry",
		node, node, node, taintKey)
}

// SafeFunc adapts a function to SafeChecker.
type SafeFunc func(ctx context.Context, wait time.Duration) (bool, error)

// WaitSafe calls f.
func (f SafeFunc) WaitSafe(ctx context.Context, wait time.Duration) (bool, error) {
	return f(ctx, wait)
}

// HolderOptions configure a Holder.
type HolderOptions struct {
	// PollWait bounds one question to the engine (its ?wait=). Default 30s.
	PollWait time.Duration
	// RetryInterval is the pause after the engine did not answer. Default 1s.
	RetryInterval time.Duration
	// Refresh is how often the Guard's status is looked at for changes. Default 200ms.
	Refresh time.Duration
	// Node and Block (ModeBlock): the block lock is held, with BlockWhy(Node, key), while
	// Block reports VMs on the node; looked at every BlockPoll (default 2s).
	Node      string
	Block     NodeReporter
	BlockPoll time.Duration
	Clock     clock.WithTicker
	Log       logrus.FieldLogger
}

// Holder holds the host's shutdown with a Guard until the drain engine says the node is safe, or
// until the deadline counted from when it saw logind begin the shutdown. It has no Kubernetes
// client: it only follows logind and asks the engine (SafeChecker) on localhost, so that a crash
// or restart of the engine does not drop the lock.
type Holder struct {
	guard *Guard
	safe  SafeChecker
	opts  HolderOptions

	mu       sync.Mutex
	state    ShutdownState // the holder's own fields; the Guard's are merged in by State
	guardSt  Status        // the Guard's status last merged
	changed  chan struct{}
	stopHold context.CancelFunc
	holding  sync.WaitGroup
}

// NewHolder returns a Holder for g (not yet running: Run runs it).
func NewHolder(g *Guard, safe SafeChecker, opts HolderOptions) *Holder {
	if opts.PollWait <= 0 {
		opts.PollWait = 30 * time.Second
	}
	if opts.RetryInterval <= 0 {
		opts.RetryInterval = time.Second
	}
	if opts.Refresh <= 0 {
		opts.Refresh = 200 * time.Millisecond
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Log == nil {
		opts.Log = logrus.New()
	}
	if opts.BlockPoll <= 0 {
		opts.BlockPoll = 2 * time.Second
	}
	now := opts.Clock.Now()
	return &Holder{guard: g, safe: safe, opts: opts, changed: make(chan struct{}),
		state: ShutdownState{Generation: uint64(now.UnixNano()), HolderStarted: now, Reachable: true}}
}

// Run runs the Guard and follows its events until ctx ends.
func (h *Holder) Run(ctx context.Context) error {
	guardDone := make(chan error, 1)
	go func() { guardDone <- h.guard.Run(ctx) }()
	tick := h.opts.Clock.NewTicker(h.opts.Refresh)
	defer tick.Stop()
	defer h.holding.Wait()
	if h.opts.Block != nil && h.guard.opts.Mode == ModeBlock {
		h.holding.Add(1)
		go func() {
			defer h.holding.Done()
			h.followBlock(ctx)
		}()
	}
	events := h.guard.Events()
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return <-guardDone
			}
			switch ev.Type {
			case ShutdownStarted:
				h.started(ctx, ev)
			case ShutdownCancelled:
				h.cancelled()
			}
		case <-tick.C():
			h.update(func(*ShutdownState) {})
		}
	}
}

// State returns the current state and a channel that is closed when it changes.
func (h *Holder) State() (ShutdownState, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mergeLocked()
	return h.state, h.changed
}

// mergeLocked takes the Guard's status into the state; it bumps the generation when it changed.
func (h *Holder) mergeLocked() {
	gs := h.guard.Status()
	if gs == h.guardSt && h.state.Generation != 0 && h.state.Mode != "" {
		return
	}
	h.guardSt = gs
	s := &h.state
	s.Connected, s.LockHeld, s.Mode, s.Degraded = gs.Connected, gs.LockHeld, gs.Mode, gs.Degraded
	s.BlockHeld, s.BlockWhy = gs.BlockHeld, gs.BlockWhy
	s.EffectiveDelay, s.LogindDelay, s.DelayProblem = gs.EffectiveDelay.Seconds(), gs.LogindDelay.Seconds(), gs.DelayProblem
	if s.ShuttingDown && !s.Released {
		s.NotHeld = gs.NotHeld
		s.Held = gs.NotHeld == ""
	}
	h.bumpLocked()
}

func (h *Holder) bumpLocked() {
	h.state.Generation++
	close(h.changed)
	h.changed = make(chan struct{})
}

func (h *Holder) update(mutate func(*ShutdownState)) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.mergeLocked()
	before := h.state
	mutate(&h.state)
	if h.state != before {
		h.bumpLocked()
	}
}

func (h *Holder) started(ctx context.Context, ev Event) {
	log := h.opts.Log.WithField("since", ev.At).WithField("deadline", ev.Deadline)
	h.update(func(s *ShutdownState) {
		s.ShuttingDown, s.Since, s.Deadline = true, ev.At, ev.Deadline
		s.Held, s.NotHeld = ev.Held, ev.NotHeld
		s.Released, s.ReleaseOutcome, s.ReleasedAt = false, "", time.Time{}
	})
	if !ev.Held {
		// Nothing of ours holds it: say so, never claim a release.
		h.guard.Release()
		h.update(func(s *ShutdownState) {
			s.Released, s.ReleaseOutcome, s.ReleasedAt = true, OutcomeUnheld, h.opts.Clock.Now()
		})
		log.WithField("notHeld", ev.NotHeld).Error("host shutdown under way that no lock of ours holds: the VMs left go down with the host")
		return
	}
	holdCtx, cancel := context.WithCancel(ctx)
	h.mu.Lock()
	h.stopHold = cancel
	h.mu.Unlock()
	h.holding.Add(1)
	go func() {
		defer h.holding.Done()
		h.hold(holdCtx, ev.Deadline, log)
	}()
}

func (h *Holder) cancelled() {
	h.mu.Lock()
	stop := h.stopHold
	h.stopHold = nil
	h.mu.Unlock()
	if stop != nil {
		stop()
	}
	h.update(func(s *ShutdownState) {
		s.ShuttingDown, s.Held, s.NotHeld, s.Since, s.Deadline = false, false, "", time.Time{}, time.Time{}
		s.Released, s.ReleaseOutcome, s.ReleasedAt = false, "", time.Time{}
	})
}

// hold asks the engine until it says the node is safe, or until the deadline; then releases.
func (h *Holder) hold(ctx context.Context, deadline time.Time, log logrus.FieldLogger) {
	clk := h.opts.Clock
	var timeout <-chan time.Time
	if !deadline.IsZero() {
		t := clk.NewTimer(deadline.Sub(clk.Now()))
		defer t.Stop()
		timeout = t.C()
	}
	lastErr := ""
	for {
		wait := h.opts.PollWait
		if !deadline.IsZero() {
			wait = min(wait, max(deadline.Sub(clk.Now()), time.Millisecond))
		}
		answered := make(chan error, 1)
		var safe bool
		askCtx, cancelAsk := context.WithCancel(ctx)
		go func() {
			var err error
			safe, err = h.safe.WaitSafe(askCtx, wait)
			answered <- err
		}()
		select {
		case <-ctx.Done():
			cancelAsk()
			<-answered
			return
		case <-timeout:
			cancelAsk()
			<-answered
			h.release(OutcomeDeadline, log)
			return
		case err := <-answered:
			cancelAsk()
			switch {
			case err == nil && safe:
				h.release(OutcomeSafe, log)
				return
			case err != nil:
				if err.Error() != lastErr {
					log.WithError(err).Warn("cannot ask the drain engine whether the node is safe; holding the shutdown and asking again")
					lastErr = err.Error()
				}
				select {
				case <-ctx.Done():
					return
				case <-timeout:
					h.release(OutcomeDeadline, log)
					return
				case <-clk.After(h.opts.RetryInterval):
				}
			default:
				lastErr = ""
			}
		}
	}
}

func (h *Holder) release(outcome string, log logrus.FieldLogger) {
	if !h.guard.Release() {
		outcome = OutcomeUnheld
	}
	now := h.opts.Clock.Now()
	h.update(func(s *ShutdownState) {
		s.Held = false
		s.Released, s.ReleaseOutcome, s.ReleasedAt = true, outcome, now
	})
	log.WithField("outcome", outcome).Info("host shutdown let go")
}

// followBlock holds the block lock while the engine reports VMs on the node. When the engine
// does not answer, the last decision stays.
func (h *Holder) followBlock(ctx context.Context) {
	lastErr := ""
	for {
		vms, key, err := h.opts.Block.NodeVMs(ctx)
		switch {
		case err != nil:
			if err.Error() != lastErr {
				h.opts.Log.WithError(err).Warn("cannot ask the drain engine for the VMs on the node; the block lock stays as it is")
				lastErr = err.Error()
			}
		case vms > 0:
			lastErr = ""
			h.guard.SetBlock(BlockWhy(h.opts.Node, key))
		default:
			lastErr = ""
			h.guard.SetBlock("")
		}
		select {
		case <-ctx.Done():
			return
		case <-h.opts.Clock.After(h.opts.BlockPoll):
		}
	}
}

// HoldWhileShuttingDown blocks while a shutdown is held by us, until it is released or cancelled
// or ctx ends; it returns at once otherwise. The holder calls it on SIGTERM: its pod's
// termination then waits for the node to be safe (or the deadline).
func (h *Holder) HoldWhileShuttingDown(ctx context.Context) {
	for {
		st, changed := h.State()
		if !st.ShuttingDown || st.Released || !st.Held {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// Handler serves GET /v1/shutdown (the state as JSON; ?generation=N&wait=D waits up to D for a
// state whose generation is not N), /healthz, and /readyz (200 while the lock is held or a
// held shutdown is under way).
func (h *Holder) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		var wait time.Duration
		if raw := q.Get("wait"); raw != "" {
			d, err := time.ParseDuration(raw)
			if err != nil || d < 0 || d > 10*time.Minute {
				http.Error(w, fmt.Sprintf("invalid wait %q: want a duration up to 10m", raw), http.StatusBadRequest)
				return
			}
			wait = d
		}
		var gen uint64
		if raw := q.Get("generation"); raw != "" {
			g, err := strconv.ParseUint(raw, 10, 64)
			if err != nil {
				http.Error(w, fmt.Sprintf("invalid generation %q", raw), http.StatusBadRequest)
				return
			}
			gen = g
		}
		st, changed := h.State()
		if gen != 0 && st.Generation == gen && wait > 0 {
			t := h.opts.Clock.NewTimer(wait)
			defer t.Stop()
			for st.Generation == gen {
				select {
				case <-changed:
					st, changed = h.State()
					continue
				case <-t.C():
				case <-r.Context().Done():
				}
				break
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(st)
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st, _ := h.State()
		switch unheld, why := st.Unheld(); {
		case unheld:
			http.Error(w, "not ready: host shutdown under way and not held: "+why, http.StatusServiceUnavailable)
		case !st.ShuttingDown && !st.LockHeld:
			http.Error(w, "not ready: no shutdown inhibitor lock held: "+st.Degraded, http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok")
		}
	})
	return mux
}
