package e2e

// The release (issue 14, point 3), on the real logind tier: a host with VMs is told to
// power off; once its last VM has left, how long until the agent's /safe-to-shutdown
// answers 200, and until logind, its delay lock released, starts the power-off job (the
// systemd stub records when). The last VM gone is when the benchmark's own watch of the
// node's VMIs and virt-launcher pods saw it.
//
//	NODE_AGENT_BENCH_VMS=10 NODE_AGENT_BENCH_ROUNDS=5 \
//	  go test -run '^$' -bench BenchmarkShutdownRelease -benchtime 1x -timeout 30m ./integration/e2e/
//
// Each round reboots the simulated host (a new boot ID, logind restarted) so that the
// next one starts from a node given back, as after a real reboot.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/node-agent/node-agent/integration/sim"
)

func BenchmarkShutdownRelease(b *testing.B) {
	vms := benchEnvInt(b, "NODE_AGENT_BENCH_VMS", 10)
	rounds := benchEnvInt(b, "NODE_AGENT_BENCH_ROUNDS", 5)
	for i := 0; i < b.N; i++ {
		benchRelease(b, vms, rounds)
	}
}

func benchRelease(b *testing.B, n, rounds int) {
	out := os.Stdout
	sc := newScenario(b, 2)
	node := sc.nodes[0] // the other node is where the VMs go
	h := sc.startFleetHost(node, 5*time.Minute)
	var toSafe, toPowerOff []time.Duration
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for r := range rounds {
		for j := range n {
			sc.pinned(fmt.Sprintf("vm-%d-%d", r, j), node, liveMigrate, sim.WithMigrationDuration(2*time.Second))
		}
		h.vms = sc.watchVMs(node)
		ctx, cancel := context.WithTimeout(sc.ctx, 10*time.Minute)
		safeAt := h.agent.safeAt(ctx)
		asked := sc.powerOff(h.env)
		gone := h.vms.waitEmpty(sc, 5*time.Minute)
		var safe time.Time
		select {
		case safe = <-safeAt:
		case <-ctx.Done():
			b.Fatalf("round %d: /safe-to-shutdown?wait never answered 200", r)
		}
		off, err := h.env.WaitStartUnit(ctx, powerOffUnit, asked)
		cancel()
		if err != nil {
			b.Fatalf("round %d: logind never started the power-off: %v", r, err)
		}
		toSafe, toPowerOff = append(toSafe, safe.Sub(gone)), append(toPowerOff, off.Sub(gone))
		fmt.Fprintf(out, "bench: round %d, %d VMs: last VM gone %.2f s after the power-off was asked; 200 %.1f ms and the power-off job %.1f ms after it\n",
			r+1, n, gone.Sub(asked).Seconds(), ms(safe.Sub(gone)), ms(off.Sub(gone)))
		sc.reboot(h)
		sc.waitGivenBackAfterReboot(node)
	}
	cell := func(ds []time.Duration) string {
		s := slices.Clone(ds)
		slices.Sort(s)
		var each []string
		for _, d := range ds {
			each = append(each, fmt.Sprintf("%.1f", ms(d)))
		}
		return fmt.Sprintf("%.1f (%.1f–%.1f; %s)", ms(s[len(s)/2]), ms(s[0]), ms(s[len(s)-1]), strings.Join(each, ", "))
	}
	fmt.Fprintf(out, "\n| VMs | rounds | last VM gone to /safe-to-shutdown 200 (ms): median (min–max; each) | last VM gone to logind's power-off job (ms) |\n|---|---|---|---|\n")
	fmt.Fprintf(out, "| %d | %d | %s | %s |\n", n, rounds, cell(toSafe), cell(toPowerOff))
	slices.Sort(toPowerOff)
	b.ReportMetric(ms(toPowerOff[len(toPowerOff)/2]), "ms-gone-to-poweroff-median")
}

// safeAt asks /safe-to-shutdown?wait=1h, which holds its answer until the node is safe,
// and sends when it answered 200 (nothing if it answered otherwise or ctx ended).
func (a *agentProc) safeAt(ctx context.Context) <-chan time.Time {
	at := make(chan time.Time, 1)
	go func() {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.addr+"/safe-to-shutdown?wait=1h", nil)
		if err != nil {
			return
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			at <- time.Now()
		}
	}()
	return at
}
