package e2e

// A fleet reboot (issue 15, point 4): every host of a pool told to power off in the same
// moment, each with its own real logind and agent, and the test rebooting each host as
// soon as logind powers it off (a new boot ID, a fresh logind and agent, as a real host
// comes back). Measured for --max-concurrent-drains 1 and 2 and for agents without
// coordination (0), on the real API server, scheduler and KubeVirt:
//
//	go test -run '^$' -bench 'BenchmarkFleetReboot' -benchtime 1x -timeout 60m ./integration/e2e/
//
// NODE_AGENT_BENCH_HOSTS (default 6) and NODE_AGENT_BENCH_VMS (per host, default 8) set
// its size; NODE_AGENT_BENCH_ROUNDS (default 1) repeats each setting. Every VM is
// LiveMigrate with a simulated migration of 3 s; --shutdown-timeout is the default 10m
// with coordination and 3m without (there every host holds to its deadline).

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// rebootResult is what one fleet reboot measured.
type rebootResult struct {
	slots          int
	makespan       time.Duration // power-off asked -> every host back and given back
	vmsAtPowerOff  int           // VMs on hosts when logind powered them off
	restarted      int           // VMs that ended as a new VMI (shut down, restarted)
	migrations     int
	vms            int
	maxUnavailable int // hosts cordoned at once (draining, drained, or waiting to come back)
}

func benchEnvInt(b *testing.B, name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("%s=%q: want a positive number", name, v)
		}
		return n
	}
	return def
}

func BenchmarkFleetReboot(b *testing.B) {
	hosts := benchEnvInt(b, "NODE_AGENT_BENCH_HOSTS", 6)
	perHost := benchEnvInt(b, "NODE_AGENT_BENCH_VMS", 8)
	rounds := benchEnvInt(b, "NODE_AGENT_BENCH_ROUNDS", 1)
	var results []rebootResult
	for i := 0; i < b.N; i++ {
		for range rounds {
			for _, slots := range []int{1, 2, 0} {
				b.Run(fmt.Sprintf("slots=%d", slots), func(b *testing.B) {
					results = append(results, fleetReboot(b, hosts, perHost, slots))
				})
			}
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%d hosts x %d LiveMigrate VMs, every host told to power off at once:\n", hosts, perHost)
	fmt.Fprintf(&sb, "%-22s %10s %14s %10s %12s %14s %16s\n", "--max-concurrent-drains", "makespan", "VMs at power-off", "restarted", "migrations", "per VM", "most hosts out")
	sort.SliceStable(results, func(i, j int) bool { return results[i].slots > results[j].slots })
	for _, r := range results {
		name := strconv.Itoa(r.slots)
		if r.slots == 0 {
			name = "0 (no coordination)"
		}
		fmt.Fprintf(&sb, "%-22s %10s %14d %10d %12d %14.2f %16d\n", name, r.makespan.Round(time.Second), r.vmsAtPowerOff, r.restarted, r.migrations,
			float64(r.migrations)/float64(max(r.vms, 1)), r.maxUnavailable)
	}
	fmt.Print(sb.String())
}

func fleetReboot(b *testing.B, n, perHost, slots int) rebootResult {
	sc := newScenario(b, n)
	// The defaults (held up to 10 min, a turn awaited up to 5); without coordination
	// every host holds until its deadline, so 3 min there (only the wait is shorter).
	hold := 10 * time.Minute
	if slots == 0 {
		hold = 3 * time.Minute
	}
	hosts := map[string]*fleetHost{}
	var all []*fleetHost
	var vms []*kubevirtv1.VirtualMachineInstance
	for i, node := range sc.nodes {
		for j := range perHost {
			vms = append(vms, sc.pinned(fmt.Sprintf("vm-%d-%d", i, j), node, liveMigrate, sim.WithMigrationDuration(3*time.Second)))
		}
		hosts[node] = sc.startFleetHost(node, hold, fmt.Sprintf("--max-concurrent-drains=%d", slots))
		all = append(all, hosts[node])
	}
	ctx, stop := context.WithCancel(sc.ctx)
	defer stop()
	mon := sc.monitorFleet(ctx, sc.nodes)

	start := time.Now()
	sc.powerOffAll(all)
	res := rebootResult{slots: slots, vms: len(vms)}
	for len(offHosts(hosts)) < len(hosts) {
		next := sc.nextPoweredOff(hosts, 11*time.Minute)
		res.vmsAtPowerOff += len(sc.vmisOn(next.node))
		sc.reboot(next)
	}
	for _, node := range sc.nodes {
		sc.waitGivenBackAfterReboot(node)
	}
	// Every VM running again (migrated, or restarted after its host went down with it).
	sc.eventually(5*time.Minute, "every VM running", func() (bool, string) {
		list := &kubevirtv1.VirtualMachineInstanceList{}
		if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err != nil {
			return false, err.Error()
		}
		running := 0
		for _, v := range list.Items {
			if v.Status.Phase == kubevirtv1.Running {
				running++
			}
		}
		return running == len(vms), fmt.Sprintf("%d of %d running", running, len(vms))
	})
	res.makespan = time.Since(start)
	stop()
	for _, before := range vms {
		if after := sc.vmi(before.Name); after == nil || after.UID != before.UID {
			res.restarted++
		}
		res.migrations += len(sc.migrationsOf(before.Name))
	}
	mon.mu.Lock()
	res.maxUnavailable = mon.maxCordoned
	mon.mu.Unlock()
	b.Logf("--max-concurrent-drains=%d: makespan %s, %d VMs on hosts at power-off, %d restarted, %d migrations for %d VMs, at most %d hosts out at once",
		slots, res.makespan.Round(time.Second), res.vmsAtPowerOff, res.restarted, res.migrations, len(vms), res.maxUnavailable)
	return res
}
