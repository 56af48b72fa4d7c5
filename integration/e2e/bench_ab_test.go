package e2e

// BenchmarkDrainVersusKubectl measures node-agent's drain side by side with the seed
// document's manual flow on one real cluster (docs/BENCHMARKS.md has the figures):
//
//	go test -run '^$' -bench DrainVersusKubectl -benchtime 1x -timeout 3h ./integration/e2e/
//
// It prints one line per measured drain as it goes and a table at the end. The rows
// are chosen with environment variables (the CI never runs benchmarks):
//
//	NODE_AGENT_BENCH_ROWS    the rows, KIND:VMS in a comma list; default live:10,none:10,mixed:10
//	                         (the full table: add live:50,none:50,mixed:50,live:100,none:100,mixed:100).
//	                         KIND is live (all LiveMigrate, 3 s migrations), none (all
//	                         None, 1 s shutdowns) or mixed (half LiveMigrate, half None,
//	                         one LiveMigrate VM not migratable: blocked)
//	NODE_AGENT_BENCH_ROUNDS  A/B rounds per row (default 3); the order alternates
//	NODE_AGENT_BENCH_FLOWSCHEMA=0  the agent's requests in the default API Priority and
//	                         Fairness levels, not in manifests/base/flowcontrol.yaml's own
//	NODE_AGENT_BENCH_KUBEVIRT_FEATURE_GATES  KubeVirt feature gates to enable in the
//	                         KubeVirt CR (a comma list, e.g. MigrationPriorityQueue), on
//	                         the cluster-wide tests' cluster
//
// Beside each drain's line, a "waves" line shows how KubeVirt used the node's migration
// slots (observer.waves).
//
// The peer is the drain taint plus `kubectl drain NODE --delete-emptydir-data
// --ignore-daemonsets --force --pod-selector=kubevirt.io=virt-launcher` through
// k8s.io/kubectl/pkg/drain configured as kubectl configures it (EvictErrorRetryDelay
// 5 s, GracePeriodSeconds -1, its 1 s deletion polling, and kubectl's client: the
// client-go default rate limit of 5 queries a second, burst 10). node-agent is
// `node-agent drain NODE` with an agent (product defaults) running for the node.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/kubectl/pkg/drain"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

const (
	// benchMigration is the simulated length of one live migration.
	benchMigration = 3 * time.Second
	// benchShutdown is the simulated time a guest takes to power off (None VMs).
	benchShutdown = time.Second
	// benchPerNode is KubeVirt's default parallelOutboundMigrationsPerNode, which the
	// test cluster keeps (TestKubeVirtMigrationLimitsAndRetry checks it).
	benchPerNode = 2
)

// benchKind is one kind of row: which VMs the drained node holds.
type benchKind struct {
	name string
	// opts are the options of VM i; blocked says it cannot leave.
	vm func(i int) (opts []sim.VMOption, blocked bool)
}

var benchKinds = []benchKind{
	{"live", func(int) ([]sim.VMOption, bool) {
		return []sim.VMOption{liveMigrate, sim.WithMigrationDuration(benchMigration)}, false
	}},
	{"none", func(int) ([]sim.VMOption, bool) {
		return []sim.VMOption{noneStrategy, sim.WithShutdownDuration(benchShutdown)}, false
	}},
	{"mixed", func(i int) ([]sim.VMOption, bool) {
		switch {
		case i == 0:
			return []sim.VMOption{liveMigrate, notMigratable}, true
		case i%2 == 1:
			return []sim.VMOption{liveMigrate, sim.WithMigrationDuration(benchMigration)}, false
		default:
			return []sim.VMOption{noneStrategy, sim.WithShutdownDuration(benchShutdown)}, false
		}
	}},
}

// kubeVirtBound is the time KubeVirt's own pipeline needs at best for the row:
// ceil(migrating VMs / parallelOutboundMigrationsPerNode) waves of one migration each,
// or one shutdown when nothing migrates.
func kubeVirtBound(k benchKind, n int) time.Duration {
	migrating := 0
	switch k.name {
	case "live":
		migrating = n
	case "mixed":
		migrating = n / 2 // the odd-numbered VMs; VM 0 is the blocked one
	}
	waves := time.Duration(math.Ceil(float64(migrating) / benchPerNode))
	if waves == 0 {
		return benchShutdown
	}
	return waves * benchMigration
}

// benchRun is one measured drain.
type benchRun struct {
	side     string        // "kubectl" or "node-agent"
	makespan time.Duration // command start to its return (mixed: to every leaving VM gone)
	empty    time.Duration // command start to the last leaving VM gone, as a watch sees it
	reaction time.Duration // taint seen to the last VM's first action; notMeasured: not every VM got one
	evicted  int           // VMs acted on (an eviction request or a migration)
	release  time.Duration // node-agent: last VM gone to /safe-to-shutdown 200 (negative: the agent saw it first); or notMeasured
	timeline string
	waves    string // how KubeVirt's pipeline used the node's migration slots (observer.waves)
	// requests: the API requests of each program of the side until the drain was over,
	// by verb and resource, from the audit log: "kubectl" for the peer, "agent" and
	// "drain command" for node-agent.
	requests map[string]map[string]int
}

