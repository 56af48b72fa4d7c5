package logind

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const logindBinary = "/lib/systemd/systemd-logind"

// noBoot runs argv with CAP_SYS_BOOT removed from the bounding and inheritable sets, so neither the
// program nor anything it starts can ever call reboot(2).
func noBoot(argv ...string) []string {
	return append([]string{"setpriv", "--bounding-set", "-sys_boot", "--inh-caps", "-sys_boot", "--"}, argv...)
}

// proc is one child process of the harness.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startProc starts argv with its output appended to logPath. The child gets SIGKILL when the
// thread that started it (and so the test) dies, and runs in its own process group.
func startProc(name, logPath string, env []string, extra []*os.File, argv ...string) (*proc, error) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(os.Environ(), env...)
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends sig to the process group and waits for the process, escalating to SIGKILL after
// grace.
func (p *proc) stop(sig syscall.Signal, grace time.Duration) {
	if p == nil || p.exited() {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

const busConfig = `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=%s</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
`

// startBus starts dbus-daemon and returns once it accepts connections.
func (e *Env) startBus(ctx context.Context) (*proc, error) {
	_ = os.Remove(e.socket) // a SIGKILLed daemon leaves its socket behind
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	defer r.Close()
	p, err := startProc("dbus-daemon", filepath.Join(e.dir, "dbus-daemon.log"), nil, []*os.File{w},
		noBoot("dbus-daemon", "--config-file="+filepath.Join(e.dir, "bus.conf"), "--nofork", "--nosyslog", "--print-address=3")...)
	_ = w.Close()
	if err != nil {
		return nil, err
	}
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(r).ReadString('\n')
		if err == nil && !strings.HasPrefix(line, "unix:") {
			err = fmt.Errorf("unexpected address %q", line)
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		p.stop(syscall.SIGKILL, 0)
		return nil, fmt.Errorf("waiting for dbus-daemon: %w (log %s)", err, filepath.Join(e.dir, "dbus-daemon.log"))
	}
	return p, nil
}

// nsScript runs as init of the logind namespace: a tmpfs on /run, the bus socket at its standard
// path, the test's drop-in folder over /run/systemd/logind.conf.d, the host's own logind
// configuration hidden, and systemd-logind restarted whenever it exits (as Restart=always would),
// with its state in /run/systemd wiped first when the harness asks for it.
const nsScript = `set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dbus /run/systemd/logind.conf.d
ln -s "$1" /run/dbus/system_bus_socket
mount --bind "$2" /run/systemd/logind.conf.d
if [ -d /etc/systemd/logind.conf.d ]; then mount -t tmpfs tmpfs /etc/systemd/logind.conf.d; fi
if [ -f /etc/systemd/logind.conf ]; then mount --bind /dev/null /etc/systemd/logind.conf; fi
set +e
while :; do
  if [ -e "$4/wipe-logind-state" ]; then
    rm -f "$4/wipe-logind-state"
    rm -rf /run/systemd/inhibit /run/systemd/sessions /run/systemd/users /run/systemd/seats
    echo "harness: logind state in /run/systemd wiped"
  fi
  SYSTEMD_LOG_TARGET=console "$3"
  echo "harness: systemd-logind exited with status $?"
  sleep 0.1
done
`

// startNamespace starts the throwaway mount+PID namespace in which systemd-logind runs.
//
// The namespace keeps the host's /proc (no --mount-proc) and dbus-daemon runs outside it, in the
// host's PID namespace: logind's Inhibit needs the caller's PID, which dbus-daemon takes from
// SO_PEERCRED, and a daemon inside a new PID namespace sees every process outside it (the test)
// as PID 0, so Inhibit would fail with EPROTO. With dbus-daemon and /proc in the host's view, the
// PIDs logind gets and reads are consistent.
func (e *Env) startNamespace() (*proc, error) {
	argv := []string{"unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private", "--"}
	argv = append(argv, noBoot("sh", "-c", nsScript, "logind-ns", e.socket, e.DropInDir, logindBinary, e.dir)...)
	return startProc("logind namespace", filepath.Join(e.dir, "logind.log"), nil, nil, argv...)
}

func (e *Env) startStub() (*proc, error) {
	return startProc("systemd1-stub", filepath.Join(e.dir, "systemd1-stub.log"),
		[]string{"DBUS_SYSTEM_BUS_ADDRESS=" + e.Address}, nil, noBoot(e.stubBin)...)
}

// checkHost reports what this machine lacks to run the harness.
func checkHost() error {
	var missing []string
	if os.Geteuid() != 0 {
		missing = append(missing, "root (namespaces and mounts)")
	}
	for _, b := range []string{"dbus-daemon", "unshare", "setpriv", "mount", "sh"} {
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if _, err := os.Stat(logindBinary); err != nil {
		missing = append(missing, logindBinary)
	}
	if len(missing) > 0 {
		return errors.New("logind harness: missing " + strings.Join(missing, ", ") +
			" (Debian packages: dbus, systemd, util-linux, mount)")
	}
	return nil
}
