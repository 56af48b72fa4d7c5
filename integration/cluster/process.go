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
	"syscall"
	"time"
)

// process is one control-plane program, its output kept in a log file.
type process struct {
	name    string
	dir     string
	binary  string
	args    []string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{}
	err     error // valid once exited is closed
}

func startProcess(dir, name, binary string, args ...string) (*process, error) {
	logPath := filepath.Join(dir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening the log of %s: %w", name, err)
	}
	cmd := exec.Command(binary, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = dir
	// Kill the program if the test process dies without stopping it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, dir: dir, binary: binary, args: args, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		logFile.Close()
		close(p.exited)
	}()
	return p, nil
}

// stop ends the program: SIGTERM, then SIGKILL after the grace period.
func (p *process) stop(grace time.Duration) {
	if p == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(grace):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

// restart stops the program (SIGTERM, then SIGKILL after grace) and starts it again
// with the same arguments, its log appended to the same file.
func (p *process) restart(grace time.Duration) (*process, error) {
	p.stop(grace)
	return startProcess(p.dir, p.name, p.binary, p.args...)
}

// signal sends sig to the program's process group (SIGSTOP to pause it, SIGCONT to
// resume it).
func (p *process) signal(sig syscall.Signal) error {
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil {
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
