package systemd_test

// These tests run the Guard against a real systemd-logind on a private dbus-daemon
// (integration/logind). They need root, dbus, systemd and util-linux.

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/systemd"
)

func TestLockIsListedAndPowerOffWaitsForRelease(t *testing.T) {
	env, ctx := startEnv(t) // logind's default InhibitDelayMaxSec: 5 s
	g, _ := runGuard(t, systemd.Options{WantDelay: 5 * time.Second})
	s := waitStatus(ctx, t, g, "lock held", healthy)
	if s.LogindDelay != 5*time.Second || s.EffectiveDelay != 5*time.Second || s.DelayProblem != "" {
		t.Errorf("delay status %+v, want logind and effective 5s", s)
	}
	list := waitOurs(ctx, t, env, 1, "delay")
	for _, i := range list {
		if i.Who == testWho && (i.PID != uint32(os.Getpid()) || i.UID != uint32(os.Getuid())) {
			t.Errorf("inhibitor %+v is not this process's", i)
		}
	}
	powerOffHeldUntilRelease(ctx, t, env, g, time.Second)
	waitOurs(ctx, t, env, 0, "delay")
	if s := g.Status(); !s.ShuttingDown || !s.Released || s.LockHeld {
		t.Errorf("status after Release %+v", s)
	}
}

func TestLogindOverridesAConsumerThatNeverReleases(t *testing.T) {
	env, ctx := startEnv(t, logind.WithInhibitDelayMax(2*time.Second))
	// The agent wants 10 s but may not write configuration: the effective deadline is logind's.
	g, _ := runGuard(t, systemd.Options{WantDelay: 10 * time.Second})
	s := waitStatus(ctx, t, g, "lock held", healthy)
	if s.EffectiveDelay != 2*time.Second || s.DelayProblem == "" {
		t.Errorf("status %+v: want effective 2s and a delay problem", s)
	}
	asked := time.Now()
	if err := env.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	ev := nextEvent(ctx, t, g, systemd.ShutdownStarted)
	if d := ev.Deadline.Sub(ev.At); d != 2*time.Second {
		t.Errorf("event deadline %v after the event, want 2s", d)
	}
	at, err := env.WaitStartUnit(ctx, "poweroff.target", asked)
	if err != nil {
		t.Fatal(err)
	}
	waited := at.Sub(asked)
	t.Logf("never released: poweroff job started %v after PowerOff (InhibitDelayMaxSec=2s)", waited)
	if waited < 1900*time.Millisecond || waited > 3500*time.Millisecond {
		t.Errorf("logind overrode the lock after %v, want about 2s", waited)
	}
	if s := g.Status(); s.Released {
		t.Errorf("status %+v: the consumer never released", s)
	}
}

func TestCancelledShutdownTakesTheLockAgain(t *testing.T) {
	env, ctx := startEnv(t)
	g, _ := runGuard(t, systemd.Options{})
	waitStatus(ctx, t, g, "lock held", healthy)
	waitOurs(ctx, t, env, 1, "delay")
	powerOffHeldUntilRelease(ctx, t, env, g, 200*time.Millisecond)

	// systemd cancels the poweroff job: logind sends PrepareForShutdown(false).
	if n, err := env.CancelJobs(ctx); err != nil || n != 1 {
		t.Fatalf("CancelJobs = %d, %v; want 1", n, err)
	}
	nextEvent(ctx, t, g, systemd.ShutdownCancelled)
	waitStatus(ctx, t, g, "lock held again", func(s systemd.Status) bool { return healthy(s) && !s.ShuttingDown })
	waitOurs(ctx, t, env, 1, "delay")

	// The new lock holds the next shutdown too.
	powerOffHeldUntilRelease(ctx, t, env, g, 500*time.Millisecond)
}

func TestLockIsTakenAgainAfterLogindAndBusRestarts(t *testing.T) {
	env, ctx := startEnv(t)
	g, _ := runGuard(t, systemd.Options{})
	waitStatus(ctx, t, g, "lock held", healthy)
	waitOurs(ctx, t, env, 1, "delay")

	// logind restores its inhibitors from /run/systemd/inhibit; the Guard takes a fresh lock
	// from the new logind and drops the old one: one lock in the end.
	if err := env.RestartLogind(ctx, true); err != nil {
		t.Fatal(err)
	}
	waitOurs(ctx, t, env, 1, "delay")
	waitStatus(ctx, t, g, "lock held after the logind restart", healthy)

	// A logind that lost its state knows no lock: only one taken again is listed.
	if err := env.RestartLogind(ctx, false); err != nil {
		t.Fatal(err)
	}
	waitOurs(ctx, t, env, 1, "delay")
	waitStatus(ctx, t, g, "lock held after a logind restart without state", healthy)

	if err := env.RestartBus(ctx); err != nil {
		t.Fatal(err)
	}
	waitOurs(ctx, t, env, 1, "delay")
	waitStatus(ctx, t, g, "lock held after the bus restart", healthy)

	powerOffHeldUntilRelease(ctx, t, env, g, 500*time.Millisecond)
}