func envList(name, def string) []string {
	v := os.Getenv(name)
	if v == "" {
		v = def
	}
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

func BenchmarkDrainVersusKubectl(b *testing.B) {
	rounds := 3
	if v := os.Getenv("NODE_AGENT_BENCH_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			b.Fatalf("NODE_AGENT_BENCH_ROUNDS=%q: want a positive number", v)
		}
		rounds = n
	}
	type row struct {
		kind       benchKind
		n          int
		peer, ours []benchRun
	}
	var rows []*row
	for _, spec := range envList("NODE_AGENT_BENCH_ROWS", "live:10,none:10,mixed:10") {
		name, count, _ := strings.Cut(spec, ":")
		n, err := strconv.Atoi(count)
		if err != nil || n < 2 {
			b.Fatalf("NODE_AGENT_BENCH_ROWS: %q: want KIND:VMS, VMS at least 2", spec)
		}
		found := false
		for _, k := range benchKinds {
			if k.name == name {
				rows, found = append(rows, &row{kind: k, n: n}), true
			}
		}
		if !found {
			b.Fatalf("NODE_AGENT_BENCH_ROWS: unknown kind %q (live, none, mixed)", name)
		}
	}
	out := os.Stdout
	load, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(out, "bench: %d round(s) per row; load average at start: %s", rounds, load)

	gates := envList("NODE_AGENT_BENCH_KUBEVIRT_FEATURE_GATES", "")
	for i := 0; i < b.N; i++ {
		var sc *scenario
		if len(gates) > 0 {
			// A change of the KubeVirt CR: on the cluster-wide tests' cluster.
			sc = newClusterWideScenario(b, 3)
		} else {
			sc = newScenario(b, 3)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Hour)
		defer cancel()
		sc.ctx = ctx
		if len(gates) > 0 {
			sc.enableKubeVirtFeatureGates(gates)
			fmt.Fprintf(out, "bench: KubeVirt feature gates enabled in the KubeVirt CR: %s\n", strings.Join(gates, ", "))
		}
		for _, account := range []string{benchAgentAccount, benchCLIAccount, benchPeerAccount} {
			sc.adminServiceAccount(account)
		}
		// The agent's requests in their own API Priority and Fairness level, as
		// manifests/base/flowcontrol.yaml deploys it (its FlowSchema names the bench's
		// service account here); NODE_AGENT_BENCH_FLOWSCHEMA=0 leaves them in
		// workload-low with virt-api's webhook reads (docs/BENCHMARKS.md, "Reaction").
		if sc.applyOwnPriorityLevel(benchAgentAccount) {
			fmt.Fprintf(out, "bench: the agent's requests in their own priority level (manifests/base/flowcontrol.yaml)\n")
		} else {
			fmt.Fprintf(out, "bench: the agent's requests in the default priority levels (NODE_AGENT_BENCH_FLOWSCHEMA=0)\n")
		}
		runs := 0
		for _, r := range rows {
			for round := 0; round < rounds; round++ {
				sides := []string{"kubectl", "node-agent"}
				if round%2 == 1 {
					sides[0], sides[1] = sides[1], sides[0]
				}
				for _, side := range sides {
					runs++
					run := benchOnce(sc, r.kind, r.n, side, fmt.Sprintf("r%d-", runs))
					fmt.Fprintf(out, "bench: %s N=%d round %d %-10s makespan %6.2f s  last VM gone %6.2f s  reaction %s  release %s\n",
						r.kind.name, r.n, round+1, side, run.makespan.Seconds(), run.empty.Seconds(), fmtReaction(run), fmtRelease(run.release))
					if round == 0 {
						fmt.Fprintf(out, "bench:   timeline (s from the command's start): %s\n", run.timeline)
					}
					fmt.Fprintf(out, "bench:   waves (s from the command's start): %s\n", run.waves)
					if side == "kubectl" {
						r.peer = append(r.peer, run)
					} else {
						r.ours = append(r.ours, run)
					}
				}
			}
		}
	}

	load, _ = os.ReadFile("/proc/loadavg")
	fmt.Fprintf(out, "\nbench: load average at the end: %s", load)
	fmt.Fprintf(out, "\n| row | VMs | kubectl drain (s) | node-agent drain (s) | ratio | KubeVirt bound (s) | kubectl over bound | node-agent over bound | reaction kubectl / node-agent (s) | release (ms) |\n")
	fmt.Fprintf(out, "|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		if len(r.peer) == 0 || len(r.ours) == 0 {
			continue
		}
		peer, ours := median(measured(r.peer, makespanOf)), median(measured(r.ours, makespanOf))
		bound := kubeVirtBound(r.kind, r.n)
		fmt.Fprintf(out, "| %s | %d | %s | %s | %.2f | %.1f | %s | %s | %s / %s | %s |\n",
			r.kind.name, r.n, spread(measured(r.peer, makespanOf), false), spread(measured(r.ours, makespanOf), false), ours.Seconds()/peer.Seconds(),
			bound.Seconds(), over(peer, bound), over(ours, bound),
			spread(measured(r.peer, reactionOf), false), spread(measured(r.ours, reactionOf), false), spread(measured(r.ours, releaseOf), true))
	}
	fmt.Fprintf(out, "\nAPI requests per drain (the audit log, until the drain was over): median (min–max), and by verb and resource in the first round\n")
	fmt.Fprintf(out, "| row | VMs | kubectl | node-agent (agent + drain command) | kubectl, first round | node-agent, first round |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		if len(r.peer) == 0 || len(r.ours) == 0 {
			continue
		}
		fmt.Fprintf(out, "| %s | %d | %s | %s | %s | %s |\n", r.kind.name, r.n,
			requestSpread(r.peer), requestSpread(r.ours), requestsByKind(r.peer[0]), requestsByKind(r.ours[0]))
	}
}

