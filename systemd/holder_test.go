package systemd

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// fakeEngine answers WaitSafe from a flag; it counts the questions.
type fakeEngine struct {
	safe  atomic.Bool
	fail  atomic.Bool
	asked atomic.Int32
}

func (e *fakeEngine) WaitSafe(ctx context.Context, wait time.Duration) (bool, error) {
	e.asked.Add(1)
	if e.fail.Load() {
		return false, context.DeadlineExceeded
	}
	if e.safe.Load() {
		return true, nil
	}
	// Not safe: answer after a short real wait, as a long poll that timed out would.
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Millisecond):
	}
	return false, nil
}

func runHolder(t *testing.T, f *fakeEnv, opts Options, eng SafeChecker) *Holder {
	t.Helper()
	opts.Clock = f.clock
	log := logrus.New()
	log.SetOutput(io.Discard)
	opts.Log = log
	h := NewHolder(newGuard(opts, f.dial), eng, HolderOptions{Clock: f.clock, Log: log, RetryInterval: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return h
}

func holderState(h *Holder) ShutdownState { st, _ := h.State(); return st }

// A held shutdown is kept until the engine says the node is safe; then the lock is released and
// the outcome is safe.
func TestHolderReleasesWhenTheEngineSaysSafe(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	eng := &fakeEngine{}
	h := runHolder(t, f, Options{WantDelay: 20 * time.Second}, eng)
	b := f.nextDial()
	eventually(t, "lock held, delay known", func() bool { s := holderState(h); return s.LockHeld && s.EffectiveDelay == 20 })
	b.sigs <- busSignal{prepare: true, active: true}
	eventually(t, "shutdown held", func() bool { s := holderState(h); return s.ShuttingDown && s.Held })
	eventually(t, "the engine asked twice", func() bool { return eng.asked.Load() >= 2 })
	st := holderState(h)
	if st.Released || !st.LockHeld || !st.Deadline.Equal(st.Since.Add(20*time.Second)) {
		t.Fatalf("state %+v while the engine says not safe: want held, deadline 20s after since", st)
	}
	lock := f.l.lockFiles()[0]
	eng.safe.Store(true)
	eventually(t, "released", func() bool { return holderState(h).Released })
	st = holderState(h)
	if st.ReleaseOutcome != OutcomeSafe || st.Held || st.LockHeld || !isClosed(lock) {
		t.Errorf("state %+v, lock closed %v: want released, outcome safe", st, isClosed(lock))
	}
	if unheld, why := st.Unheld(); unheld {
		t.Errorf("a safe release reported as unheld: %s", why)
	}
}

// The deadline counts from when the holder saw the shutdown begin; the engine failing to answer
// does not release it early.
func TestHolderReleasesAtTheDeadline(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	eng := &fakeEngine{}
	eng.fail.Store(true)
	h := runHolder(t, f, Options{WantDelay: 20 * time.Second}, eng)
	b := f.nextDial()
	eventually(t, "lock held, delay known", func() bool { s := holderState(h); return s.LockHeld && s.EffectiveDelay == 20 })
	b.sigs <- busSignal{prepare: true, active: true}
	eventually(t, "the engine asked", func() bool { return eng.asked.Load() >= 1 })
	// The holder arms its retry timer (RetryInterval, 1 s) after the engine failed to
	// answer, at a moment the test cannot see: a single step of 19 s taken before that
	// was lost (a CI run under load). Step a second at a time, at most one step per
	// 50 ms of real time, until it asked again, never past 19 s.
	var stepped time.Duration
	var lastStep time.Time
	eventually(t, "asked again after the retry interval", func() bool {
		if eng.asked.Load() >= 2 {
			return true
		}
		if stepped < 19*time.Second && time.Since(lastStep) >= 50*time.Millisecond {
			f.clock.Step(time.Second)
			stepped += time.Second
			lastStep = time.Now()
		}
		return false
	})
	f.clock.Step(19*time.Second - stepped)
	if st := holderState(h); st.Released || !st.Held {
		t.Fatalf("state %+v before the deadline with the engine not answering: want held", st)
	}
	f.clock.Step(time.Second)
	eventually(t, "released at the deadline", func() bool { return holderState(h).Released })
	if st := holderState(h); st.ReleaseOutcome != OutcomeDeadline || st.LockHeld {
		t.Errorf("state %+v, want outcome deadline", st)
	}
}

// A holder that starts while logind already prepares a shutdown (it restarted mid-shutdown)
// holds nothing: the state says not held, outcome unheld, never safe.
func TestHolderStartedMidShutdownSaysUnheld(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second, preparing: true})
	eng := &fakeEngine{}
	eng.safe.Store(true)
	h := runHolder(t, f, Options{WantDelay: 20 * time.Second}, eng)
	f.nextDial()
	eventually(t, "shutdown seen", func() bool { return holderState(h).Released })
	st := holderState(h)
	unheld, why := st.Unheld()
	if !unheld || why == "" || st.Held || st.LockHeld || st.ReleaseOutcome != OutcomeUnheld {
		t.Errorf("state %+v: want shutting down, unheld with a reason, outcome unheld", st)
	}
}