func TestShutdownForgottenByARestartedLogindIsCancelled(t *testing.T) {
	env, ctx := startEnv(t)
	g, _ := runGuard(t, systemd.Options{})
	waitStatus(ctx, t, g, "lock held", healthy)
	if err := env.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	nextEvent(ctx, t, g, systemd.ShutdownStarted)
	// logind dies during the delay: the new one has no shutdown pending.
	if err := env.RestartLogind(ctx, false); err != nil {
		t.Fatal(err)
	}
	nextEvent(ctx, t, g, systemd.ShutdownCancelled)
	waitStatus(ctx, t, g, "lock held again", func(s systemd.Status) bool { return healthy(s) && !s.ShuttingDown })
	waitOurs(ctx, t, env, 1, "delay")
	powerOffHeldUntilRelease(ctx, t, env, g, 200*time.Millisecond)
}

func TestInhibitDelayMaxIsRaisedButNeverLowered(t *testing.T) {
	env, ctx := startEnv(t) // logind's default: 5 s
	ourFile := filepath.Join(env.DropInDir, systemd.DropInName)
	kubelet := filepath.Join(env.DropInDir, "99-kubelet.conf")

	t.Run("raised through the drop-in and read back", func(t *testing.T) {
		g, stop := runGuard(t, systemd.Options{WantDelay: 42 * time.Second, DropInDir: env.DropInDir})
		defer stop()
		s := waitStatus(ctx, t, g, "lock held", healthy)
		if s.LogindDelay != 42*time.Second || s.EffectiveDelay != 42*time.Second || s.DelayProblem != "" {
			t.Errorf("status %+v, want logind and effective 42s", s)
		}
		if d, err := env.InhibitDelayMax(ctx); err != nil || d != 42*time.Second {
			t.Errorf("logind InhibitDelayMaxUSec = %v, %v; want 42s", d, err)
		}
		if b, err := os.ReadFile(ourFile); err != nil || !strings.Contains(string(b), "[Login]\nInhibitDelayMaxSec=42\n") {
			t.Errorf("%s: %q, %v", ourFile, b, err)
		}
	})

	t.Run("a larger kubelet value is kept, our stale drop-in removed", func(t *testing.T) {
		writeFile(t, kubelet, "[Login]\nInhibitDelayMaxSec=120\n")
		if err := env.ReloadLogind(ctx); err != nil {
			t.Fatal(err)
		}
		g, stop := runGuard(t, systemd.Options{WantDelay: 60 * time.Second, DropInDir: env.DropInDir})
		defer stop()
		s := waitStatus(ctx, t, g, "lock held", healthy)
		if s.LogindDelay != 120*time.Second || s.EffectiveDelay != 60*time.Second {
			t.Errorf("status %+v, want logind 120s and effective 60s", s)
		}
		if d, err := env.InhibitDelayMax(ctx); err != nil || d != 120*time.Second {
			t.Errorf("logind InhibitDelayMaxUSec = %v, %v; want the kubelet's 120s", d, err)
		}
		// Ours (42 s, from the run above) is not needed any more: removed, so that it can never
		// lower a value set elsewhere.
		if b, err := os.ReadFile(ourFile); err == nil {
			t.Errorf("%s kept although the kubelet's value allows the wanted delay: %q", ourFile, b)
		}
	})

	t.Run("a smaller kubelet value wins over ours: the effective delay is logind's", func(t *testing.T) {
		writeFile(t, kubelet, "[Login]\nInhibitDelayMaxSec=20\n")
		if err := env.ReloadLogind(ctx); err != nil {
			t.Fatal(err)
		}
		g, stop := runGuard(t, systemd.Options{WantDelay: 60 * time.Second, DropInDir: env.DropInDir, ReloadWait: time.Second})
		defer stop()
		s := waitStatus(ctx, t, g, "lock held", healthy)
		if s.LogindDelay != 20*time.Second || s.EffectiveDelay != 20*time.Second || !strings.Contains(s.DelayProblem, "99-kubelet.conf") {
			t.Errorf("status %+v, want logind and effective 20s and a problem naming 99-kubelet.conf", s)
		}
		if b, _ := os.ReadFile(ourFile); !strings.Contains(string(b), "InhibitDelayMaxSec=60\n") {
			t.Errorf("%s: %q, want 60", ourFile, b)
		}
		if d, err := env.InhibitDelayMax(ctx); err != nil || d != 20*time.Second {
			t.Errorf("logind InhibitDelayMaxUSec = %v, %v; want the kubelet's 20s", d, err)
		}
	})
}

