package e2e

// Benchmarks of a whole drain on the real control plane:
//
//	go test -run '^$' -bench 'BenchmarkDrain$' -benchtime 1x ./integration/e2e/
//
// Each reports how long the agent took to act on every VM (all evictions answered),
// how long until the node was safe, and the agent's peak memory: resident (VmHWM) and
// its own (RssAnon, sampled every 100 ms). The agent is the test build, or with
// NODE_AGENT_BENCH_BUILD=release the build the image ships (hack/build.sh), with
// NODE_AGENT_BENCH_AGENT_ENV added to its environment.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

func BenchmarkDrain(b *testing.B) {
	for _, n := range []int{10, 50, 100} {
		b.Run(fmt.Sprintf("vms=%d", n), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				benchmarkDrain(b, n)
			}
		})
	}
}

func benchmarkDrain(b *testing.B, n int) {
	b.StopTimer()
	sc := newScenario(b, 2)
	node := sc.nodes[0]
	for i := 0; i < n; i++ {
		if err := sc.env.sim.Create(sc.ctx, sim.NewVMI(sc.ns, fmt.Sprintf("vm%03d", i), sc.vmOpts([]sim.VMOption{onNode(node), noneStrategy})...)); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		if _, err := sc.env.sim.WaitForVMIRunning(sc.ctx, sc.ns, fmt.Sprintf("vm%03d", i)); err != nil {
			b.Fatal(err)
		}
	}
	bin, build := sc.env.agentBin, "test"
	if os.Getenv("NODE_AGENT_BENCH_BUILD") == "release" {
		bin, build = releaseBuild(sc.ctx, b), "release"
	}
	// NODE_AGENT_BENCH_AGENT_ENV: the agent's extra environment (NAME=value ...), such
	// as GOMEMLIMIT or GOGC.
	env := strings.Fields(os.Getenv("NODE_AGENT_BENCH_AGENT_ENV"))
	// The agent as deployed: a service account whose requests are in its own priority
	// level (manifests/base/flowcontrol.yaml), where it asks every VM at once;
	// NODE_AGENT_BENCH_FLOWSCHEMA=0 leaves it in workload-low (16 at a time).
	kubeconfig, _ := sc.adminServiceAccount(benchAgentAccount)
	sc.applyOwnPriorityLevel(benchAgentAccount)
	a := sc.startAgentBin(bin, node, env, "--profiling", "--kubeconfig="+kubeconfig)
	// The agent's own memory (RssAnon: its heap, stacks and runtime, not the binary's
	// pages), sampled through the drain: the kernel keeps no peak of it.
	var ownPeak atomic.Int64
	sampled := make(chan struct{})
	stopSampling := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			if kib := int64(procStatusKiB(a.cmd.Process.Pid, "RssAnon:")); kib > ownPeak.Load() {
				ownPeak.Store(kib)
			}
			select {
			case <-stopSampling:
				return
			case <-tick.C:
			}
		}
	}()
	b.StartTimer()
	start := time.Now()
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	var requested time.Duration
	var heapProfile string
	sc.eventually(10*time.Minute, "every VM acted on", func() (bool, string) {
		_, st := a.safeToShutdown("")
		pending := 0
		for _, v := range st.VMs {
			if v.State == "pending" || v.State == "running" {
				pending++
			}
		}
		if pending == 0 && st.Draining {
			requested = time.Since(start)
			heapProfile = a.heapProfile(fmt.Sprintf("drain-%d-acted", n))
			return true, ""
		}
		return false, fmt.Sprintf("%d pending", pending)
	})
	a.waitSafe(10 * time.Minute)
	safe := time.Since(start)
	b.StopTimer()
	close(stopSampling)
	<-sampled
	b.ReportMetric(requested.Seconds(), "s-to-act-on-all")
	b.ReportMetric(safe.Seconds(), "s-to-safe")
	peakMiB, ownMiB := float64(peakRSS(a.cmd.Process.Pid))/1024, float64(ownPeak.Load())/1024
	b.ReportMetric(peakMiB, "MiB-agent-peak-rss")
	b.ReportMetric(ownMiB, "MiB-agent-own-peak")
	fmt.Printf("bench: %d VMs, the %s build %v: acted on every VM after %.2f s, safe after %.2f s, resident at most %.1f MiB, its own at most %.1f MiB\n",
		n, build, env, requested.Seconds(), safe.Seconds(), peakMiB, ownMiB)
	fmt.Printf("bench: %d VMs: the agent's heap once every VM was acted on (%s; go tool pprof -top -sample_index=inuse_space):\n%s\n",
		n, heapProfile, pprofTop(bin, heapProfile))
}

// peakRSS reads a process's peak resident set (VmHWM) in KiB.
func peakRSS(pid int) int { return procStatusKiB(pid, "VmHWM:") }

// heapProfile saves the agent's heap profile (it runs with --profiling), after a
// garbage collection, as name in
// NODE_AGENT_BENCH_PROFILES (default: the test's temporary folder) and returns its path.
func (a *agentProc) heapProfile(name string) string {
	a.sc.t.Helper()
	dir := os.Getenv("NODE_AGENT_BENCH_PROFILES")
	if dir == "" {
		dir = a.sc.t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		a.sc.t.Fatal(err)
	}
	code, body := a.get("/debug/pprof/heap?gc=1")
	if code != 200 {
		a.sc.t.Fatalf("the heap profile: %d %s", code, body)
	}
	path := filepath.Join(dir, name+".pb.gz")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		a.sc.t.Fatal(err)
	}
	return path
}