// A cancel stops the hold and takes the lock again; the state forgets the shutdown.
func TestHolderCancelledShutdown(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	h := runHolder(t, f, Options{}, &fakeEngine{})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return holderState(h).LockHeld })
	b.sigs <- busSignal{prepare: true, active: true}
	eventually(t, "held", func() bool { return holderState(h).Held })
	b.sigs <- busSignal{prepare: true, active: false}
	eventually(t, "cancelled", func() bool { s := holderState(h); return !s.ShuttingDown && s.LockHeld })
	if st := holderState(h); st.Released || st.Held || !st.Since.IsZero() {
		t.Errorf("state %+v after the cancel", st)
	}
}

// GET /v1/shutdown answers at once without a generation or with another one, and waits for a
// change with the current one.
func TestHolderServesItsStateWithLongPoll(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	h := runHolder(t, f, Options{}, &fakeEngine{})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return holderState(h).LockHeld })
	srv := httptest.NewServer(h.Handler())
	defer srv.Close()
	get := func(q string) ShutdownState {
		t.Helper()
		resp, err := http.Get(srv.URL + "/v1/shutdown" + q)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st ShutdownState
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %v %v", q, resp.Status, err)
		}
		return st
	}
	st := get("")
	if !st.LockHeld || !st.Connected || st.ShuttingDown {
		t.Fatalf("state %+v", st)
	}
	got := make(chan ShutdownState, 1)
	go func() { got <- get("?generation=" + strconv.FormatUint(st.Generation, 10) + "&wait=1m") }()
	select {
	case s := <-got:
		if s.Generation == st.Generation {
			t.Fatalf("long poll answered at once with the same generation: %+v", s)
		}
	case <-time.After(100 * time.Millisecond):
	}
	b.sigs <- busSignal{prepare: true, active: true}
	select {
	case s := <-got:
		if !s.ShuttingDown {
			t.Errorf("long poll answered %+v, want the shutdown", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the long poll did not answer the change")
	}
	if resp, err := http.Get(srv.URL + "/v1/shutdown?wait=soon"); err != nil || resp.StatusCode != http.StatusBadRequest {
		t.Errorf("?wait=soon: %v %v, want 400", resp, err)
	} else {
		resp.Body.Close()
	}
}

// HolderClient follows the holder, and reports a shutdown it knew of as not held when the
// holder stops answering.
func TestHolderClientFollowsAndReportsAGoneHolder(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	h := runHolder(t, f, Options{}, &fakeEngine{})
	b := f.nextDial()
	// The holder takes the Guard's status in on its refresh tick (the fake clock here, not
	// stepped) or when asked: asked, before the client's first look.
	eventually(t, "the holder holds the lock", func() bool { return holderState(h).LockHeld })
	srv := httptest.NewServer(h.Handler())
	c := NewHolderClient(srv.URL, nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go c.Run(ctx)
	clientState := func() ShutdownState { st, _ := c.State(); return st }
	eventually(t, "client sees the lock", func() bool { s := clientState(); return s.Reachable && s.LockHeld })
	b.sigs <- busSignal{prepare: true, active: true}
	eventually(t, "client sees the held shutdown", func() bool { s := clientState(); return s.ShuttingDown && s.Held })
	srv.CloseClientConnections()
	srv.Close()
	eventually(t, "client sees the holder gone", func() bool { return !clientState().Reachable })
	st := clientState()
	if unheld, why := st.Unheld(); !unheld || why == "" || st.Held {
		t.Errorf("state %+v with the holder gone during a shutdown: want not held, saying why", st)
	}
}

type fakeNode struct{ vms atomic.Int32 }

func (n *fakeNode) NodeVMs(context.Context) (int, string, error) {
	return int(n.vms.Load()), "example.com/drain", nil
}

// Block mode: the block lock only while the engine reports VMs on the node, naming the resolved
// taint key and the drain command; the delay lock all along.
func TestHolderBlockLockOnlyWhileVMsAreOnTheNode(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	node := &fakeNode{}
	opts := Options{Mode: ModeBlock, Clock: f.clock}
	log := logrus.New()
	log.SetOutput(io.Discard)
	opts.Log = log
	h := NewHolder(newGuard(opts, f.dial), &fakeEngine{}, HolderOptions{Clock: f.clock, Log: log, Node: "node-1", Block: node})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	defer func() { cancel(); <-done }()
	f.nextDial()
	eventually(t, "delay lock held", func() bool { return holderState(h).LockHeld })
	if st := holderState(h); st.BlockHeld {
		t.Fatalf("block lock held with no VM on the node: %+v", st)
	}
	node.vms.Store(2)
	eventually(t, "block lock held", func() bool { f.clock.Step(time.Second); return holderState(h).BlockHeld })
	st := holderState(h)
	if st.BlockWhy != BlockWhy("node-1", "example.com/drain") || !strings.Contains(st.BlockWhy, "node-agent drain node-1") {
		t.Errorf("block lock why %q", st.BlockWhy)
	}
	f.l.mu.Lock()
	modes := append([]string(nil), f.l.modes...)
	f.l.mu.Unlock()
	if len(modes) != 2 || modes[0] != "delay" || modes[1] != "block" {
		t.Errorf("locks taken %v, want [delay block]", modes)
	}
	block := f.l.lockFiles()[1]
	node.vms.Store(0)
	eventually(t, "block lock released", func() bool { f.clock.Step(time.Second); return !holderState(h).BlockHeld })
	if !isClosed(block) || isClosed(f.l.lockFiles()[0]) {
		t.Errorf("block lock closed %v, delay lock closed %v: want only the block lock closed", isClosed(block), isClosed(f.l.lockFiles()[0]))
	}
}