// requestTotal is a drain's API requests, every program of its side together.
func requestTotal(r benchRun) int {
	total := 0
	for _, counts := range r.requests {
		for _, n := range counts {
			total += n
		}
	}
	return total
}

// requestSpread is the median, min and max of the drains' request totals.
func requestSpread(runs []benchRun) string {
	var ns []int
	for _, r := range runs {
		ns = append(ns, requestTotal(r))
	}
	sort.Ints(ns)
	med := ns[len(ns)/2]
	if len(ns)%2 == 0 {
		med = (ns[len(ns)/2-1] + ns[len(ns)/2]) / 2
	}
	return fmt.Sprintf("%d (%d–%d)", med, ns[0], ns[len(ns)-1])
}

// requestsByKind is one drain's requests by program, verb and resource.
func requestsByKind(r benchRun) string {
	var programs []string
	for program := range r.requests {
		programs = append(programs, program)
	}
	sort.Strings(programs)
	var parts []string
	for _, program := range programs {
		total, summary := countsSummary(r.requests[program])
		parts = append(parts, fmt.Sprintf("%s %d: %s", program, total, summary))
	}
	return strings.Join(parts, "; ")
}

func fmtReaction(r benchRun) string {
	if r.reaction == notMeasured {
		return fmt.Sprintf("n/a (%d VMs acted on)", r.evicted)
	}
	return fmt.Sprintf("%.2f s (%d VMs)", r.reaction.Seconds(), r.evicted)
}

func fmtRelease(d time.Duration) string {
	if d == notMeasured {
		return "-"
	}
	return fmt.Sprintf("%d ms", d.Milliseconds())
}

// notMeasured marks a figure a run has not.
const notMeasured = time.Duration(math.MinInt64)

// measured picks one figure of each run, leaving out those not measured.
func measured(runs []benchRun, pick func(benchRun) time.Duration) []time.Duration {
	var out []time.Duration
	for _, r := range runs {
		if d := pick(r); d != notMeasured {
			out = append(out, d)
		}
	}
	return out
}

func makespanOf(r benchRun) time.Duration { return r.makespan }
func reactionOf(r benchRun) time.Duration { return r.reaction }
func releaseOf(r benchRun) time.Duration  { return r.release }

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// spread shows a median with the min–max, in seconds or, with ms, milliseconds.
func spread(ds []time.Duration, ms bool) string {
	if len(ds) == 0 {
		return "-"
	}
	lo, hi := ds[0], ds[0]
	for _, d := range ds {
		lo, hi = min(lo, d), max(hi, d)
	}
	if ms {
		return fmt.Sprintf("%d (%d–%d)", median(ds).Milliseconds(), lo.Milliseconds(), hi.Milliseconds())
	}
	return fmt.Sprintf("%.2f (%.2f–%.2f)", median(ds).Seconds(), lo.Seconds(), hi.Seconds())
}

func over(d, bound time.Duration) string {
	return fmt.Sprintf("+%.1f s (%.0f%%)", (d - bound).Seconds(), 100*(d-bound).Seconds()/bound.Seconds())
}

