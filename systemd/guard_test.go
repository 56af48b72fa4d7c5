package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

func TestRetriesWithBackoffUntilTheBusAppears(t *testing.T) {
	noBus := errors.New("dial unix /run/dbus/system_bus_socket: no such file or directory")
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second}, noBus, noBus)
	g := f.run(Options{RetryMin: time.Second, RetryMax: 10 * time.Second})

	if f.nextDial() != nil {
		t.Fatal("first dial connected")
	}
	eventually(t, "backoff wait", f.clock.HasWaiters)
	if s := g.Status(); s.Connected || s.LockHeld || !strings.Contains(s.Degraded, "no such file") {
		t.Fatalf("status %+v, want degraded with the dial error", s)
	}
	f.clock.Step(time.Second) // first retry after RetryMin
	if f.nextDial() != nil {
		t.Fatal("second dial connected")
	}
	eventually(t, "backoff wait", f.clock.HasWaiters)
	f.clock.Step(time.Second) // the second wait is 2s: nothing yet
	select {
	case <-f.dials:
		t.Fatal("redialled before the doubled backoff")
	case <-time.After(50 * time.Millisecond):
	}
	f.clock.Step(time.Second)
	if f.nextDial() == nil {
		t.Fatal("third dial failed")
	}
	eventually(t, "lock held", func() bool { s := g.Status(); return s.Connected && s.LockHeld && s.Degraded == "" })
	if n := f.l.inhibits(); n != 1 {
		t.Errorf("%d Inhibit calls, want 1", n)
	}
}

func TestShutdownEventsReleaseAndCancel(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 30 * time.Second})
	g := f.run(Options{WantDelay: 20 * time.Second})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
	if s := g.Status(); s.EffectiveDelay != 20*time.Second || s.LogindDelay != 30*time.Second {
		t.Errorf("status %+v, want effective 20s of logind's 30s", s)
	}
	first := f.l.lockFiles()

	b.sigs <- busSignal{prepare: true, active: true}
	ev := expectEvent(t, g, ShutdownStarted)
	if !ev.At.Equal(f.clock.Now()) || ev.Deadline.Sub(ev.At) != 20*time.Second {
		t.Errorf("event %+v, want At now and Deadline 20s later", ev)
	}
	b.sigs <- busSignal{prepare: true, active: true} // repeated: no second event
	if s := g.Status(); !s.ShuttingDown || !s.LockHeld || s.Released {
		t.Errorf("status %+v while holding", s)
	}

	g.Release()
	if !isClosed(first[0]) {
		t.Error("Release left the lock open")
	}
	if s := g.Status(); s.LockHeld || !s.Released {
		t.Errorf("status %+v after Release", s)
	}
	g.Release() // again: nothing happens

	b.sigs <- busSignal{prepare: true, active: false}
	expectEvent(t, g, ShutdownCancelled)
	noEvent(t, g)
	if s := g.Status(); !s.LockHeld || s.ShuttingDown || s.Released {
		t.Errorf("status %+v after the cancel", s)
	}
	if n := f.l.inhibits(); n != 2 {
		t.Errorf("%d Inhibit calls, want 2 (the lock taken again)", n)
	}
}

func TestCancelBeforeReleaseKeepsTheSameLock(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := f.run(Options{})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
	b.sigs <- busSignal{prepare: true, active: true}
	expectEvent(t, g, ShutdownStarted)
	b.sigs <- busSignal{prepare: true, active: false}
	expectEvent(t, g, ShutdownCancelled)
	if n, locks := f.l.inhibits(), f.l.lockFiles(); n != 1 || isClosed(locks[0]) {
		t.Errorf("%d Inhibit calls, first lock closed %v; want the one lock kept", n, isClosed(locks[0]))
	}
}

func TestReleaseOutsideAShutdownKeepsTheLock(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := f.run(Options{Mode: ModeBlock})
	f.nextDial()
	eventually(t, "locks held", func() bool { return g.Status().LockHeld })
	g.Release()
	for i, l := range f.l.lockFiles() {
		if isClosed(l) {
			t.Errorf("lock %d (%s) closed by a Release outside a shutdown", i, f.l.modes[i])
		}
	}
	if got := fmt.Sprint(f.l.modes); got != "[delay block]" {
		t.Errorf("lock modes %s, want [delay block]", got)
	}
}

