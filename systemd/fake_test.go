package systemd

import (
	"context"
	"errors"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/apimachinery/pkg/util/wait"
	clocktesting "k8s.io/utils/clock/testing"
)

// fakeLogind is the state behind every fake connection: what logind would answer.
type fakeLogind struct {
	mu          sync.Mutex
	delay       time.Duration // InhibitDelayMaxUSec
	afterReload time.Duration // InhibitDelayMaxUSec once reloaded (0: unchanged)
	preparing   bool
	reloads     int
	modes       []string   // Inhibit calls, by mode
	locks       []*os.File // write ends handed out
	readEnds    []*os.File
}

func (l *fakeLogind) lockFiles() []*os.File {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*os.File(nil), l.locks...)
}

func (l *fakeLogind) inhibits() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.modes)
}

// fakeBus is one connection.
type fakeBus struct {
	l       *fakeLogind
	sigs    chan busSignal
	once    sync.Once
	closeCh chan struct{}
}

var _ bus = (*fakeBus)(nil)

func (b *fakeBus) Signals() <-chan busSignal { return b.sigs }

func (b *fakeBus) Inhibit(ctx context.Context, what, who, why, mode string) (*os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	b.l.mu.Lock()
	defer b.l.mu.Unlock()
	b.l.modes = append(b.l.modes, mode)
	b.l.locks = append(b.l.locks, w)
	b.l.readEnds = append(b.l.readEnds, r)
	return w, nil
}

func (b *fakeBus) InhibitDelayMax(ctx context.Context) (time.Duration, error) {
	b.l.mu.Lock()
	defer b.l.mu.Unlock()
	return b.l.delay, nil
}

func (b *fakeBus) PreparingForShutdown(ctx context.Context) (bool, error) {
	b.l.mu.Lock()
	defer b.l.mu.Unlock()
	return b.l.preparing, nil
}

func (b *fakeBus) ReloadLogind(ctx context.Context) error {
	b.l.mu.Lock()
	defer b.l.mu.Unlock()
	b.l.reloads++
	if b.l.afterReload > 0 {
		b.l.delay = b.l.afterReload
	}
	return nil
}

func (b *fakeBus) Close() { b.once.Do(func() { close(b.closeCh) }) }

// drop simulates the bus going away: the signal channel closes.
func (b *fakeBus) drop() { close(b.sigs) }

// fakeEnv scripts the dialer: each dial takes the next error (nil: connect).
type fakeEnv struct {
	t     *testing.T
	l     *fakeLogind
	clock *clocktesting.FakeClock
	mu    sync.Mutex
	errs  []error
	dials chan *fakeBus // a connected fakeBus, or nil for a failed dial
}

func newFakeEnv(t *testing.T, l *fakeLogind, dialErrs ...error) *fakeEnv {
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, f := range append(l.locks, l.readEnds...) {
			_ = f.Close()
		}
	})
	return &fakeEnv{t: t, l: l, clock: clocktesting.NewFakeClock(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)),
		errs: dialErrs, dials: make(chan *fakeBus, 16)}
}

func (f *fakeEnv) dial(ctx context.Context) (bus, error) {
	f.mu.Lock()
	var err error
	if len(f.errs) > 0 {
		err, f.errs = f.errs[0], f.errs[1:]
	}
	f.mu.Unlock()
	if err != nil {
		f.dials <- nil
		return nil, err
	}
	b := &fakeBus{l: f.l, sigs: make(chan busSignal), closeCh: make(chan struct{})}
	f.dials <- b
	return b, nil
}

// run starts a Guard on the fake; it is stopped at cleanup.
func (f *fakeEnv) run(opts Options) *Guard {
	opts.Clock = f.clock
	log := logrus.New()
	log.SetOutput(io.Discard)
	opts.Log = log
	g := newGuard(opts, f.dial)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	f.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			f.t.Errorf("Run: %v", err)
		}
	})
	return g
}

func (f *fakeEnv) nextDial() *fakeBus {
	f.t.Helper()
	select {
	case b := <-f.dials:
		return b
	case <-time.After(5 * time.Second):
		f.t.Fatal("no dial")
		return nil
	}
}

// eventually polls cond (real time, for the Guard's goroutine to catch up) until it holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), time.Millisecond, 5*time.Second, true, func(context.Context) (bool, error) {
		return cond(), nil
	})
	if err != nil {
		t.Fatalf("timed out waiting for %s", what)
	}
}

func isClosed(f *os.File) bool {
	_, err := f.Stat()
	return errors.Is(err, os.ErrClosed)
}

func expectEvent(t *testing.T, g *Guard, want EventType) Event {
	t.Helper()
	select {
	case ev := <-g.Events():
		if ev.Type != want {
			t.Fatalf("event %+v, want %s", ev, want)
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatalf("no %s event", want)
		return Event{}
	}
}

func noEvent(t *testing.T, g *Guard) {
	t.Helper()
	select {
	case ev := <-g.Events():
		t.Fatalf("unexpected event %+v", ev)
	default:
	}
}