// benchOnce puts n VMs of kind k (named after prefix: a VMI's name is not reused, as
// virt-controller's expectations are kept by name) on the scenario's first node, drains it with side's
// tool and measures, then clears the namespace and re-enables the node.
func benchOnce(sc *scenario, k benchKind, n int, side, prefix string) benchRun {
	sc.t.Helper()
	node := sc.nodes[0]
	blocked := benchPlaceVMs(sc, k, n, prefix)

	ctx, cancel := context.WithCancel(sc.ctx)
	defer cancel()
	obs := startObserver(ctx, sc, node, blocked)
	var a *agentProc
	var agentUser string
	var cpuBefore time.Duration
	if side == "node-agent" {
		// A service account's token: its requests are in the audit log.
		var kubeconfig string
		kubeconfig, agentUser = sc.serviceAccountKubeconfig(benchAgentAccount)
		a = sc.startAgent(node, "--resync=5s", "--log-level=info", "--kubeconfig="+kubeconfig)
		cpuBefore = processCPU(a.cmd.Process.Pid)
	}
	var safeAt <-chan time.Time
	if a != nil && len(blocked) == 0 {
		safeAt = a.safeAt(ctx)
	}

	// The drain command and the peer run as service accounts of their own too, so that
	// the audit log has every request of both sides.
	users := map[string]string{}
	if agentUser != "" {
		users["agent"] = agentUser
	}
	commandAccount, command := benchPeerAccount, "kubectl"
	if side == "node-agent" {
		commandAccount, command = benchCLIAccount, "drain command"
	}
	commandKubeconfig, commandUser := sc.serviceAccountKubeconfig(commandAccount)
	users[command] = commandUser

	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	start := time.Now()
	returned := make(chan error, 1)
	if side == "kubectl" {
		go func() { returned <- peerDrain(runCtx, sc, node, commandKubeconfig) }()
	} else {
		go func() {
			cmd := exec.CommandContext(runCtx, sc.env.agentBin, "drain", node, "--kubeconfig="+commandKubeconfig, "--timeout=1h")
			var buf bytes.Buffer
			cmd.Stdout, cmd.Stderr = &buf, &buf
			err := cmd.Run()
			if err != nil && runCtx.Err() == nil {
				err = fmt.Errorf("node-agent drain: %w\n%s", err, buf.String())
			}
			returned <- err
		}()
	}

	run := benchRun{side: side, release: notMeasured}
	var end time.Time
	if len(blocked) == 0 {
		select {
		case err := <-returned:
			end = time.Now()
			if err != nil {
				sc.t.Fatalf("%s drain of %s failed: %v", side, node, err)
			}
		case <-ctx.Done():
			sc.t.Fatalf("%s drain of %s did not end: %v", side, node, ctx.Err())
		}
	}
	select {
	case <-obs.emptied:
	case <-ctx.Done():
		sc.t.Fatalf("the VMs able to leave %s did not: %v", node, ctx.Err())
	}
	if len(blocked) > 0 {
		// Neither command ends by itself with a blocked VM: the drain is over for
		// this row when every other VM is gone (kubectl drain may have returned an
		// error for the blocked VM's eviction before).
		end = obs.emptyTime()
		stopRun()
		<-returned
	}
	run.makespan = end.Sub(start)
	run.empty = obs.emptyTime().Sub(start)
	if a != nil && len(blocked) == 0 {
		select {
		case t := <-safeAt:
			run.release = t.Sub(obs.emptyTime())
		case <-time.After(time.Minute):
			sc.t.Errorf("node-agent never said the node is safe")
		}
	}
	var evictions string
	run.reaction, run.evicted, evictions = benchReaction(sc, obs, n-len(blocked), start, blocked)
	run.timeline = obs.timeline(start, end) + "; " + evictions
	run.waves = obs.waves(start)
	if a != nil {
		run.timeline += fmt.Sprintf("; the agent used %.2f s of CPU", (processCPU(a.cmd.Process.Pid) - cpuBefore).Seconds())
	}
	run.requests = map[string]map[string]int{}
	for program, user := range users {
		counts, err := agentRequestCounts(sc.env.cluster.AuditLog, user, start, time.Now().Add(time.Second))
		if err != nil {
			sc.t.Fatal(err)
		}
		run.requests[program] = counts
		total, summary := countsSummary(counts)
		run.timeline += fmt.Sprintf("; the %s's requests until the drain was over: %d (%s)", program, total, summary)
	}

	// Re-enable the node and clear the namespace for the next drain.
	if out, errOut, code := sc.ctl("undrain", node); code != 0 {
		sc.t.Fatalf("node-agent undrain exited %d\n%s\n%s", code, out, errOut)
	}
	if a != nil {
		a.stop()
	}
	cancel()
	benchClear(sc)
	return run
}

// The service accounts the benchmark's agents, node-agent's drain command and the peer
// run as: the audit log records their requests.
const (
	benchAgentAccount = "bench-agent"
	benchCLIAccount   = "bench-drain-command"
	benchPeerAccount  = "bench-kubectl"
)

// processCPU is the user and system CPU time a process has used so far.
func processCPU(pid int) time.Duration {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name (in parentheses, which may hold spaces).
	fields := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(fields) < 13 {
		return 0
	}
	utime, _ := strconv.Atoi(fields[11])
	stime, _ := strconv.Atoi(fields[12])
	return time.Duration(utime+stime) * time.Second / 100 // USER_HZ
}

// benchPlaceVMs creates n VMIs of kind k, all running on the first node (the other
// nodes cordoned meanwhile), and returns the names of those that cannot leave.
func benchPlaceVMs(sc *scenario, k benchKind, n int, prefix string) map[string]bool {
	sc.t.Helper()
	for _, t := range sc.nodes[1:] {
		sc.cordon(t, true)
	}
	blocked := map[string]bool{}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%svm%03d", prefix, i)
		opts, stuck := k.vm(i)
		if stuck {
			blocked[name] = true
		}
		if err := sc.env.sim.Create(sc.ctx, sim.NewVMI(sc.ns, name, sc.vmOpts(opts)...)); err != nil {
			sc.t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		v, err := sc.env.sim.WaitForVMIRunning(sc.ctx, sc.ns, fmt.Sprintf("%svm%03d", prefix, i))
		if err != nil {
			sc.t.Fatal(err)
		}
		if v.Status.NodeName != sc.nodes[0] {
			sc.t.Fatalf("VMI %s runs on %s, want %s", v.Name, v.Status.NodeName, sc.nodes[0])
		}
	}
	for _, t := range sc.nodes[1:] {
		sc.cordon(t, false)
	}
	return blocked
}

