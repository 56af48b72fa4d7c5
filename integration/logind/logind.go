// Package logind gives a test a private system bus with a real systemd-logind on it.
//
// Start launches, for one test:
//   - a real dbus-daemon (system-type configuration, allow-all policy, EXTERNAL auth) listening on
//     a unix socket in a temporary directory; Env.Address is the DBUS_SYSTEM_BUS_ADDRESS for it;
//   - the real /lib/systemd/systemd-logind in a throwaway mount and PID namespace
//     (unshare --mount --pid --fork --kill-child --propagation private) with a tmpfs on /run, the
//     bus socket at /run/dbus/system_bus_socket, and Env.DropInDir bind-mounted over
//     /run/systemd/logind.conf.d, so files the test (or the code under test) writes there are
//     logind configuration;
//   - systemd1-stub (cmd/systemd1-stub, built here with go build), a stand-in for
//     org.freedesktop.systemd1 that lets logind's PowerOff complete, records StartUnit, cancels
//     jobs on request and reloads logind on KillUnit(systemd-logind.service, SIGHUP).
//
// Every process runs without CAP_SYS_BOOT (setpriv), so nothing started here can power the
// machine off; they all die when the test ends (cleanup, and a parent-death signal if the test
// binary is killed). Their logs are printed when the test fails.
//
// dbus-daemon runs outside the logind namespace, in the host's PID namespace; see startNamespace
// for why. The harness needs root, the go command (to build the stub), dbus-daemon (Debian package
// dbus), systemd-logind (systemd), unshare and setpriv (util-linux) and mount (mount).
package logind

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Option changes how Start sets up the environment.
type Option func(*config)

type config struct {
	inhibitDelayMax time.Duration
}

// WithInhibitDelayMax sets logind's InhibitDelayMaxSec in the harness's own drop-in
// (00-harness.conf). Without it logind uses its built-in default (5 s).
func WithInhibitDelayMax(d time.Duration) Option {
	return func(c *config) { c.inhibitDelayMax = d }
}

// Env is a running private bus with logind and the systemd1 stub.
type Env struct {
	// Address is the value for DBUS_SYSTEM_BUS_ADDRESS.
	Address string
	// DropInDir is the folder logind reads as /run/systemd/logind.conf.d.
	DropInDir string

	dir     string
	socket  string
	stubBin string

	mu   sync.Mutex // guards the processes during restarts and cleanup
	bus  *proc
	ns   *proc
	stub *proc
}

// Start starts the environment and registers its teardown with t.Cleanup. ctx bounds only the
// start-up; the processes live until the test ends.
func Start(ctx context.Context, t testing.TB, opts ...Option) (*Env, error) {
	t.Helper()
	var cfg config
	for _, o := range opts {
		o(&cfg)
	}
	if err := checkHost(); err != nil {
		return nil, err
	}
	stubBin, err := buildStub(ctx)
	if err != nil {
		return nil, err
	}
	// A short path of our own: unix socket paths are limited to 108 bytes, and the socket must be
	// outside /run, which the namespace replaces.
	dir, err := os.MkdirTemp("", "logind-env-")
	if err != nil {
		return nil, err
	}
	if dir == "/run" || strings.HasPrefix(dir, "/run/") {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("logind harness: temporary directory %s is under /run; set TMPDIR elsewhere", dir)
	}
	e := &Env{
		dir:       dir,
		socket:    filepath.Join(dir, "bus"),
		DropInDir: filepath.Join(dir, "logind.conf.d"),
		stubBin:   stubBin,
	}
	e.Address = "unix:path=" + e.socket
	t.Cleanup(func() {
		e.teardown()
		if t.Failed() {
			e.dumpLogs(t)
		}
		_ = os.RemoveAll(dir)
	})
	if err := e.writeConfig(cfg); err != nil {
		return nil, err
	}
	if err := e.startAll(ctx); err != nil {
		return nil, err
	}
	return e, nil
}

func (e *Env) writeConfig(cfg config) error {
	if err := os.WriteFile(filepath.Join(e.dir, "bus.conf"), []byte(fmt.Sprintf(busConfig, e.socket)), 0o644); err != nil {
		return err
	}
	if err := os.MkdirAll(e.DropInDir, 0o755); err != nil {
		return err
	}
	conf := "# written by the test harness\n[Login]\nReserveVT=0\nNAutoVTs=0\n"
	if cfg.inhibitDelayMax > 0 {
		conf += fmt.Sprintf("InhibitDelayMaxSec=%dms\n", cfg.inhibitDelayMax.Milliseconds())
	}
	return os.WriteFile(filepath.Join(e.DropInDir, "00-harness.conf"), []byte(conf), 0o644)
}

func (e *Env) startAll(ctx context.Context) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var err error
	if e.bus, err = e.startBus(ctx); err != nil {
		return err
	}
	if e.ns, err = e.startNamespace(); err != nil {
		return err
	}
	if e.stub, err = e.startStub(); err != nil {
		return err
	}
	return e.waitServices(ctx)
}

// waitServices waits until logind and the stub own their names on the bus.
func (e *Env) waitServices(ctx context.Context) error {
	for _, name := range []string{login1Name, systemd1Name} {
		if _, err := e.waitOwner(ctx, name, ""); err != nil {
			return err
		}
	}
	return nil
}

func (e *Env) teardown() {
	e.mu.Lock()
	defer e.mu.Unlock()
	// The namespace first: --kill-child takes its init, and so logind, with it.
	e.ns.stop(syscall.SIGKILL, 0)
	e.stub.stop(syscall.SIGTERM, 2*time.Second)
	e.bus.stop(syscall.SIGTERM, 2*time.Second)
}

// Logs returns the logs of dbus-daemon, logind (with the namespace's init) and the stub so far.
func (e *Env) Logs() string {
	var b strings.Builder
	for _, f := range []string{"dbus-daemon.log", "logind.log", "systemd1-stub.log"} {
		data, err := os.ReadFile(filepath.Join(e.dir, f))
		if err != nil {
			data = []byte(err.Error())
		}
		fmt.Fprintf(&b, "===== %s =====\n%s\n", f, data)
	}
	return b.String()
}

func (e *Env) dumpLogs(t testing.TB) {
	t.Logf("logind harness logs (%s):\n%s", e.dir, e.Logs())
}
