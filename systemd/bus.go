package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/login1"
	"github.com/godbus/dbus/v5"
)

const (
	login1Name      = "org.freedesktop.login1"
	login1Path      = dbus.ObjectPath("/org/freedesktop/login1")
	login1Manager   = "org.freedesktop.login1.Manager"
	prepareSignal   = login1Manager + ".PrepareForShutdown"
	systemd1Name    = "org.freedesktop.systemd1"
	systemd1Path    = dbus.ObjectPath("/org/freedesktop/systemd1")
	systemd1Manager = "org.freedesktop.systemd1.Manager"
	logindUnit      = "systemd-logind.service"
	busName         = "org.freedesktop.DBus"
	ownerSignal     = busName + ".NameOwnerChanged"
)

// busSignal is what the Guard hears from the bus.
type busSignal struct {
	// prepare is set for PrepareForShutdown(active).
	prepare bool
	active  bool
	// ownerChanged is set when org.freedesktop.login1 changed hands; owner is the new unique
	// name, empty when logind left the bus.
	ownerChanged bool
	owner        string
}

// bus is the Guard's view of the system bus and logind; dbusBus is the real one.
type bus interface {
	// Signals delivers PrepareForShutdown and logind owner changes. It is closed when the
	// connection drops.
	Signals() <-chan busSignal
	// Inhibit takes a logind inhibitor lock; closing the file releases it.
	Inhibit(ctx context.Context, what, who, why, mode string) (*os.File, error)
	// InhibitDelayMax reads logind's InhibitDelayMaxUSec.
	InhibitDelayMax(ctx context.Context) (time.Duration, error)
	// PreparingForShutdown reads logind's PreparingForShutdown.
	PreparingForShutdown(ctx context.Context) (bool, error)
	// ReloadLogind makes logind re-read its configuration (SIGHUP through systemd1's KillUnit).
	ReloadLogind(ctx context.Context) error
	Close()
}

// timedBus bounds each call of the bus it wraps by timeout (Options.CallTimeout): a logind
// that does not answer makes the call fail, as libdbus and sd-bus clients' calls do after
// D-Bus's default 25 s, instead of holding the Guard for ever.
type timedBus struct {
	bus
	timeout time.Duration
}

func (t timedBus) Inhibit(ctx context.Context, what, who, why, mode string) (*os.File, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return t.bus.Inhibit(ctx, what, who, why, mode)
}

func (t timedBus) InhibitDelayMax(ctx context.Context) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return t.bus.InhibitDelayMax(ctx)
}

func (t timedBus) PreparingForShutdown(ctx context.Context) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return t.bus.PreparingForShutdown(ctx)
}

func (t timedBus) ReloadLogind(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, t.timeout)
	defer cancel()
	return t.bus.ReloadLogind(ctx)
}

// dialer connects to the bus; dialSystemBus is the real one.
type dialer func(ctx context.Context) (bus, error)

var _ bus = (*dbusBus)(nil)

// dbusBus holds two connections to the system bus: go-systemd's login1.Conn for the lock and
// PrepareForShutdown (login1 exposes no connection of its own), and a plain godbus connection for
// logind's properties, systemd1's KillUnit and the owner of org.freedesktop.login1.
type dbusBus struct {
	login *login1.Conn
	conn  *dbus.Conn
	out   chan busSignal
	done  chan struct{} // closed by Close
	once  sync.Once
}

// dialSystemBus connects to the bus at DBUS_SYSTEM_BUS_ADDRESS (default
// /run/dbus/system_bus_socket). ctx bounds the connection set-up.
func dialSystemBus(ctx context.Context) (bus, error) {
	type result struct {
		b   *dbusBus
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := connectSystemBus()
		ch <- result{b, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, r.err
		}
		return r.b, nil
	case <-ctx.Done():
		go func() { // a hung daemon: close whatever arrives late
			if r := <-ch; r.b != nil {
				r.b.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

func connectSystemBus() (*dbusBus, error) {
	login, err := login1.New()
	if err != nil {
		return nil, fmt.Errorf("connecting to the system bus (login1): %w", err)
	}
	conn, err := dbus.SystemBusPrivate()
	if err == nil {
		if err = conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Getuid()))}); err == nil {
			err = conn.Hello()
		}
		if err != nil {
			conn.Close()
		}
	}
	if err != nil {
		login.Close()
		return nil, fmt.Errorf("connecting to the system bus: %w", err)
	}
	b := &dbusBus{login: login, conn: conn, out: make(chan busSignal, 16), done: make(chan struct{})}
	err = conn.AddMatchSignal(dbus.WithMatchSender(busName), dbus.WithMatchInterface(busName),
		dbus.WithMatchMember("NameOwnerChanged"), dbus.WithMatchArg(0, login1Name))
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("subscribing to NameOwnerChanged(%s): %w", login1Name, err)
	}
	owners := make(chan *dbus.Signal, 16)
	conn.Signal(owners)
	prepares := login.Subscribe("PrepareForShutdown")
	owner, _ := b.nameOwner() // "" when logind is not on the bus (yet)
	go b.forward(owner, prepares, owners)
	return b, nil
}