// benchClear deletes the namespace's KubeVirt objects and waits until no VMI,
// migration or pod is left in it.
func benchClear(sc *scenario) {
	sc.t.Helper()
	sc.deleteKubeVirtObjects()
	sc.eventually(5*time.Minute, "the namespace to empty", func() (bool, string) {
		pods, err := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		var vmis kubevirtv1.VirtualMachineInstanceList
		if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(&vmis); err != nil {
			return false, err.Error()
		}
		var migs kubevirtv1.VirtualMachineInstanceMigrationList
		if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).Do(sc.ctx).Into(&migs); err != nil {
			return false, err.Error()
		}
		n := len(pods.Items) + len(vmis.Items) + len(migs.Items)
		return n == 0, fmt.Sprintf("%d pods, %d VMIs, %d migrations left", len(pods.Items), len(vmis.Items), len(migs.Items))
	})
}

// peerDrain is the seed's flow: the drain taint, then kubectl drain NODE
// --delete-emptydir-data --ignore-daemonsets --force --pod-selector=kubevirt.io=virt-launcher,
// with kubectl's Helper settings and kubectl's client (client-go's default rate limit).
func peerDrain(ctx context.Context, sc *scenario, node, kubeconfig string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst, cfg.RateLimiter = 0, 0, nil // kubectl sets neither: 5 a second, burst 10
	cfg.UserAgent = "kubectl-drain-peer"
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	// kubectl taint nodes NODE kubevirt.io/drain=draining:NoSchedule
	err = nodeinfo.UpdateNode(ctx, kube, node, func(n *corev1.Node) (bool, error) {
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: nodeinfo.DefaultDrainTaintKey, Value: "draining", Effect: corev1.TaintEffectNoSchedule})
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("tainting: %w", err)
	}
	h := &drain.Helper{
		Ctx:                  ctx,
		Client:               kube,
		GracePeriodSeconds:   -1,
		EvictErrorRetryDelay: 5 * time.Second,
		Force:                true,
		IgnoreAllDaemonSets:  true,
		DeleteEmptyDirData:   true,
		PodSelector:          "kubevirt.io=virt-launcher",
		ChunkSize:            500, // cmdutil.DefaultChunkSize
		Out:                  io.Discard,
		ErrOut:               io.Discard,
	}
	n, err := kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if err := drain.RunCordonOrUncordon(h, n, true); err != nil {
		return fmt.Errorf("cordoning: %w", err)
	}
	list, errs := h.GetPodsForDeletion(node)
	if len(errs) > 0 {
		return fmt.Errorf("listing pods: %v", errs)
	}
	return h.DeleteOrEvictPods(list.Pods())
}

// benchReaction reads the API server's audit log: from the taint seen by the
// observer to the first action on the last VM to get one (its first eviction
// request, or its migration seen created). It returns notMeasured when fewer than
// want VMs were acted on.
//
// It also summarises the eviction requests (dry runs included): how many, when the
// first and last came, how long the API server took to answer them (the webhook's
// round trip included), and how many were in flight at most.
func benchReaction(sc *scenario, obs *observer, want int, from time.Time, blocked map[string]bool) (time.Duration, int, string) {
	sc.t.Helper()
	pods := obs.podsOfVMIs()
	evs, err := readAudit(sc.env.cluster.AuditLog, func(ev auditEvent) bool {
		ref := ev.ObjectRef
		return ref != nil && ref.Resource == "pods" && ref.Subresource == "eviction" && ref.Namespace == sc.ns && !ev.Stamp.Before(from.Add(-time.Second))
	})
	if err != nil {
		sc.t.Fatal(err)
	}
	first := map[string]time.Time{}
	var lat []time.Duration
	var lo, hi time.Time
	inFlight, maxInFlight := 0, 0
	type edge struct {
		at   time.Time
		step int
	}
	var edges []edge
	for _, ev := range evs {
		if pods[ev.ObjectRef.Name] == "" {
			continue
		}
		lat = append(lat, ev.StageStamp.Sub(ev.Stamp))
		edges = append(edges, edge{ev.Stamp, 1}, edge{ev.StageStamp, -1})
		if lo.IsZero() || ev.Stamp.Before(lo) {
			lo = ev.Stamp
		}
		if ev.Stamp.After(hi) {
			hi = ev.Stamp
		}
	}
	sort.Slice(edges, func(i, j int) bool {
		if edges[i].at.Equal(edges[j].at) {
			return edges[i].step < edges[j].step
		}
		return edges[i].at.Before(edges[j].at)
	})
	for _, e := range edges {
		inFlight += e.step
		maxInFlight = max(maxInFlight, inFlight)
	}
	summary := "eviction requests: none"
	if len(lat) > 0 {
		sorted := append([]time.Duration(nil), lat...)
		sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
		summary = fmt.Sprintf("eviction requests: %d, sent %.2f–%.2f, answered in median %d ms (max %d ms), at most %d in flight",
			len(lat), lo.Sub(from).Seconds(), hi.Sub(from).Seconds(), median(lat).Milliseconds(), sorted[len(sorted)-1].Milliseconds(), maxInFlight)
	}
	for _, ev := range evs {
		vmi, ok := pods[ev.ObjectRef.Name]
		if !ok || blocked[vmi] {
			continue
		}
		if t, seen := first[vmi]; !seen || ev.Stamp.Before(t) {
			first[vmi] = ev.Stamp
		}
	}
	// A VM whose migration KubeVirt's evacuation controller created first (it
	// follows its own drain taint) needs no eviction: acted on when that is seen.
	for vmi, t := range obs.migrationsSeen() {
		if f, seen := first[vmi]; !blocked[vmi] && (!seen || t.Before(f)) {
			first[vmi] = t
		}
	}
	var last time.Time
	for _, t := range first {
		if t.After(last) {
			last = t
		}
	}
	taint := obs.taintTime()
	if len(first) < want || taint.IsZero() {
		return notMeasured, len(first), summary
	}
	return last.Sub(taint), len(first), summary
}

