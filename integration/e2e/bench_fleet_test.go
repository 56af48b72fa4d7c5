package e2e

// A fleet of agents against one API server (issue 14, points 4 and 5): one agent per
// simulated node, idle, as a DaemonSet runs them. It measures, side by side on the same
// cluster with the same simulated nodes, the API server without the agents and with
// them (its CPU and memory, the watches the agents hold), the time for every agent to
// be ready, and, over an idle window, each agent's CPU and memory and the requests the
// agents make (from the API server's audit log).
//
//	go test -run '^$' -bench 'BenchmarkFleetOfAgents' -benchtime 1x -timeout 90m ./integration/e2e/
//
// NODE_AGENT_BENCH_AGENTS (default 200) sets the fleet's size, NODE_AGENT_BENCH_IDLE
// (default 10m) the idle window with the agents (the idle CPU is averaged over
// 10 minutes); the API server's baseline without them is measured over 3 minutes at most.
// Run without -race, as the benchmarks are: the agents are then plain builds.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

func BenchmarkFleetOfAgents(b *testing.B) {
	n := benchEnvInt(b, "NODE_AGENT_BENCH_AGENTS", 200)
	idle := 10 * time.Minute
	if v := os.Getenv("NODE_AGENT_BENCH_IDLE"); v != "" {
		var err error
		if idle, err = time.ParseDuration(v); err != nil || idle < 10*time.Second {
			b.Fatalf("NODE_AGENT_BENCH_IDLE=%q: want a duration of 10s or more", v)
		}
	}
	for i := 0; i < b.N; i++ {
		benchFleet(b, n, idle)
	}
}

// fleetWindow is what one idle window measured.
type fleetWindow struct {
	apiCPU   float64 // kube-apiserver, millicores
	etcdCPU  float64 // etcd, millicores
	apiRSS   int     // kube-apiserver, KiB at the end
	watches  int     // long-running WATCH requests the API server serves at the end
	agentCPU []float64
	agentRSS []int
}

func benchFleet(b *testing.B, n int, idle time.Duration) {
	out := os.Stdout
	sc := newScenario(b, n)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour) // longer than a scenario's
	defer cancel()
	sc.ctx = ctx
	c := sc.env.cluster
	kubeconfig, user := sc.adminServiceAccount(benchAgentAccount)
	fmt.Fprintf(out, "bench: %d simulated nodes up; the agents' idle window %s, the API server's baseline %s\n", n, idle, min(idle, 3*time.Minute))

	window := func(idle time.Duration, pids []int) fleetWindow {
		api, etcd := c.PID("kube-apiserver"), c.PID("etcd")
		before := map[int]float64{api: procCPU(api), etcd: procCPU(etcd)}
		for _, p := range pids {
			before[p] = procCPU(p)
		}
		start := time.Now()
		select {
		case <-time.After(idle):
		case <-sc.ctx.Done():
			b.Fatal(sc.ctx.Err())
		}
		secs := time.Since(start).Seconds()
		milli := func(pid int) float64 { return (procCPU(pid) - before[pid]) / secs * 1000 }
		w := fleetWindow{apiCPU: milli(api), etcdCPU: milli(etcd), apiRSS: procStatusKiB(api, "VmRSS:"), watches: sc.watchesServed()}
		for _, p := range pids {
			w.agentCPU = append(w.agentCPU, milli(p))
			w.agentRSS = append(w.agentRSS, procStatusKiB(p, "VmRSS:"))
		}
		return w
	}

	// The API server's own baseline: a shorter window does (the agents' idle CPU is
	// what the whole window is for).
	without := window(min(idle, 3*time.Minute), nil)
	fmt.Fprintf(out, "bench: without agents: kube-apiserver %.0f millicores, %d MiB; etcd %.0f millicores; %d watches served\n",
		without.apiCPU, without.apiRSS/1024, without.etcdCPU, without.watches)

	start := time.Now()
	agents := make([]*agentProc, 0, n)
	port := 20000
	for _, node := range sc.nodes {
		var addr string
		addr, port = fleetAddr(b, port)
		agents = append(agents, sc.spawnAgent(sc.env.agentBin, node, addr, []string{"run", "--kubeconfig=" + kubeconfig,
			"--node-name=" + node, "--listen-address=" + addr, "--shutdown-inhibitor=false"}, nil))
	}
	for _, a := range agents {
		a.waitServing("/readyz", 10*time.Minute)
	}
	ready := time.Since(start)
	fmt.Fprintf(out, "bench: %d agents started and ready in %s\n", n, ready.Round(100*time.Millisecond))

	pids := make([]int, len(agents))
	for i, a := range agents {
		pids[i] = a.cmd.Process.Pid
	}
	from := time.Now()
	with := window(idle, pids)
	to := time.Now()
	counts, err := agentRequestCounts(c.AuditLog, user, from, to)
	if err != nil {
		b.Fatal(err)
	}
	requests := 0
	var kinds []string
	for what, k := range counts {
		requests += k
		kinds = append(kinds, fmt.Sprintf("%s %d", what, k))
	}
	sort.Strings(kinds)
	perHour := float64(requests) / to.Sub(from).Hours()
	agentWatches := with.watches - without.watches

	fmt.Fprintf(out, "bench: with agents: kube-apiserver %.0f millicores, %d MiB; etcd %.0f millicores; %d watches served\n",
		with.apiCPU, with.apiRSS/1024, with.etcdCPU, with.watches)
	fmt.Fprintf(out, "bench: the agents' requests over the idle window: %d (%s)\n", requests, strings.Join(kinds, ", "))
	fmt.Fprintf(out, "\n| agents | all ready | watches held by the agents (per agent) | kube-apiserver CPU without / with (millicores) | kube-apiserver RSS without / with (MiB) | etcd CPU without / with (millicores) | agent idle CPU over %s, median (max) (millicores) | agent RSS median (max) (MiB) | agents' requests while idle (per agent per hour) |\n", idle)
	fmt.Fprintf(out, "|---|---|---|---|---|---|---|---|---|\n")
	fmt.Fprintf(out, "| %d | %.1f s | %d (%.1f) | %.0f / %.0f | %d / %d | %.0f / %.0f | %.2f (%.2f) | %.1f (%.1f) | %.0f (%.2f) |\n",
		n, ready.Seconds(), agentWatches, float64(agentWatches)/float64(n),
		without.apiCPU, with.apiCPU, without.apiRSS/1024, with.apiRSS/1024, without.etcdCPU, with.etcdCPU,
		medianF(with.agentCPU), maxF(with.agentCPU), medianF(kibToMiB(with.agentRSS)), maxF(kibToMiB(with.agentRSS)),
		perHour, perHour/float64(n))
	fmt.Fprintf(out, "\nbench: at 5,000 nodes, by the same figures: %d watches, %.0f requests an idle hour\n",
		agentWatches*5000/n, perHour*5000/float64(n))
	b.ReportMetric(ready.Seconds(), "s-all-ready")
	b.ReportMetric(medianF(with.agentCPU), "millicores-agent-idle")
	b.ReportMetric(float64(agentWatches)/float64(n), "watches-per-agent")
}

