package systemd_test

import (
	"context"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/systemd"
)

const testWho = "node-agent-test"

// startEnv starts a private bus with a real logind and points this test's D-Bus clients at it.
func startEnv(t *testing.T, opts ...logind.Option) (*logind.Env, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	env, err := logind.Start(ctx, t, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", env.Address)
	return env, ctx
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

func testLogger(t *testing.T) *logrus.Logger {
	l := logrus.New()
	l.SetOutput(logWriter{t})
	l.SetLevel(logrus.DebugLevel)
	return l
}

// runGuard starts a Guard with test defaults (fast retries) and stops it with stop or at cleanup.
func runGuard(t *testing.T, opts systemd.Options) (g *systemd.Guard, stop func()) {
	t.Helper()
	if opts.Who == "" {
		opts.Who = testWho
	}
	if opts.RetryMin == 0 {
		opts.RetryMin, opts.RetryMax = 50*time.Millisecond, 400*time.Millisecond
	}
	opts.Log = testLogger(t)
	g = systemd.New(opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("Run did not return 10s after its context ended")
		}
	}
	t.Cleanup(stop)
	return g, stop
}

// waitStatus polls g.Status until cond holds.
func waitStatus(ctx context.Context, t *testing.T, g *systemd.Guard, what string, cond func(systemd.Status) bool) systemd.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		s := g.Status()
		if cond(s) {
			return s
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for status %s: %v; last status %+v", what, ctx.Err(), s)
		case <-tick.C:
		}
	}
}

// healthy: connected, the lock held, and logind's delay known (it is read after the lock is taken).
func healthy(s systemd.Status) bool {
	return s.Connected && s.LockHeld && s.Degraded == "" && s.LogindDelay > 0
}

// nextEvent waits for the Guard's next event and checks its type.
func nextEvent(ctx context.Context, t *testing.T, g *systemd.Guard, want systemd.EventType) systemd.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	select {
	case ev, ok := <-g.Events():
		if !ok {
			t.Fatalf("Events closed while waiting for %s", want)
		}
		if ev.Type != want {
			t.Fatalf("event %+v, want %s", ev, want)
		}
		return ev
	case <-ctx.Done():
		t.Fatalf("no %s event: %v", want, ctx.Err())
	}
	return systemd.Event{}
}

// ours counts the test's inhibitors of the given mode in logind's list.
func ours(list []logind.Inhibitor, mode string) int {
	n := 0
	for _, i := range list {
		if i.Who == testWho && i.Mode == mode && i.What == "shutdown" {
			n++
		}
	}
	return n
}

// waitOurs waits until logind lists exactly n of the test's locks of each given mode.
func waitOurs(ctx context.Context, t *testing.T, env *logind.Env, n int, modes ...string) []logind.Inhibitor {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	list, err := env.WaitInhibitors(ctx, func(l []logind.Inhibitor) bool {
		for _, m := range modes {
			if ours(l, m) != n {
				return false
			}
		}
		return true
	})
	if err != nil {
		t.Fatalf("waiting for %d %v lock(s) of %s: %v", n, modes, testWho, err)
	}
	return list
}

// powerOffHeldUntilRelease asks the real logind to power off, expects ShutdownStarted, keeps the
// lock for hold, checks that the poweroff job has not started, releases, and returns how long after
// Release the job started.
func powerOffHeldUntilRelease(ctx context.Context, t *testing.T, env *logind.Env, g *systemd.Guard, hold time.Duration) time.Duration {
	t.Helper()
	asked := time.Now()
	if err := env.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	ev := nextEvent(ctx, t, g, systemd.ShutdownStarted)
	if lag := ev.At.Sub(asked); lag > 2*time.Second {
		t.Errorf("ShutdownStarted %v after PowerOff", lag)
	}
	select { // the drain the consumer would do; not a synchronisation
	case <-time.After(hold):
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	if at, started, err := env.StartUnitAt(ctx, "poweroff.target", asked); err != nil || started {
		t.Fatalf("poweroff job started %v after PowerOff while the lock was held (err %v)", at.Sub(asked), err)
	}
	released := time.Now()
	g.Release()
	at, err := env.WaitStartUnit(ctx, "poweroff.target", asked)
	if err != nil {
		t.Fatal(err)
	}
	after := at.Sub(released)
	if after < 0 {
		t.Fatalf("poweroff job started %v before Release", -after)
	}
	if after > time.Second {
		t.Errorf("poweroff job started %v after Release, want within moments", after)
	}
	t.Logf("PowerOff -> ShutdownStarted %v; Release -> StartUnit(poweroff.target) %v", ev.At.Sub(asked), after)
	return after
}