func TestNoBusIsDegradedAndRecovers(t *testing.T) {
	env, ctx := startEnv(t)
	if err := env.StopBus(ctx); err != nil {
		t.Fatal(err)
	}
	g, _ := runGuard(t, systemd.Options{})
	s := waitStatus(ctx, t, g, "degraded", func(s systemd.Status) bool {
		return !s.Connected && !s.LockHeld && s.Degraded != "" && s.Degraded != "not started"
	})
	t.Logf("degraded: %s", s.Degraded)

	started := time.Now()
	if err := env.StartBus(ctx); err != nil {
		t.Fatal(err)
	}
	waitStatus(ctx, t, g, "recovered", healthy)
	t.Logf("the lock held again %s after the bus was started", time.Since(started).Round(time.Millisecond))
	waitOurs(ctx, t, env, 1, "delay")
	powerOffHeldUntilRelease(ctx, t, env, g, 200*time.Millisecond)
}

// A logind that does not answer when the Guard starts (stopped with SIGSTOP: stuck, or
// starved on a loaded host) while the bus does: the Guard reports itself degraded once its
// call times out, instead of waiting for ever, and when logind answers again it takes the
// lock and holds a power-off until it releases it.
func TestSlowLogindIsDegradedAndRecovers(t *testing.T) {
	env, ctx := startEnv(t)
	pid, err := env.LogindPID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	var resumed bool
	resume := func() {
		if !resumed {
			resumed = true
			if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
				t.Errorf("SIGCONT to logind: %v", err)
			}
		}
	}
	t.Cleanup(resume)
	g, _ := runGuard(t, systemd.Options{CallTimeout: 2 * time.Second})
	s := waitStatus(ctx, t, g, "degraded: logind did not answer in time", func(s systemd.Status) bool {
		return !s.Connected && !s.LockHeld && strings.Contains(s.Degraded, "deadline exceeded")
	})
	t.Logf("degraded: %s", s.Degraded)

	resumedAt := time.Now()
	resume()
	waitStatus(ctx, t, g, "recovered", healthy)
	t.Logf("the lock held again %s after logind answered again", time.Since(resumedAt).Round(time.Millisecond))
	waitOurs(ctx, t, env, 1, "delay")
	powerOffHeldUntilRelease(ctx, t, env, g, 200*time.Millisecond)
}

func TestBlockModeHoldsBlockAndDelayLocks(t *testing.T) {
	env, ctx := startEnv(t)
	g, _ := runGuard(t, systemd.Options{Mode: systemd.ModeBlock})
	waitStatus(ctx, t, g, "delay lock held", healthy)
	// No VM on the node: the delay lock only.
	waitOurs(ctx, t, env, 1, "delay")
	waitOurs(ctx, t, env, 0, "block")
	// VMs on the node: the block lock, naming the resolved taint key and the drain command.
	why := systemd.BlockWhy("node-1", "example.com/drain")
	g.SetBlock(why)
	list := waitOurs(ctx, t, env, 1, "delay", "block")
	for _, i := range list {
		if i.Who == testWho && i.Mode == "block" && (i.Why != why || !strings.Contains(i.Why, "example.com/drain") || !strings.Contains(i.Why, "node-agent drain node-1")) {
			t.Errorf("block lock why = %q, want %q", i.Why, why)
		}
	}
	// The VMs gone: the block lock goes, the delay lock stays.
	g.SetBlock("")
	waitOurs(ctx, t, env, 0, "block")
	waitOurs(ctx, t, env, 1, "delay")
	g.SetBlock(why)
	waitOurs(ctx, t, env, 1, "block")
	// logind 252 lets root's PowerOff past a block lock held by root; the delay lock still holds it.
	powerOffHeldUntilRelease(ctx, t, env, g, 300*time.Millisecond)
	waitOurs(ctx, t, env, 0, "delay", "block")
}

