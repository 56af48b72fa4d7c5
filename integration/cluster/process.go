package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is one control-plane program, its output kept in a log file.
type process struct {
	name    string
	dir     string
	binary  string
	args    []string
	logPath string
	// respawn starts the program again when it exits by itself, as the Deployment of
	// a KubeVirt component does (virt-controller exits when it loses its leader lease).
	respawn bool

	mu       sync.Mutex
	cmd      *exec.Cmd
	stopped  bool
	restarts int

	exited chan struct{} // closed once the program has exited for good
	err    error         // valid once exited is closed
}

func startProcess(dir, name, binary string, args ...string) (*process, error) {
	return startProcessWith(false, dir, name, binary, args...)
}

// startRespawned starts a program that is started again whenever it exits by itself
// (until stop).
func startRespawned(dir, name, binary string, args ...string) (*process, error) {
	return startProcessWith(true, dir, name, binary, args...)
}

func startProcessWith(respawn bool, dir, name, binary string, args ...string) (*process, error) {
	p := &process{name: name, dir: dir, binary: binary, args: args, respawn: respawn,
		logPath: filepath.Join(dir, name+".log"), exited: make(chan struct{})}
	if err := p.launch(); err != nil {
		return nil, err
	}
	return p, nil
}

// respawnDelay is the pause before a program that exited by itself is started again.
const respawnDelay = time.Second

func (p *process) launch() error {
	logFile, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening the log of %s: %w", p.name, err)
	}
	cmd := exec.Command(p.binary, p.args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = p.dir
	// Kill the program if the test process dies without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("starting %s: %w", p.name, err)
	}
	p.mu.Lock()
	p.cmd = cmd
	if p.stopped { // stop came while it was being started again
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		again := p.respawn && !p.stopped
		if again {
			p.restarts++
			fmt.Fprintf(logFile, "node-agent test harness: %s exited (%v); starting it again in %s, as its Deployment would (restart %d)\n",
				p.name, err, respawnDelay, p.restarts)
		}
		p.mu.Unlock()
		logFile.Close()
		if again {
			time.Sleep(respawnDelay)
			if p.launch() == nil {
				return
			}
		}
		p.err = err
		close(p.exited)
	}()
	return nil
}

// current is the running command.
func (p *process) current() *exec.Cmd {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd
}

// stop ends the program: SIGTERM, then SIGKILL after the grace period.
func (p *process) stop(grace time.Duration) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.current().Process.Pid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
		_ = syscall.Kill(-p.current().Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

// restart stops the program (SIGTERM, then SIGKILL after grace) and starts it again
// with the same arguments, its log appended to the same file.
func (p *process) restart(grace time.Duration) (*process, error) {
	p.stop(grace)
	return startProcessWith(p.respawn, p.dir, p.name, p.binary, p.args...)
}

// signal sends sig to the program's process group (SIGSTOP to pause it, SIGCONT to
// resume it).
func (p *process) signal(sig syscall.Signal) error {
	if err := syscall.Kill(-p.current().Process.Pid, sig); err != nil {
		return fmt.Errorf("sending %s to %s: %w", sig, p.name, err)
	}
	return nil
}

// tail returns the last n bytes of the program's log.
func (p *process) tail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", p.logPath, err)
	}
	if len(data) > n {
		data = data[len(data)-n:]
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			data = data[i+1:]
		}
	}
	return string(data)
}

// waitFor polls check until it succeeds, the program exits, or ctx ends.
func (p *process) waitFor(ctx context.Context, what string, check func(context.Context) error) error {
	var last error
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited before %s (%v); last lines of %s:\n%s", p.name, what, p.err, p.logPath, p.tail(3000))
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last check: %v); last lines of %s:\n%s",
				what, ctx.Err(), last, p.logPath, p.tail(3000))
		case <-tick.C:
		}
	}
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ports []int
	var listeners []net.Listener
	defer func() {
		for _, l := range listeners {
			l.Close()
		}
	}()
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		listeners = append(listeners, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// errorLines returns the lines of the program's log that report an error or
// worse: KubeVirt's JSON lines at level error or fatal, klog's E and F lines,
// and Go panics.
func (p *process) errorLines() ([]string, error) {
	f, err := os.Open(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("reading the log of %s: %w", p.name, err)
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 4*1024*1024)
	for sc.Scan() {
		if line := sc.Text(); isErrorLine(line) {
			lines = append(lines, line)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading the log of %s: %w", p.name, err)
	}
	return lines, nil
}

// klogError matches the header of a klog line at severity E or F.
var klogError = regexp.MustCompile(`^[EF]\d{4} \d\d:\d\d:\d\d`)

func isErrorLine(line string) bool {
	if strings.HasPrefix(line, "{") {
		var entry struct {
			Level string `json:"level"`
		}
		if json.Unmarshal([]byte(line), &entry) == nil {
			return entry.Level == "error" || entry.Level == "fatal" || entry.Level == "panic"
		}
	}
	return klogError.MatchString(line) || strings.HasPrefix(line, "panic:")
}