// observer follows the drained node, its launcher pods, VMIs and migrations with
// watches and records when things happen.
type observer struct {
	node    string
	blocked map[string]bool
	emptied chan struct{} // closed when the last VM able to leave is gone

	mu        sync.Mutex
	pods      map[string]*corev1.Pod
	vmis      map[string]*kubevirtv1.VirtualMachineInstance
	podVMI    map[string]string // launcher pod name -> VMI name, for every pod seen
	left      int
	emptyAt   time.Time
	taintAt   time.Time
	migSeen   map[string]time.Time            // migration name -> first seen
	vmiMig    map[string]time.Time            // VMI name -> its first migration first seen
	migPhases map[string]map[string]time.Time // phase -> migration -> first seen in it
	marked    map[string]time.Time            // VMI -> first seen with status.evacuationNodeName
	priority  map[string]bool                 // migrations seen with spec.priority set
}

func startObserver(ctx context.Context, sc *scenario, node string, blocked map[string]bool) *observer {
	sc.t.Helper()
	o := &observer{
		node: node, blocked: blocked, emptied: make(chan struct{}),
		pods: map[string]*corev1.Pod{}, vmis: map[string]*kubevirtv1.VirtualMachineInstance{}, podVMI: map[string]string{},
		migSeen: map[string]time.Time{}, vmiMig: map[string]time.Time{}, migPhases: map[string]map[string]time.Time{}, marked: map[string]time.Time{},
		priority: map[string]bool{},
	}
	core := sc.kube().CoreV1().RESTClient()
	informers := []cache.SharedIndexInformer{
		cache.NewSharedIndexInformer(cache.NewFilteredListWatchFromClient(core, "pods", sc.ns, func(opts *metav1.ListOptions) {
			opts.LabelSelector = "kubevirt.io=virt-launcher"
		}), &corev1.Pod{}, 0, cache.Indexers{}),
		cache.NewSharedIndexInformer(cache.NewListWatchFromClient(sc.env.cluster.KubeVirt, nodeinfo.ResourceVMIs, sc.ns, fields.Everything()),
			&kubevirtv1.VirtualMachineInstance{}, 0, cache.Indexers{}),
		cache.NewSharedIndexInformer(cache.NewListWatchFromClient(sc.env.cluster.KubeVirt, nodeinfo.ResourceMigrations, sc.ns, fields.Everything()),
			&kubevirtv1.VirtualMachineInstanceMigration{}, 0, cache.Indexers{}),
		cache.NewSharedIndexInformer(cache.NewListWatchFromClient(core, "nodes", "", fields.OneTermEqualSelector("metadata.name", node)),
			&corev1.Node{}, 0, cache.Indexers{}),
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { o.seen(obj, false) },
		UpdateFunc: func(_, obj any) { o.seen(obj, false) },
		DeleteFunc: func(obj any) {
			if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = tomb.Obj
			}
			o.seen(obj, true)
		},
	}
	var synced []cache.InformerSynced
	for _, inf := range informers {
		if _, err := inf.AddEventHandler(handler); err != nil {
			sc.t.Fatal(err)
		}
		go inf.Run(ctx.Done())
		synced = append(synced, inf.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		sc.t.Fatal("the observer's watches did not sync")
	}
	return o
}

