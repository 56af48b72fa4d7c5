package e2e

// Benchmarks of a whole drain on the real control plane:
//
//	go test -run '^$' -bench 'BenchmarkDrain$' -benchtime 1x ./integration/e2e/
//
// Each reports how long the agent took to act on every VM (all evictions answered),
// how long until the node was safe, and the agent's peak memory.

import (
	"fmt"
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
	a := sc.startAgent(node)
	b.StartTimer()
	start := time.Now()
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	var requested time.Duration
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
			return true, ""
		}
		return false, fmt.Sprintf("%d pending", pending)
	})
	a.waitSafe(10 * time.Minute)
	safe := time.Since(start)
	b.StopTimer()
	b.ReportMetric(requested.Seconds(), "s-to-act-on-all")
	b.ReportMetric(safe.Seconds(), "s-to-safe")
	b.ReportMetric(float64(peakRSS(a.cmd.Process.Pid))/1024, "MiB-agent-peak-rss")
}

// peakRSS reads a process's peak resident set (VmHWM) in KiB.
func peakRSS(pid int) int { return procStatusKiB(pid, "VmHWM:") }
