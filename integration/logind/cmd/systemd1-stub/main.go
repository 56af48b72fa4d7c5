// Command systemd1-stub is a tiny stand-in for org.freedesktop.systemd1 on a private test bus.
//
// systemd-logind needs a service manager to carry out a shutdown: it asks for the LoadState of
// poweroff.target before it starts the delay, calls StartUnit when the delay is over, and waits for
// JobRemoved. This stub answers those calls, records them with the wall-clock time they arrived,
// implements KillUnit for systemd-logind.service by signalling the process that owns
// org.freedesktop.login1 (so a configuration reload by SIGHUP works), and exposes a control
// interface (org.nodeagent.test.Stub1 at /org/nodeagent/test) through which a test reads the
// recorded calls and cancels the pending jobs, which makes logind send PrepareForShutdown(false).
//
// It reads DBUS_SYSTEM_BUS_ADDRESS and reconnects whenever the bus goes away, keeping its records.
// It never powers anything off.
package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

const (
	managerPath  = dbus.ObjectPath("/org/freedesktop/systemd1")
	managerIface = "org.freedesktop.systemd1.Manager"
	unitPrefix   = "/org/freedesktop/systemd1/unit/"
	controlPath  = dbus.ObjectPath("/org/nodeagent/test")
	controlIface = "org.nodeagent.test.Stub1"
	logindUnit   = "systemd-logind.service"
)

// knownUnits are the units whose LoadState is "loaded".
func knownUnits() []string {
	return []string{"poweroff.target", "reboot.target", "halt.target", "kexec.target", logindUnit}
}

// Call is one recorded method call, as the control interface returns it: a(sssx).
type Call struct {
	Method string
	Unit   string
	Arg    string
	At     int64 // wall clock, Unix nanoseconds
}

type job struct {
	id   uint32
	path dbus.ObjectPath
	unit string
}

type stub struct {
	mu      sync.Mutex
	conn    *dbus.Conn
	calls   []Call
	pending []job
	nextJob uint32
}

func (s *stub) record(method, unit, arg string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.calls = append(s.calls, Call{Method: method, Unit: unit, Arg: arg, At: time.Now().UnixNano()})
	log.Printf("%s(%s, %s)", method, unit, arg)
}

func known(unit string) bool {
	for _, u := range knownUnits() {
		if u == unit {
			return true
		}
	}
	return false
}

// unitPath escapes a unit name the way systemd does for its object paths.
func unitPath(unit string) dbus.ObjectPath {
	out := []byte(unitPrefix)
	for i := 0; i < len(unit); i++ {
		c := unit[i]
		if (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') {
			out = append(out, c)
			continue
		}
		out = append(out, fmt.Sprintf("_%02x", c)...)
	}
	return dbus.ObjectPath(out)
}

func noSuchUnit(unit string) *dbus.Error {
	return dbus.NewError("org.freedesktop.systemd1.NoSuchUnit", []any{"Unit " + unit + " not loaded."})
}

// manager implements the parts of org.freedesktop.systemd1.Manager that logind uses.
type manager struct{ s *stub }

func (m manager) StartUnit(unit, mode string) (dbus.ObjectPath, *dbus.Error) {
	if !known(unit) {
		return "", noSuchUnit(unit)
	}
	m.s.record("StartUnit", unit, mode)
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	m.s.nextJob++
	j := job{id: m.s.nextJob, path: dbus.ObjectPath("/org/freedesktop/systemd1/job/" + strconv.Itoa(int(m.s.nextJob))), unit: unit}
	m.s.pending = append(m.s.pending, j)
	return j.path, nil
}

func (m manager) KillUnit(unit, who string, sig int32) *dbus.Error {
	m.s.record("KillUnit", unit, who+" "+strconv.Itoa(int(sig)))
	if unit != logindUnit {
		return noSuchUnit(unit)
	}
	m.s.mu.Lock()
	conn := m.s.conn
	m.s.mu.Unlock()
	var pid uint32
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionUnixProcessID", 0, "org.freedesktop.login1").Store(&pid); err != nil {
		return dbus.MakeFailedError(fmt.Errorf("finding the PID of org.freedesktop.login1: %w", err))
	}
	if err := syscall.Kill(int(pid), syscall.Signal(sig)); err != nil {
		return dbus.MakeFailedError(fmt.Errorf("signalling systemd-logind (PID %d): %w", pid, err))
	}
	return nil
}