func (o *observer) seen(obj any, deleted bool) {
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	switch x := obj.(type) {
	case *corev1.Pod:
		for _, ref := range x.OwnerReferences {
			if ref.Kind == "VirtualMachineInstance" {
				o.podVMI[x.Name] = ref.Name
			}
		}
		if deleted {
			delete(o.pods, x.Name)
		} else {
			o.pods[x.Name] = x
		}
	case *kubevirtv1.VirtualMachineInstance:
		if deleted {
			delete(o.vmis, x.Name)
		} else {
			o.vmis[x.Name] = x
			if x.Status.EvacuationNodeName != "" {
				if _, ok := o.marked[x.Name]; !ok {
					o.marked[x.Name] = now
				}
			}
		}
	case *kubevirtv1.VirtualMachineInstanceMigration:
		if _, ok := o.migSeen[x.Name]; !ok {
			o.migSeen[x.Name] = now
		}
		if _, ok := o.vmiMig[x.Spec.VMIName]; !ok {
			o.vmiMig[x.Spec.VMIName] = now
		}
		if x.Spec.Priority != nil {
			o.priority[x.Name] = true
		}
		phase := string(x.Status.Phase)
		if phase == "" {
			phase = "Pending"
		}
		if o.migPhases[phase] == nil {
			o.migPhases[phase] = map[string]time.Time{}
		}
		if _, ok := o.migPhases[phase][x.Name]; !ok {
			o.migPhases[phase][x.Name] = now
		}
		return
	case *corev1.Node:
		for _, t := range x.Spec.Taints {
			if t.Key == nodeinfo.DefaultDrainTaintKey && o.taintAt.IsZero() {
				o.taintAt = now
			}
		}
		return
	default:
		return
	}
	left := 0
	for _, p := range o.pods {
		if p.Spec.NodeName == o.node && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed && !o.blocked[o.podVMI[p.Name]] {
			left++
		}
	}
	for _, v := range o.vmis {
		if v.Status.NodeName == o.node && !v.IsFinal() && !o.blocked[v.Name] {
			left++
		}
	}
	if left == 0 && o.left > 0 && !o.taintAt.IsZero() {
		o.emptyAt = now
		select {
		case <-o.emptied:
		default:
			close(o.emptied)
		}
	}
	o.left = left
}

func (o *observer) emptyTime() time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.emptyAt
}

func (o *observer) taintTime() time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.taintAt
}

func (o *observer) migrationsSeen() map[string]time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make(map[string]time.Time, len(o.vmiMig))
	for k, v := range o.vmiMig {
		out[k] = v
	}
	return out
}

func (o *observer) podsOfVMIs() map[string]string {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make(map[string]string, len(o.podVMI))
	for k, v := range o.podVMI {
		out[k] = v
	}
	return out
}

// timeline summarises one drain: each step's first and last time, in seconds from start.
func (o *observer) timeline(start, end time.Time) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := func(t time.Time) string { return fmt.Sprintf("%.2f", t.Sub(start).Seconds()) }
	span := func(m map[string]time.Time) string {
		if len(m) == 0 {
			return "-"
		}
		var lo, hi time.Time
		for _, t := range m {
			if lo.IsZero() || t.Before(lo) {
				lo = t
			}
			if t.After(hi) {
				hi = t
			}
		}
		return fmt.Sprintf("%s–%s (%d)", s(lo), s(hi), len(m))
	}
	parts := []string{"taint seen " + s(o.taintAt), "VMIs marked for evacuation " + span(o.marked), "migrations created " + span(o.migSeen)}
	for _, p := range []string{"Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running", "Succeeded", "Failed"} {
		if m := o.migPhases[p]; len(m) > 0 {
			parts = append(parts, p+" "+span(m))
		}
	}
	parts = append(parts, "last VM gone "+s(o.emptyAt), "command done "+s(end))
	return strings.Join(parts, "; ")
}

// applyOwnPriorityLevel applies manifests/base/flowcontrol.yaml server-side, its
// FlowSchema naming account (in the scenario's namespace) instead of the DaemonSet's,
// unless NODE_AGENT_BENCH_FLOWSCHEMA=0; it says whether it did.
func (sc *scenario) applyOwnPriorityLevel(account string) bool {
	sc.t.Helper()
	if os.Getenv("NODE_AGENT_BENCH_FLOWSCHEMA") == "0" {
		return false
	}
	objs, err := loadKustomization(filepath.Join(repoRoot(sc.t), "manifests", "base"))
	if err != nil {
		sc.t.Fatal(err)
	}
	var apply []*unstructured.Unstructured
	for _, o := range objs {
		switch o.GetKind() {
		case "PriorityLevelConfiguration":
		case "FlowSchema":
			subjects := []any{map[string]any{"kind": "ServiceAccount", "serviceAccount": map[string]any{"name": account, "namespace": sc.ns}}}
			rules, _, _ := unstructured.NestedSlice(o.Object, "spec", "rules")
			if len(rules) != 1 {
				sc.t.Fatalf("FlowSchema %s: %d rules, want 1", o.GetName(), len(rules))
			}
			rules[0].(map[string]any)["subjects"] = subjects
			if err := unstructured.SetNestedSlice(o.Object, rules, "spec", "rules"); err != nil {
				sc.t.Fatal(err)
			}
		default:
			continue
		}
		apply = append(apply, o)
	}
	if len(apply) != 2 {
		sc.t.Fatalf("manifests/base: %d PriorityLevelConfigurations and FlowSchemas, want one of each", len(apply))
	}
	if err := applyServerSide(sc.ctx, sc.env.cluster.RESTConfig, apply, false); err != nil {
		sc.t.Fatal(err)
	}
	return true
}

// letInPhases are a migration's phases from the one in which virt-controller has asked
// for its target pod (Scheduling): from then on it holds one of the source node's
// parallelOutboundMigrationsPerNode slots until it ends.
var letInPhases = []string{"Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running", "Succeeded"}

