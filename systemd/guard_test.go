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
	// The lock is taken before logind's delay is read: wait for both (reading the delay at the
	// first sight of the lock failed 13 times in 200 runs).
	eventually(t, "lock held and delay known", func() bool { s := g.Status(); return s.LockHeld && s.EffectiveDelay != 0 })
	if s := g.Status(); s.EffectiveDelay != 20*time.Second || s.LogindDelay != 30*time.Second {
		t.Errorf("status %+v, want effective 20s of logind's 30s", s)
	}
	first := f.l.lockFiles()

	b.sigs <- busSignal{prepare: true, active: true}
	ev := expectEvent(t, g, ShutdownStarted)
	if !ev.At.Equal(f.clock.Now()) || ev.Deadline.Sub(ev.At) != 20*time.Second || !ev.Held || ev.NotHeld != "" {
		t.Errorf("event %+v, want At now, Deadline 20s later, held", ev)
	}
	b.sigs <- busSignal{prepare: true, active: true} // repeated: no second event
	if s := g.Status(); !s.ShuttingDown || !s.LockHeld || s.Released {
		t.Errorf("status %+v while holding", s)
	}

	if !g.Release() {
		t.Error("Release of a held shutdown reported no lock released")
	}
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
	g.SetBlock("VMs on the node")
	eventually(t, "block lock held", func() bool { return g.Status().BlockHeld })
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
	ev := expectEvent(t, g, ShutdownStarted)
	if n := f.l.inhibits(); n != 0 {
		t.Errorf("%d Inhibit calls while logind prepares a shutdown, want 0", n)
	}
	// No lock of ours holds a shutdown that began before we connected (a lock holder restarted
	// mid-shutdown): it must never be reported as held or as released by us.
	if ev.Held || !strings.Contains(ev.NotHeld, "already preparing") {
		t.Errorf("event %+v, want not held, saying why", ev)
	}
	if s := g.Status(); s.LockHeld || !s.ShuttingDown || s.NotHeld == "" {
		t.Errorf("status %+v, want shutting down, not held", s)
	}
	if g.Release() {
		t.Error("Release reported a lock released, but no lock of ours held the shutdown")
	}
	if s := g.Status(); !s.Released || s.LockHeld {
		t.Errorf("status after Release %+v", s)
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
	if s := g.Status(); s.NotHeld == "" {
		t.Errorf("status %+v with the bus gone during a shutdown: want it said that the hold cannot be confirmed", s)
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

// A drop-in of ours from an earlier run never lowers a larger value set elsewhere later: it is
// removed when the other files allow the wanted delay, rewritten when it asks for another value,
// and left alone (no reload) when it is what is needed.
func TestStaleDropInIsRemovedOrRewritten(t *testing.T) {
	for _, tc := range []struct {
		name        string
		ours        string            // content of our drop-in before
		others      map[string]string // other files of the folder
		mainConf    string            // logind.conf beside the folder
		want        time.Duration
		wantFile    string // "" for removed
		wantReloads int
	}{
		{name: "an operator's larger value set later wins", ours: string(dropInContent(90 * time.Second)),
			others: map[string]string{"50-operator.conf": "[Login]\nInhibitDelayMaxSec=300\n"}, want: 90 * time.Second, wantReloads: 1},
		{name: "logind.conf set larger later", ours: string(dropInContent(90 * time.Second)),
			mainConf: "[Login]\nInhibitDelayMaxSec=5min\n", want: 90 * time.Second, wantReloads: 1},
		{name: "a stale value of an earlier --shutdown-timeout is rewritten", ours: string(dropInContent(600 * time.Second)),
			want: 90 * time.Second, wantFile: "InhibitDelayMaxSec=90\n", wantReloads: 1},
		{name: "no wish any more", ours: string(dropInContent(90 * time.Second)), want: 0, wantReloads: 1},
		{name: "already right", ours: string(dropInContent(90 * time.Second)),
			others: map[string]string{"10-other.conf": "[Login]\nInhibitDelayMaxSec=30\n", "99-kubelet.conf": "[Other]\nInhibitDelayMaxSec=900\n"},
			want:   90 * time.Second, wantFile: "InhibitDelayMaxSec=90\n", wantReloads: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			etc := t.TempDir()
			dir := filepath.Join(etc, "logind.conf.d")
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			write := func(path, content string) {
				if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			write(filepath.Join(dir, DropInName), tc.ours)
			for name, content := range tc.others {
				write(filepath.Join(dir, name), content)
			}
			if tc.mainConf != "" {
				write(filepath.Join(etc, "logind.conf"), tc.mainConf)
			}
			l := &fakeLogind{delay: 90 * time.Second, afterReload: 300 * time.Second}
			f := newFakeEnv(t, l)
			g := newGuard(Options{WantDelay: tc.want, DropInDir: dir, Clock: f.clock, ReloadWait: time.Millisecond}, f.dial)
			done := make(chan struct{})
			go func() {
				defer close(done)
				if _, err := g.reconcileDropIn(context.Background(), &fakeBus{l: l}); err != nil {
					t.Error(err)
				}
			}()
			for {
				select {
				case <-done:
				case <-time.After(time.Millisecond):
					f.clock.Step(delayPollInterval)
					continue
				}
				break
			}
			if l.reloads != tc.wantReloads {
				t.Errorf("%d reloads, want %d", l.reloads, tc.wantReloads)
			}
			b, err := os.ReadFile(filepath.Join(dir, DropInName))
			switch {
			case tc.wantFile == "" && err == nil:
				t.Errorf("our drop-in kept: %q", b)
			case tc.wantFile != "" && (err != nil || !strings.HasSuffix(string(b), "[Login]\n"+tc.wantFile)):
				t.Errorf("our drop-in %q, %v; want it to end with [Login] %q", b, err, tc.wantFile)
			}
		})
	}
}

func TestParseTimespan(t *testing.T) {
	for in, want := range map[string]time.Duration{"90": 90 * time.Second, "5min": 5 * time.Minute, "1min 30s": 90 * time.Second,
		"2h": 2 * time.Hour, "500ms": 500 * time.Millisecond, " 10 ": 10 * time.Second} {
		if got, ok := parseTimespan(in); !ok || got != want {
			t.Errorf("parseTimespan(%q) = %v, %v; want %v", in, got, ok, want)
		}
	}
	if _, ok := parseTimespan("soon"); ok {
		t.Error("parseTimespan(soon) accepted")
	}
}
