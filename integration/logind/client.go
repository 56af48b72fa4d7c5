package logind

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	login1Name    = "org.freedesktop.login1"
	login1Path    = dbus.ObjectPath("/org/freedesktop/login1")
	login1Manager = "org.freedesktop.login1.Manager"
	systemd1Name  = "org.freedesktop.systemd1"
	stubPath      = dbus.ObjectPath("/org/nodeagent/test")
	stubIface     = "org.nodeagent.test.Stub1"
	pollInterval  = 10 * time.Millisecond
)

// Inhibitor is one entry of logind's ListInhibitors.
type Inhibitor struct {
	What, Who, Why, Mode string
	UID, PID             uint32
}

// Call is a method call the systemd1 stub received.
type Call struct {
	Method string // StartUnit or KillUnit
	Unit   string
	Arg    string // StartUnit: the job mode; KillUnit: "who signal"
	At     time.Time
}

// connect opens a fresh connection to the bus; every helper uses its own, so a restarted bus
// never leaves the harness with a dead one.
func (e *Env) connect(ctx context.Context) (*dbus.Conn, error) {
	conn, err := dbus.Dial(e.Address, dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", e.Address, err)
	}
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("authenticating on %s: %w", e.Address, err)
	}
	if err := conn.Hello(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("saying Hello on %s: %w", e.Address, err)
	}
	return conn, nil
}

func (e *Env) withConn(ctx context.Context, f func(*dbus.Conn) error) error {
	conn, err := e.connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return f(conn)
}

func (e *Env) callLogind(ctx context.Context, method string, args ...any) error {
	return e.withConn(ctx, func(c *dbus.Conn) error {
		if err := c.Object(login1Name, login1Path).CallWithContext(ctx, login1Manager+"."+method, 0, args...).Err; err != nil {
			return fmt.Errorf("logind %s: %w", method, err)
		}
		return nil
	})
}

// PowerOff asks the real logind to power off, as `systemctl poweroff` does. It returns once logind
// has accepted the request (with a delay lock held, before the poweroff job starts).
func (e *Env) PowerOff(ctx context.Context) error { return e.callLogind(ctx, "PowerOff", false) }

// Reboot asks the real logind to reboot.
func (e *Env) Reboot(ctx context.Context) error { return e.callLogind(ctx, "Reboot", false) }

// InhibitDelayMax reads logind's InhibitDelayMaxUSec property.
func (e *Env) InhibitDelayMax(ctx context.Context) (time.Duration, error) {
	var usec uint64
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		v, err := c.Object(login1Name, login1Path).GetProperty(login1Manager + ".InhibitDelayMaxUSec")
		if err != nil {
			return fmt.Errorf("reading InhibitDelayMaxUSec from logind: %w", err)
		}
		return v.Store(&usec)
	})
	return time.Duration(usec) * time.Microsecond, err
}

// Inhibitors lists logind's inhibitor locks.
func (e *Env) Inhibitors(ctx context.Context) ([]Inhibitor, error) {
	var out []Inhibitor
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		if err := c.Object(login1Name, login1Path).CallWithContext(ctx, login1Manager+".ListInhibitors", 0).Store(&out); err != nil {
			return fmt.Errorf("logind ListInhibitors: %w", err)
		}
		return nil
	})
	return out, err
}

// WaitInhibitors polls ListInhibitors until cond holds and returns that list.
func (e *Env) WaitInhibitors(ctx context.Context, cond func([]Inhibitor) bool) ([]Inhibitor, error) {
	var last []Inhibitor
	err := poll(ctx, "inhibitors", func() (bool, error) {
		l, err := e.Inhibitors(ctx)
		if err != nil {
			return false, nil // logind may be restarting
		}
		last = l
		return cond(l), nil
	})
	if err != nil {
		return last, fmt.Errorf("%w; last list: %+v", err, last)
	}
	return last, nil
}

// Calls returns what the systemd1 stub has received, oldest first.
func (e *Env) Calls(ctx context.Context) ([]Call, error) {
	var raw []struct {
		Method, Unit, Arg string
		At                int64
	}
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		return c.Object(systemd1Name, stubPath).CallWithContext(ctx, stubIface+".Calls", 0).Store(&raw)
	})
	if err != nil {
		return nil, fmt.Errorf("reading the stub's calls: %w", err)
	}
	out := make([]Call, 0, len(raw))
	for _, r := range raw {
		out = append(out, Call{Method: r.Method, Unit: r.Unit, Arg: r.Arg, At: time.Unix(0, r.At)})
	}
	return out, nil
}

// StartUnitAt returns the time of the first StartUnit(unit) received at or after since, if any.
func (e *Env) StartUnitAt(ctx context.Context, unit string, since time.Time) (time.Time, bool, error) {
	calls, err := e.Calls(ctx)
	if err != nil {
		return time.Time{}, false, err
	}
	for _, c := range calls {
		if c.Method == "StartUnit" && c.Unit == unit && !c.At.Before(since) {
			return c.At, true, nil
		}
	}
	return time.Time{}, false, nil
}

