package logind

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

func start(t *testing.T, opts ...Option) (*Env, context.Context) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	e, err := Start(ctx, t, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return e, ctx
}

// watchPrepare subscribes to PrepareForShutdown on a connection of its own.
func watchPrepare(ctx context.Context, t *testing.T, e *Env) <-chan bool {
	t.Helper()
	conn, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.AddMatchSignal(dbus.WithMatchInterface(login1Manager), dbus.WithMatchMember("PrepareForShutdown")); err != nil {
		t.Fatal(err)
	}
	sigs := make(chan *dbus.Signal, 10)
	conn.Signal(sigs)
	out := make(chan bool, 10)
	go func() {
		for s := range sigs {
			if s.Name == login1Manager+".PrepareForShutdown" && len(s.Body) == 1 {
				out <- s.Body[0].(bool)
			}
		}
	}()
	return out
}

func expectPrepare(ctx context.Context, t *testing.T, ch <-chan bool, want bool) {
	t.Helper()
	select {
	case got := <-ch:
		if got != want {
			t.Fatalf("PrepareForShutdown(%v), want %v", got, want)
		}
	case <-ctx.Done():
		t.Fatalf("no PrepareForShutdown(%v): %v", want, ctx.Err())
	}
}

func TestPowerOffReachesTheStubAndCancelReachesClients(t *testing.T) {
	e, ctx := start(t)
	prep := watchPrepare(ctx, t, e)
	before := time.Now()
	if err := e.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	expectPrepare(ctx, t, prep, true)
	at, err := e.WaitStartUnit(ctx, "poweroff.target", before)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("no lock: poweroff job started %v after PowerOff", at.Sub(before))
	n, err := e.CancelJobs(ctx)
	if err != nil || n != 1 {
		t.Fatalf("CancelJobs = %d, %v; want 1 job", n, err)
	}
	expectPrepare(ctx, t, prep, false)
}

func TestKillUnitReloadsLogindConfiguration(t *testing.T) {
	e, ctx := start(t, WithInhibitDelayMax(2*time.Second))
	if d, err := e.InhibitDelayMax(ctx); err != nil || d != 2*time.Second {
		t.Fatalf("InhibitDelayMax = %v, %v; want 2s from the harness option", d, err)
	}
	if err := os.WriteFile(filepath.Join(e.DropInDir, "50-test.conf"), []byte("[Login]\nInhibitDelayMaxSec=7\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		return c.Object(systemd1Name, "/org/freedesktop/systemd1").CallWithContext(ctx,
			"org.freedesktop.systemd1.Manager.KillUnit", 0, "systemd-logind.service", "all", int32(1)).Err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := poll(ctx, "InhibitDelayMaxUSec = 7s", func() (bool, error) {
		d, err := e.InhibitDelayMax(ctx)
		return d == 7*time.Second, err
	}); err != nil {
		t.Fatal(err)
	}
}

func TestRestarts(t *testing.T) {
	e, ctx := start(t)
	pid, err := e.LogindPID(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.RestartLogind(ctx, false); err != nil {
		t.Fatal(err)
	}
	pid2, err := e.LogindPID(ctx)
	if err != nil || pid2 == pid {
		t.Fatalf("logind PID after restart = %d, %v; before %d", pid2, err, pid)
	}
	if err := e.RestartBus(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.Inhibitors(ctx); err != nil {
		t.Fatalf("logind after a bus restart: %v", err)
	}
	before := time.Now()
	if err := e.PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := e.WaitStartUnit(ctx, "poweroff.target", before); err != nil {
		t.Fatalf("the stub after a bus restart: %v", err)
	}
}

func TestStubCanBeBuiltAndFound(t *testing.T) {
	bin, err := buildStub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(bin); err != nil || fi.Mode()&0o111 == 0 {
		t.Fatalf("stub binary %s: %v", bin, err)
	}
}

func TestRestartLogindKeepsOrWipesInhibitors(t *testing.T) {
	e, ctx := start(t)
	conn, err := e.connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var fd dbus.UnixFD
	if err := conn.Object(login1Name, login1Path).CallWithContext(ctx, login1Manager+".Inhibit", 0,
		"shutdown", "harness-test", "test", "delay").Store(&fd); err != nil {
		t.Fatal(err)
	}
	lock := os.NewFile(uintptr(fd), "inhibit")
	defer lock.Close()
	count := func(l []Inhibitor) int {
		n := 0
		for _, i := range l {
			if i.Who == "harness-test" {
				n++
			}
		}
		return n
	}
	if _, err := e.WaitInhibitors(ctx, func(l []Inhibitor) bool { return count(l) == 1 }); err != nil {
		t.Fatal(err)
	}
	if err := e.RestartLogind(ctx, true); err != nil {
		t.Fatal(err)
	}
	if l, err := e.Inhibitors(ctx); err != nil || count(l) != 1 {
		t.Fatalf("after a restart keeping state: %+v, %v; want the lock restored", l, err)
	}
	if err := e.RestartLogind(ctx, false); err != nil {
		t.Fatal(err)
	}
	if l, err := e.Inhibitors(ctx); err != nil || count(l) != 0 {
		t.Fatalf("after a restart without state: %+v, %v; want no lock", l, err)
	}
}