// forward turns the two connections' signals into busSignals until either connection drops.
// PrepareForShutdown is taken only from the current owner of org.freedesktop.login1.
func (b *dbusBus) forward(owner string, prepares, owners <-chan *dbus.Signal) {
	defer close(b.out)
	for {
		select {
		case s, ok := <-prepares:
			if !ok {
				return
			}
			if s.Name != prepareSignal || s.Path != login1Path || len(s.Body) != 1 {
				continue
			}
			active, isBool := s.Body[0].(bool)
			if !isBool {
				continue
			}
			if s.Sender != owner { // a restart whose NameOwnerChanged is still on its way?
				owner, _ = b.nameOwner()
				if s.Sender != owner {
					continue
				}
			}
			if !b.send(busSignal{prepare: true, active: active}) {
				return
			}
		case s, ok := <-owners:
			if !ok {
				return
			}
			if s.Name != ownerSignal || len(s.Body) != 3 {
				continue
			}
			name, _ := s.Body[0].(string)
			newOwner, _ := s.Body[2].(string)
			if name != login1Name {
				continue
			}
			owner = newOwner
			if !b.send(busSignal{ownerChanged: true, owner: newOwner}) {
				return
			}
		}
	}
}

func (b *dbusBus) send(s busSignal) bool {
	select {
	case b.out <- s:
		return true
	case <-b.done:
		return false
	}
}

func (b *dbusBus) nameOwner() (string, error) {
	var owner string
	err := b.conn.BusObject().Call(busName+".GetNameOwner", 0, login1Name).Store(&owner)
	return owner, err
}

func (b *dbusBus) Signals() <-chan busSignal { return b.out }

func (b *dbusBus) Close() {
	b.once.Do(func() {
		close(b.done)
		b.login.Close()
		b.conn.Close()
	})
}

// Inhibit calls logind's Inhibit through login1. login1 takes no context: when ctx ends first,
// the connections are closed, which ends the call.
func (b *dbusBus) Inhibit(ctx context.Context, what, who, why, mode string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		f, err := b.login.Inhibit(what, who, why, mode)
		ch <- result{f, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-ctx.Done():
		b.Close()
		if r = <-ch; r.f != nil {
			_ = r.f.Close()
		}
		return nil, ctx.Err()
	}
	if r.err != nil {
		return nil, fmt.Errorf("logind Inhibit(%s, %s): %w", what, mode, r.err)
	}
	// godbus receives descriptors close-on-exec already; make sure, so no child process we
	// start can keep the lock alive after we release it.
	syscall.CloseOnExec(int(r.f.Fd()))
	return r.f, nil
}

func (b *dbusBus) logindProperty(ctx context.Context, name string, into any) error {
	var v dbus.Variant
	err := b.conn.Object(login1Name, login1Path).CallWithContext(ctx,
		"org.freedesktop.DBus.Properties.Get", 0, login1Manager, name).Store(&v)
	if err == nil {
		err = v.Store(into)
	}
	if err != nil {
		return fmt.Errorf("reading %s property from logind: %w", name, err)
	}
	return nil
}

func (b *dbusBus) InhibitDelayMax(ctx context.Context) (time.Duration, error) {
	var usec uint64
	if err := b.logindProperty(ctx, "InhibitDelayMaxUSec", &usec); err != nil {
		return 0, err
	}
	return time.Duration(usec) * time.Microsecond, nil
}

func (b *dbusBus) PreparingForShutdown(ctx context.Context) (bool, error) {
	var preparing bool
	err := b.logindProperty(ctx, "PreparingForShutdown", &preparing)
	return preparing, err
}

// ReloadLogind sends SIGHUP to logind the way the kubelet does: systemd1's KillUnit on
// systemd-logind.service. logind re-reads logind.conf and its drop-ins asynchronously.
func (b *dbusBus) ReloadLogind(ctx context.Context) error {
	err := b.conn.Object(systemd1Name, systemd1Path).CallWithContext(ctx,
		systemd1Manager+".KillUnit", 0, logindUnit, "main", int32(syscall.SIGHUP)).Err
	if err != nil {
		return fmt.Errorf("calling systemd1 KillUnit(%s, SIGHUP) to reload logind: %w", logindUnit, err)
	}
	return nil
}

// isOperationInProgress reports logind's refusal to take a lock while the operation it would
// inhibit is already under way.
func isOperationInProgress(err error) bool {
	const name = "org.freedesktop.login1.OperationInProgress"
	var de dbus.Error // godbus returns method errors by value
	if errors.As(err, &de) {
		return de.Name == name
	}
	var dep *dbus.Error
	return errors.As(err, &dep) && dep.Name == name
}