func (m manager) GetUnit(unit string) (dbus.ObjectPath, *dbus.Error) {
	if !known(unit) {
		return "", noSuchUnit(unit)
	}
	return unitPath(unit), nil
}

func (m manager) LoadUnit(unit string) (dbus.ObjectPath, *dbus.Error) { return m.GetUnit(unit) }
func (m manager) Subscribe() *dbus.Error                              { return nil }
func (m manager) Unsubscribe() *dbus.Error                            { return nil }

// unitProps implements org.freedesktop.DBus.Properties for one unit object.
type unitProps struct{ unit string }

func (u unitProps) props() map[string]dbus.Variant {
	return map[string]dbus.Variant{
		"Id":          dbus.MakeVariant(u.unit),
		"LoadState":   dbus.MakeVariant("loaded"),
		"ActiveState": dbus.MakeVariant("inactive"),
		"SubState":    dbus.MakeVariant("dead"),
	}
}

func (u unitProps) Get(iface, name string) (dbus.Variant, *dbus.Error) {
	v, ok := u.props()[name]
	if !ok {
		return dbus.Variant{}, dbus.NewError("org.freedesktop.DBus.Error.UnknownProperty", []any{name})
	}
	return v, nil
}

func (u unitProps) GetAll(iface string) (map[string]dbus.Variant, *dbus.Error) {
	return u.props(), nil
}

// control is the test's interface to the stub.
type control struct{ s *stub }

// Calls returns every recorded call, oldest first.
func (c control) Calls() ([]Call, *dbus.Error) {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	return append([]Call(nil), c.s.calls...), nil
}

// CancelJobs emits JobRemoved(..., "canceled") for every pending job and returns how many.
func (c control) CancelJobs() (uint32, *dbus.Error) {
	c.s.mu.Lock()
	jobs, conn := c.s.pending, c.s.conn
	c.s.pending = nil
	c.s.mu.Unlock()
	for _, j := range jobs {
		log.Printf("JobRemoved(%d, %s, %s, canceled)", j.id, j.path, j.unit)
		if err := conn.Emit(managerPath, managerIface+".JobRemoved", j.id, j.path, j.unit, "canceled"); err != nil {
			return 0, dbus.MakeFailedError(fmt.Errorf("emitting JobRemoved: %w", err))
		}
	}
	return uint32(len(jobs)), nil
}

func (s *stub) serve(ctx context.Context, addr string) error {
	conn, err := dbus.Dial(addr, dbus.WithContext(ctx))
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err != nil {
		return fmt.Errorf("auth: %w", err)
	}
	if err := conn.Hello(); err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	s.mu.Lock()
	s.conn = conn
	s.mu.Unlock()
	if err := conn.Export(manager{s}, managerPath, managerIface); err != nil {
		return err
	}
	for _, u := range knownUnits() {
		if err := conn.Export(unitProps{u}, unitPath(u), "org.freedesktop.DBus.Properties"); err != nil {
			return err
		}
	}
	if err := conn.Export(control{s}, controlPath, controlIface); err != nil {
		return err
	}
	reply, err := conn.RequestName("org.freedesktop.systemd1", dbus.NameFlagDoNotQueue)
	if err != nil {
		return fmt.Errorf("RequestName: %w", err)
	}
	if reply != dbus.RequestNameReplyPrimaryOwner {
		return fmt.Errorf("RequestName: not the primary owner (reply %d)", reply)
	}
	log.Printf("serving org.freedesktop.systemd1 on %s", addr)
	<-conn.Context().Done()
	return fmt.Errorf("bus connection closed")
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("systemd1-stub: ")
	addr := os.Getenv("DBUS_SYSTEM_BUS_ADDRESS")
	if addr == "" {
		log.Fatal("DBUS_SYSTEM_BUS_ADDRESS is not set")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	s := &stub{}
	for ctx.Err() == nil {
		err := s.serve(ctx, addr)
		if ctx.Err() != nil {
			break
		}
		log.Printf("%v; reconnecting", err)
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}