func TestConnectingWhileLogindPreparesIsAShutdown(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second, preparing: true})
	g := f.run(Options{})
	b := f.nextDial()
	expectEvent(t, g, ShutdownStarted)
	if n := f.l.inhibits(); n != 0 {
		t.Errorf("%d Inhibit calls while logind prepares a shutdown, want 0", n)
	}
	f.l.mu.Lock()
	f.l.preparing = false
	f.l.mu.Unlock()
	b.sigs <- busSignal{prepare: true, active: false}
	expectEvent(t, g, ShutdownCancelled)
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
}

func TestAShutdownForgottenAcrossAReconnectIsCancelled(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := f.run(Options{RetryMin: time.Second})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
	b.sigs <- busSignal{prepare: true, active: true}
	expectEvent(t, g, ShutdownStarted)
	old := f.l.lockFiles()[0]

	b.drop()
	eventually(t, "degraded", func() bool { return !g.Status().Connected })
	if isClosed(old) {
		t.Error("the lock was closed when the bus dropped")
	}
	eventually(t, "backoff wait", f.clock.HasWaiters)
	f.clock.Step(time.Second)
	f.nextDial() // the new logind prepares nothing
	expectEvent(t, g, ShutdownCancelled)
	eventually(t, "old lock replaced", func() bool { return isClosed(old) })
	if s := g.Status(); !s.LockHeld || s.ShuttingDown || !s.Connected {
		t.Errorf("status %+v", s)
	}
}

func TestLogindRestartTakesANewLockThenDropsTheOld(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := f.run(Options{})
	b := f.nextDial()
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
	old := f.l.lockFiles()[0]
	b.sigs <- busSignal{ownerChanged: true}
	eventually(t, "degraded", func() bool { return g.Status().Degraded == "systemd-logind left the bus" })
	b.sigs <- busSignal{ownerChanged: true, owner: ":1.42"}
	eventually(t, "new lock", func() bool { return f.l.inhibits() == 2 && g.Status().LockHeld })
	if !isClosed(old) {
		t.Error("old lock still open")
	}
	noEvent(t, g)
}

func TestRaiseDelayDecisions(t *testing.T) {
	for _, tc := range []struct {
		name            string
		logind, want    time.Duration
		afterReload     time.Duration
		dropIn          bool
		wantFile        string // "" for no file
		wantReloads     int
		wantLogind, eff time.Duration
		wantProblem     bool
	}{
		{"raised", 5 * time.Second, 90 * time.Second, 90 * time.Second, true, "InhibitDelayMaxSec=90\n", 1, 90 * time.Second, 90 * time.Second, false},
		{"rounded up", time.Second, 1500 * time.Millisecond, 2 * time.Second, true, "InhibitDelayMaxSec=2\n", 1, 2 * time.Second, 1500 * time.Millisecond, false},
		{"larger kept", 120 * time.Second, 60 * time.Second, 0, true, "", 0, 120 * time.Second, 60 * time.Second, false},
		{"equal kept", 60 * time.Second, 60 * time.Second, 0, true, "", 0, 60 * time.Second, 60 * time.Second, false},
		{"no wish", 5 * time.Second, 0, 0, true, "", 0, 5 * time.Second, 5 * time.Second, false},
		{"no folder", 5 * time.Second, 60 * time.Second, 0, false, "", 0, 5 * time.Second, 5 * time.Second, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := ""
			if tc.dropIn {
				dir = filepath.Join(t.TempDir(), "logind.conf.d")
			}
			l := &fakeLogind{delay: tc.logind, afterReload: tc.afterReload}
			f := newFakeEnv(t, l)
			g := newGuard(Options{WantDelay: tc.want, DropInDir: dir, Clock: f.clock}, f.dial)
			if err := g.adjustDelay(context.Background(), &fakeBus{l: l}); err != nil {
				t.Fatal(err)
			}
			s := g.Status()
			if s.LogindDelay != tc.wantLogind || s.EffectiveDelay != tc.eff || (s.DelayProblem != "") != tc.wantProblem {
				t.Errorf("status %+v, want logind %v, effective %v, problem %v", s, tc.wantLogind, tc.eff, tc.wantProblem)
			}
			if l.reloads != tc.wantReloads {
				t.Errorf("%d reloads, want %d", l.reloads, tc.wantReloads)
			}
			b, err := os.ReadFile(filepath.Join(dir, DropInName))
			switch {
			case tc.wantFile == "" && err == nil:
				t.Errorf("drop-in written: %q", b)
			case tc.wantFile != "" && (err != nil || !strings.HasSuffix(string(b), "[Login]\n"+tc.wantFile)):
				t.Errorf("drop-in %q, %v; want it to end with [Login] %q", b, err, tc.wantFile)
			}
		})
	}
}