// waves summarises how KubeVirt's pipeline used the drained node's migration slots, in
// seconds from start: the first migration let in (created, its target pod asked for,
// running, the migration running); how long each slot a migration's end freed stayed
// free until the next migration was let in, and whether that one had been waiting in
// Pending (held back by KubeVirt's limit) or was created after the slot freed; the
// migrations created by 5, 10, 20 and 40 s; how many set spec.priority; how long a
// migration held its slot.
func (o *observer) waves(start time.Time) string {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.migSeen) == 0 {
		return "no migrations"
	}
	s := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return fmt.Sprintf("%.2f", t.Sub(start).Seconds())
	}
	firstIn := func(name string, phases ...string) time.Time {
		var t time.Time
		for _, p := range phases {
			if at, ok := o.migPhases[p][name]; ok && (t.IsZero() || at.Before(t)) {
				t = at
			}
		}
		return t
	}
	type migration struct {
		name             string
		created, in, end time.Time
	}
	var let []migration
	var firstCreated, firstRunning, lastEnd time.Time
	created := map[time.Duration]int{}
	windows := []time.Duration{5 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second}
	for name, at := range o.migSeen {
		if firstCreated.IsZero() || at.Before(firstCreated) {
			firstCreated = at
		}
		for _, w := range windows {
			if at.Sub(start) <= w {
				created[w]++
			}
		}
		if r := firstIn(name, "Running"); !r.IsZero() && (firstRunning.IsZero() || r.Before(firstRunning)) {
			firstRunning = r
		}
		m := migration{name: name, created: at, in: firstIn(name, letInPhases...)}
		if m.in.IsZero() {
			continue
		}
		m.end = firstIn(name, "Succeeded", "Failed")
		if m.end.After(lastEnd) {
			lastEnd = m.end
		}
		let = append(let, m)
	}
	if len(let) == 0 {
		return fmt.Sprintf("first migration created %s, none let in", s(firstCreated))
	}
	sort.Slice(let, func(i, j int) bool { return let[i].in.Before(let[j].in) })
	var ends []time.Time
	var held []time.Duration
	for _, m := range let {
		if !m.end.IsZero() {
			ends = append(ends, m.end)
			held = append(held, m.end.Sub(m.in))
		}
	}
	sort.Slice(ends, func(i, j int) bool { return ends[i].Before(ends[j]) })
	// Each freed slot is taken by the first migration let in after it that no earlier
	// freed slot took.
	taken := make([]bool, len(let))
	var free []time.Duration
	waited, madeFor := 0, 0
	for _, e := range ends {
		for j := range let {
			if taken[j] || let[j].in.Before(e) {
				continue
			}
			taken[j] = true
			free = append(free, let[j].in.Sub(e))
			if let[j].created.Before(e) {
				waited++
			} else {
				madeFor++
			}
			break
		}
	}
	var sum time.Duration
	for _, d := range free {
		sum += d
	}
	first := let[0]
	return fmt.Sprintf("first migration created %s; the first let in: created %s, target pod asked %s, running %s, migration running %s; "+
		"first migration running %s, last one ended %s; a freed slot stayed free %s s (%d, %.2f s in all), taken by a migration waiting in Pending %d times, "+
		"by one created after the slot freed %d times; created by 5/10/20/40 s: %d/%d/%d/%d of %d; with spec.priority: %d; a slot held, let in to end: %s s",
		s(firstCreated), s(first.created), s(first.in), s(firstIn(first.name, "Scheduled")), s(firstIn(first.name, "Running")),
		s(firstRunning), s(lastEnd), spread(free, false), len(free), sum.Seconds(), waited,
		madeFor, created[windows[0]], created[windows[1]], created[windows[2]], created[windows[3]], len(o.migSeen), len(o.priority), spread(held, false))
}

// enableKubeVirtFeatureGates adds gates to the KubeVirt CR's
// developerConfiguration.featureGates (and takes them out of its disabled ones) for
// the benchmark; virt-controller and virt-api read the CR through informers, well
// before the first drain (the VMs are placed first).
func (sc *scenario) enableKubeVirtFeatureGates(gates []string) {
	sc.t.Helper()
	var previous kubevirtv1.DeveloperConfiguration
	sc.changeKubeVirtConfig("enabling KubeVirt feature gates", func(c *kubevirtv1.KubeVirtConfiguration) {
		if c.DeveloperConfiguration == nil {
			c.DeveloperConfiguration = &kubevirtv1.DeveloperConfiguration{}
		}
		previous = *c.DeveloperConfiguration.DeepCopy()
		for _, g := range gates {
			if !slices.Contains(c.DeveloperConfiguration.FeatureGates, g) {
				c.DeveloperConfiguration.FeatureGates = append(c.DeveloperConfiguration.FeatureGates, g)
			}
			c.DeveloperConfiguration.DisabledFeatureGates = slices.DeleteFunc(c.DeveloperConfiguration.DisabledFeatureGates, func(d string) bool { return d == g })
		}
	}, func(c *kubevirtv1.KubeVirtConfiguration) {
		c.DeveloperConfiguration = &previous
	})
}