// fleetAddr returns a free local address at or after port, below Linux's ephemeral
// range (32768 and up), and the port after it: the agents all start at once, so each
// needs a port that neither another agent nor an outgoing connection takes before it
// binds (freeAddr's port, from the ephemeral range, may be handed out again meanwhile).
func fleetAddr(t testing.TB, port int) (string, int) {
	t.Helper()
	for ; port < 32768; port++ {
		addr := "127.0.0.1:" + strconv.Itoa(port)
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr, port + 1
		}
	}
	t.Fatal("no free port below 32768")
	return "", port
}

// watchesServed is the number of WATCH requests the API server serves now
// (apiserver_longrunning_requests).
func (sc *scenario) watchesServed() int {
	sc.t.Helper()
	raw, err := sc.kube().Discovery().RESTClient().Get().AbsPath("/metrics").DoRaw(sc.ctx)
	if err != nil {
		sc.t.Fatalf("reading the API server's metrics: %v", err)
	}
	total := 0
	s := bufio.NewScanner(strings.NewReader(string(raw)))
	s.Buffer(make([]byte, 1<<20), 1<<20)
	for s.Scan() {
		line := s.Text()
		if !strings.HasPrefix(line, "apiserver_longrunning_requests{") || !strings.Contains(line, `verb="WATCH"`) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			total += int(v)
		}
	}
	return total
}

// procCPU is a process's user and system CPU so far, in seconds (0 if it is gone).
func procCPU(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

// procStatusKiB reads a field of /proc/PID/status given in kB (VmRSS:, VmHWM:).
func procStatusKiB(pid int, field string) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, field) {
			if f := strings.Fields(line); len(f) >= 2 {
				v, _ := strconv.Atoi(f[1])
				return v
			}
		}
	}
	return 0
}

func kibToMiB(kib []int) []float64 {
	out := make([]float64, len(kib))
	for i, k := range kib {
		out[i] = float64(k) / 1024
	}
	return out
}

func medianF(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func maxF(v []float64) float64 {
	m := 0.0
	for _, x := range v {
		if x > m {
			m = x
		}
	}
	return m
}