func TestRunRejectsBadOptionsAndASecondCall(t *testing.T) {
	for _, o := range []Options{{Mode: "lock"}, {WantDelay: -time.Second}} {
		if err := newGuard(o, nil).Run(context.Background()); err == nil {
			t.Errorf("Run with %+v: no error", o)
		}
	}
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := f.run(Options{})
	f.nextDial()
	if err := g.Run(context.Background()); err == nil {
		t.Error("second Run: no error")
	}
}

func TestRunEndsReleasingTheLockAndClosingEvents(t *testing.T) {
	f := newFakeEnv(t, &fakeLogind{delay: 5 * time.Second})
	g := newGuard(Options{Clock: f.clock}, f.dial)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- g.Run(ctx) }()
	f.nextDial()
	eventually(t, "lock held", func() bool { return g.Status().LockHeld })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !isClosed(f.l.lockFiles()[0]) {
		t.Error("lock still open after Run returned")
	}
	if _, ok := <-g.Events(); ok {
		t.Error("Events not closed")
	}
	if s := g.Status(); s.Connected || s.LockHeld || s.Degraded != "stopped" {
		t.Errorf("status %+v after Run", s)
	}
}

func TestIsOperationInProgress(t *testing.T) {
	inProgress := dbus.Error{Name: "org.freedesktop.login1.OperationInProgress"}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{inProgress, true},
		{fmt.Errorf("logind Inhibit(shutdown, delay): %w", inProgress), true},
		{&inProgress, true},
		{dbus.Error{Name: "org.freedesktop.DBus.Error.AccessDenied"}, false},
		{errors.New("OperationInProgress"), false},
	} {
		if got := isOperationInProgress(tc.err); got != tc.want {
			t.Errorf("isOperationInProgress(%v) = %v", tc.err, got)
		}
	}
}

func TestALaterDropInWinningIsNotReloadedOnEveryConnection(t *testing.T) {
	l := &fakeLogind{delay: 20 * time.Second, afterReload: 20 * time.Second} // 99-kubelet.conf says 20
	dir := t.TempDir()
	g := newGuard(Options{WantDelay: time.Minute, DropInDir: dir, ReloadWait: 100 * time.Millisecond}, nil)
	for i := 0; i < 3; i++ { // the first connection and two reconnections
		if err := g.adjustDelay(context.Background(), &fakeBus{l: l}); err != nil {
			t.Fatal(err)
		}
		if s := g.Status(); s.EffectiveDelay != 20*time.Second || !strings.Contains(s.DelayProblem, "99-kubelet.conf") {
			t.Errorf("connection %d: status %+v, want effective 20s and a problem naming 99-kubelet.conf", i, s)
		}
	}
	if l.reloads != 1 {
		t.Errorf("%d reloads, want 1", l.reloads)
	}
	if b, err := os.ReadFile(filepath.Join(dir, DropInName)); err != nil || !strings.Contains(string(b), "InhibitDelayMaxSec=60\n") {
		t.Errorf("drop-in %q, %v", b, err)
	}
}