func TestPrepareForShutdownFromAnotherSenderIsIgnored(t *testing.T) {
	env, ctx := startEnv(t)
	g, _ := runGuard(t, systemd.Options{})
	waitStatus(ctx, t, g, "lock held", healthy)

	conn, err := dbus.Dial(env.Address)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
		t.Fatal(err)
	}
	if err := conn.Hello(); err != nil {
		t.Fatal(err)
	}
	if err := conn.Emit("/org/freedesktop/login1", "org.freedesktop.login1.Manager.PrepareForShutdown", true); err != nil {
		t.Fatal(err)
	}
	select { // asserting an absence: the spoof must not start a drain
	case ev := <-g.Events():
		t.Fatalf("event %+v from a PrepareForShutdown that logind did not send", ev)
	case <-time.After(300 * time.Millisecond):
	}
	powerOffHeldUntilRelease(ctx, t, env, g, 100*time.Millisecond)
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// The lock holder against the real logind: a power-off is held while the engine says the node
// is not safe, and logind starts the poweroff job within moments of the engine saying it is
// safe. Then a second holder started while logind prepares that shutdown holds nothing and
// says so.
func TestHolderHoldsARealPowerOffUntilTheEngineSaysSafe(t *testing.T) {
	env, ctx := startEnv(t)
	var safe atomic.Bool
	var saidSafe atomic.Int64 // unix nanoseconds when WaitSafe first answered true
	engine := systemd.SafeFunc(func(ctx context.Context, wait time.Duration) (bool, error) {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		deadline := time.After(wait)
		for !safe.Load() {
			select {
			case <-ctx.Done():
				return false, nil
			case <-deadline:
				return false, nil
			case <-tick.C:
			}
		}
		saidSafe.CompareAndSwap(0, time.Now().UnixNano())
		return true, nil
	})
	runHolder := func() *systemd.Holder {
		log := testLogger(t)
		g := systemd.New(systemd.Options{Who: testWho, WantDelay: 10 * time.Second, RetryMin: 50 * time.Millisecond, RetryMax: 400 * time.Millisecond, Log: log})
		h := systemd.NewHolder(g, engine, systemd.HolderOptions{Log: log})
		hctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- h.Run(hctx) }()
		t.Cleanup(func() { cancel(); <-done })
		return h
	}
	state := func(h *systemd.Holder, what string, cond func(systemd.ShutdownState) bool) systemd.ShutdownState {
		t.Helper()
		for {
			st, changed := h.State()
			if cond(st) {
				return st
			}
			select {
			case <-changed:
			case <-ctx.Done():
				t.Fatalf("waiting for %s: last state %+v", what, st)
			}
		}
	}
	h := runHolder()
	state(h, "lock held", func(s systemd.ShutdownState) bool { return s.LockHeld && s.EffectiveDelay > 0 })
	waitOurs(ctx, t, env, 1, "delay")
	asked := time.Now()
	if err := env.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	st := state(h, "the shutdown held", func(s systemd.ShutdownState) bool { return s.ShuttingDown && s.Held })
	if d := st.Deadline.Sub(st.Since); d != 5*time.Second {
		t.Errorf("deadline %v after the shutdown began, want logind's 5s (InhibitDelayMaxSec, smaller than wanted)", d)
	}
	time.Sleep(time.Second) // the engine draining; not a synchronisation
	if at, started, err := env.StartUnitAt(ctx, "poweroff.target", asked); err != nil || started {
		t.Fatalf("poweroff job started %v after PowerOff while the engine said not safe (err %v)", at.Sub(asked), err)
	}
	safe.Store(true)
	at, err := env.WaitStartUnit(ctx, "poweroff.target", asked)
	if err != nil {
		t.Fatal(err)
	}
	latency := at.Sub(time.Unix(0, saidSafe.Load()))
	t.Logf("the engine said safe -> logind started the poweroff job: %v", latency)
	if latency < 0 || latency > time.Second {
		t.Errorf("poweroff job started %v after the engine said safe, want within moments", latency)
	}
	st = state(h, "released", func(s systemd.ShutdownState) bool { return s.Released })
	if st.ReleaseOutcome != systemd.OutcomeSafe {
		t.Errorf("state %+v, want outcome safe", st)
	}

	// A holder that starts now (its predecessor killed mid-shutdown) holds nothing.
	h2 := runHolder()
	st = state(h2, "the shutdown seen", func(s systemd.ShutdownState) bool { return s.ShuttingDown && s.Released })
	if unheld, why := st.Unheld(); !unheld || st.ReleaseOutcome != systemd.OutcomeUnheld || st.LockHeld {
		t.Errorf("second holder's state %+v (unheld %v %q): want unheld, never safe", st, unheld, why)
	}
}