// WaitStartUnit waits for a StartUnit(unit) received at or after since (e.g. the poweroff job
// that logind starts once no delay lock holds it) and returns when the stub received it.
func (e *Env) WaitStartUnit(ctx context.Context, unit string, since time.Time) (time.Time, error) {
	var at time.Time
	err := poll(ctx, "StartUnit("+unit+")", func() (bool, error) {
		t, ok, err := e.StartUnitAt(ctx, unit, since)
		at = t
		return ok, err
	})
	return at, err
}

// CancelJobs makes the stub emit JobRemoved(..., "canceled") for every job it started; logind
// answers a cancelled shutdown job with PrepareForShutdown(false). It returns how many jobs.
func (e *Env) CancelJobs(ctx context.Context) (int, error) {
	var n uint32
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		return c.Object(systemd1Name, stubPath).CallWithContext(ctx, stubIface+".CancelJobs", 0).Store(&n)
	})
	return int(n), err
}

// LogindPID returns the PID (in the host's PID namespace) of the process owning org.freedesktop.login1.
func (e *Env) LogindPID(ctx context.Context) (int, error) {
	var pid uint32
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		return c.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.GetConnectionUnixProcessID", 0, login1Name).Store(&pid)
	})
	return int(pid), err
}

// ReloadLogind sends SIGHUP to logind, which re-reads logind.conf and its drop-ins, and waits until
// it has done so (its InhibitDelayMaxUSec answers again).
func (e *Env) ReloadLogind(ctx context.Context) error {
	pid, err := e.LogindPID(ctx)
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGHUP); err != nil {
		return fmt.Errorf("SIGHUP to logind (PID %d): %w", pid, err)
	}
	_, err = e.InhibitDelayMax(ctx)
	return err
}

// RestartLogind stops logind with SIGTERM; the namespace's init starts it again at once. It returns
// when the new logind owns org.freedesktop.login1.
//
// With keepState, the new logind finds /run/systemd as the old one left it and restores the
// inhibitor locks listed in /run/systemd/inhibit, as a real restart does. Without it that state is
// wiped first, so the new logind knows no lock: only clients that take their lock again have one.
func (e *Env) RestartLogind(ctx context.Context, keepState bool) error {
	if !keepState {
		if err := os.WriteFile(filepath.Join(e.dir, "wipe-logind-state"), nil, 0o644); err != nil {
			return err
		}
	}
	old, err := e.nameOwner(ctx, login1Name)
	if err != nil {
		return err
	}
	pid, err := e.LogindPID(ctx)
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return fmt.Errorf("SIGTERM to logind (PID %d): %w", pid, err)
	}
	_, err = e.waitOwner(ctx, login1Name, old)
	return err
}

// StopBus stops dbus-daemon, and then logind: systemd-logind 252 does not exit or reconnect when
// its bus goes away (it would stay off the new bus), so it is stopped as a service manager
// restarting the bus would; the namespace's init keeps starting it until the bus is back. The
// stub keeps reconnecting by itself.
func (e *Env) StopBus(ctx context.Context) error {
	pid, pidErr := e.LogindPID(ctx)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.bus.stop(syscall.SIGTERM, 5*time.Second)
	if pidErr == nil && pid > 0 {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	return nil
}

// StartBus starts dbus-daemon again on the same address and waits for logind and the stub.
func (e *Env) StartBus(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.bus != nil && !e.bus.exited() {
		return errors.New("dbus-daemon is already running")
	}
	p, err := e.startBus(ctx)
	if err != nil {
		return err
	}
	e.bus = p
	return e.waitServices(ctx)
}

// RestartBus stops and starts dbus-daemon: every client, logind included, loses its connection.
func (e *Env) RestartBus(ctx context.Context) error {
	if err := e.StopBus(ctx); err != nil {
		return err
	}
	return e.StartBus(ctx)
}

func (e *Env) nameOwner(ctx context.Context, name string) (string, error) {
	var owner string
	err := e.withConn(ctx, func(c *dbus.Conn) error {
		return c.BusObject().CallWithContext(ctx, "org.freedesktop.DBus.GetNameOwner", 0, name).Store(&owner)
	})
	return owner, err
}

// waitOwner waits until name has an owner other than not and returns it.
func (e *Env) waitOwner(ctx context.Context, name, not string) (string, error) {
	var owner string
	err := poll(ctx, name+" on the bus", func() (bool, error) {
		o, err := e.nameOwner(ctx, name)
		owner = o
		return err == nil && o != not, nil
	})
	return owner, err
}

// poll checks cond every pollInterval until it holds, fails, or ctx ends.
func poll(ctx context.Context, what string, cond func() (bool, error)) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-t.C:
		}
	}
}
