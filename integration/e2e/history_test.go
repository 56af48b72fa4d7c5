package e2e

// Random histories (issue 13.1): a seeded generator applies random operations to four
// nodes with an agent each and a mix of VMs, on a cluster of the test's own (it changes
// the KubeVirt CR's evictionStrategy), and checks the SPEC's invariants after every
// step and at quiescence. A failure prints the seed and the steps so far;
// NODE_AGENT_HISTORY_SEED replays a seed, NODE_AGENT_HISTORY_STEPS sets the length
// (a long run needs go test's -timeout raised: docs/RELIABILITY.md).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

const (
	historySeedEnv  = "NODE_AGENT_HISTORY_SEED"
	historyStepsEnv = "NODE_AGENT_HISTORY_STEPS"
	// The history CI runs: a fixed seed, a short length.
	historyDefaultSeed  = 13
	historyDefaultSteps = 20
	historyNodes        = 4
	// historySettle bounds the wait for a step's effects to settle: the slowest is a
	// migration that fails once and is retried by KubeVirt after its 20 s backoff.
	historySettle = 3 * time.Minute
)

// TestRandomHistory runs one random history (see the top of the file).
func TestRandomHistory(t *testing.T) {
	seed, steps := historyParams(t)
	fmt.Fprintf(os.Stderr, "TestRandomHistory: seed %d, %d steps (replay: %s=%d %s=%d)\n", seed, steps, historySeedEnv, seed, historyStepsEnv, steps)
	e := newPrivateEnv(t, cluster.Options{KubeVirtConfiguration: kubevirtv1.KubeVirtConfiguration{
		EvictionStrategy: ptr.To(kubevirtv1.EvictionStrategyLiveMigrate),
	}})
	sc := newScenarioIn(t, e, historyNodes)
	if deadline, ok := t.Deadline(); ok {
		// A long history outlives the scenario's usual 8 minutes.
		ctx, cancel := context.WithDeadline(context.Background(), deadline.Add(-30*time.Second))
		t.Cleanup(cancel)
		sc.ctx = ctx
	}
	h := newHistory(sc, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the history that failed: seed %d (%s=%d %s=%d), steps so far:\n%s",
				seed, historySeedEnv, seed, historyStepsEnv, steps, strings.Join(h.log, "\n"))
		}
	})
	start := time.Now()
	h.setUp()
	for i := 1; i <= steps; i++ {
		h.step(i)
	}
	h.record("quiescence")
	h.settle()
	h.check()
	t.Logf("seed %d: %d steps in %s (%d settled), %d migrations, %d VMIs ended", seed, steps,
		time.Since(start).Round(time.Second), h.settled, h.migrations.count(), h.vmis.ends())
}

// historyParams reads the seed and the number of steps from the environment.
func historyParams(t *testing.T) (uint64, int) {
	t.Helper()
	seed, steps := uint64(historyDefaultSeed), historyDefaultSteps
	if raw := os.Getenv(historySeedEnv); raw != "" {
		v, err := strconv.ParseUint(raw, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", historySeedEnv, raw, err)
		}
		seed = v
	}
	if raw := os.Getenv(historyStepsEnv); raw != "" {
		v, err := strconv.Atoi(raw)
		if err != nil || v < 0 {
			t.Fatalf("%s=%q: want a count of steps", historyStepsEnv, raw)
		}
		steps = v
	}
	return seed, steps
}

// historyVM is one VM, VMIRS or bare VMI of the history's model.
type historyVM struct {
	kind     string // "vm", "vmirs" or "vmi"
	name     string
	replicas int32
	desc     string
}

// historyNode is what the operator (the history) set on a node, and whether a host
// shutdown is pending on it.
type historyNode struct {
	taints   map[string]bool // drain taints by key, by kubectl or node-agent drain
	cordoned bool
	shutdown bool
}

// historyCustomKey is the other drain taint key the history switches the KubeVirt CR to.
const historyCustomKey = "example.com/custom-drain"

// historyShutdownTimeout is node 0's --shutdown-timeout: how long a blocked VM holds a
// host shutdown.
const historyShutdownTimeout = 20 * time.Second

type history struct {
	sc         *scenario
	rnd        *rand.Rand
	agents     []*agentProc
	nodes      []historyNode
	key        string // the drain taint key in force (the KubeVirt CR's)
	logind     *logind.Env
	pair       *lockPair // node 0's lock holder and engine
	asked      time.Time // when node 0's pending shutdown was asked for
	vms        map[string]*historyVM
	next       int
	cluster    kubevirtv1.EvictionStrategy
	migrations *unfinishedMigrations
	vmis       *vmiEnds
	log        []string
	settled    int
}

func newHistory(sc *scenario, seed uint64) *history {
	return &history{
		sc:      sc,
		rnd:     rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		nodes:   make([]historyNode, len(sc.nodes)),
		key:     nodeinfo.DefaultDrainTaintKey,
		vms:     map[string]*historyVM{},
		cluster: kubevirtv1.EvictionStrategyLiveMigrate,
	}
}

func (h *history) record(format string, args ...any) {
	h.log = append(h.log, fmt.Sprintf(format, args...))
	h.sc.t.Logf("history: %s", h.log[len(h.log)-1])
}

// setUp starts the watches, an agent on every node and one VM of each kind.
func (h *history) setUp() {
	sc := h.sc
	h.migrations = sc.watchMigrations()
	sc.t.Cleanup(h.migrations.stop)
	h.vmis = sc.watchVMIEnds()
	for i, node := range sc.nodes {
		h.nodes[i].taints = map[string]bool{}
		if i == 0 {
			// Node 0 runs as the DaemonSet's pod does: a lock holder on a real logind and
			// the engine beside it.
			h.logind = sc.startLogind()
			h.pair = sc.startLockPair(node, h.logind, h.holderFlags(), nil)
			sc.waitInhibitDelayMax(h.logind, historyShutdownTimeout)
			h.agents = append(h.agents, h.pair.engine)
			continue
		}
		h.agents = append(h.agents, sc.startAgent(node))
	}
	h.record("set up: %d nodes with an agent each (%s with a lock holder on logind), cluster evictionStrategy %s", len(sc.nodes), sc.nodes[0], h.cluster)
	for _, kind := range []string{"vm", "vm", "vm", "vm", "vmirs", "vmi"} {
		h.createVM(kind)
	}
}

func (h *history) holderFlags() []string {
	return []string{"--shutdown-timeout=" + historyShutdownTimeout.String(), "--logind-dropin-dir=" + h.logind.DropInDir}
}

// tainted says whether node i has the drain taint of the key in force.
func (h *history) tainted(i int) bool { return h.nodes[i].taints[h.key] }

// open lists the nodes with no taint, no cordon and no shutdown, other than except.
func (h *history) open(except int) []int {
	var out []int
	for i, n := range h.nodes {
		if i != except && len(n.taints) == 0 && !n.cordoned && !n.shutdown {
			out = append(out, i)
		}
	}
	return out
}

func (h *history) pick(from []int) int { return from[h.rnd.IntN(len(from))] }

// canClose says whether node i may be taken out of service: another node stays open,
// so that every VM has somewhere to go (a history where none has is issue 13.3's).
func (h *history) canClose(i int) bool { return len(h.open(i)) > 0 }

type historyOp struct {
	name   string
	weight int
	run    func() bool // false when the op does not apply now
}

// step applies one random operation, then waits for its effects to settle and checks
// every invariant (most steps), or only checks the invariants watched all along (the
// rest: the next step then lands in the middle of this one's effects).
func (h *history) step(i int) {
	ops := h.ops()
	total := 0
	for _, op := range ops {
		total += op.weight
	}
	for {
		r := h.rnd.IntN(total)
		var op historyOp
		for _, o := range ops {
			if r < o.weight {
				op = o
				break
			}
			r -= o.weight
		}
		n := len(h.log)
		if !op.run() {
			continue
		}
		settle := h.rnd.IntN(4) != 0
		if n < len(h.log) {
			h.log[len(h.log)-1] = fmt.Sprintf("%d. %s%s", i, h.log[len(h.log)-1], map[bool]string{true: "", false: " (no settling)"}[settle])
		}
		h.checkWatched()
		if settle {
			h.settle()
			h.check()
		}
		return
	}
}

func (h *history) ops() []historyOp {
	sc := h.sc
	nodeWhere := func(cond func(int) bool) (int, bool) {
		var c []int
		for i := range h.nodes {
			// The operator leaves a node alone while its host shuts down.
			if !h.nodes[i].shutdown && cond(i) {
				c = append(c, i)
			}
		}
		if len(c) == 0 {
			return 0, false
		}
		return h.pick(c), true
	}
	return []historyOp{
		{"taint", 4, func() bool {
			i, ok := nodeWhere(func(i int) bool { return !h.tainted(i) && h.canClose(i) })
			if ok {
				// kubectl taint without --overwrite: refused while the node has the
				// taint already (the agent's own, of a host shutdown being given back).
				if !sc.tryTaint(sc.nodes[i], h.key) {
					h.record("kubectl taint %s %s=draining:NoSchedule (refused: the node has that taint already)", sc.nodes[i], h.key)
					return true
				}
				h.nodes[i].taints[h.key] = true
				h.record("kubectl taint %s %s=draining:NoSchedule", sc.nodes[i], h.key)
			}
			return ok
		}},
		{"untaint", 4, func() bool {
			i, ok := nodeWhere(func(i int) bool { return len(h.nodes[i].taints) > 0 })
			if ok {
				keys := sortedKeys(h.nodes[i].taints)
				key := keys[h.rnd.IntN(len(keys))]
				sc.untaint(sc.nodes[i], key)
				delete(h.nodes[i].taints, key)
				h.record("kubectl taint %s %s-", sc.nodes[i], key)
			}
			return ok
		}},
		{"cordon", 2, func() bool {
			i, ok := nodeWhere(func(i int) bool { return !h.nodes[i].cordoned && h.canClose(i) })
			if ok {
				sc.cordon(sc.nodes[i], true)
				h.nodes[i].cordoned = true
				h.record("kubectl cordon %s", sc.nodes[i])
			}
			return ok
		}},
		{"uncordon", 2, func() bool {
			i, ok := nodeWhere(func(i int) bool { return h.nodes[i].cordoned })
			if ok {
				sc.cordon(sc.nodes[i], false)
				h.nodes[i].cordoned = false
				h.record("kubectl uncordon %s", sc.nodes[i])
			}
			return ok
		}},
		{"cli-drain", 3, func() bool {
			i, ok := nodeWhere(func(i int) bool { return !(h.tainted(i) && h.nodes[i].cordoned) && h.canClose(i) })
			if ok {
				out, errOut, code := sc.ctl("drain", sc.nodes[i], "--timeout=3s", "--interval=500ms")
				if code != 0 && code != 1 {
					sc.t.Fatalf("node-agent drain %s exited %d\nstdout:\n%s\nstderr:\n%s", sc.nodes[i], code, out, errOut)
				}
				h.nodes[i].taints[h.key], h.nodes[i].cordoned = true, true
				h.record("node-agent drain %s --timeout=3s (exit %d)", sc.nodes[i], code)
			}
			return ok
		}},
		{"cli-undrain", 3, func() bool {
			i, ok := nodeWhere(func(i int) bool { return h.tainted(i) || h.nodes[i].cordoned })
			if ok {
				out, errOut, code := sc.ctl("undrain", sc.nodes[i])
				if code != 0 {
					sc.t.Fatalf("node-agent undrain %s exited %d\nstdout:\n%s\nstderr:\n%s", sc.nodes[i], code, out, errOut)
				}
				delete(h.nodes[i].taints, h.key)
				h.nodes[i].cordoned = false
				h.record("node-agent undrain %s", sc.nodes[i])
			}
			return ok
		}},
		{"kill-agent", 3, func() bool {
			i := h.rnd.IntN(len(h.agents))
			h.agents[i].kill()
			if i == 0 {
				h.pair.startEngine()
				h.pair.engine.waitServing("/readyz", time.Minute)
				h.agents[0] = h.pair.engine
				h.record("engine on %s killed (SIGKILL) and started again (its lock holder stays)", sc.nodes[i])
				return true
			}
			h.agents[i] = sc.startAgent(sc.nodes[i])
			h.record("agent on %s killed (SIGKILL) and started again", sc.nodes[i])
			return true
		}},
		{"power-off", 3, func() bool {
			if h.nodes[0].shutdown || !h.canClose(0) {
				return false
			}
			h.asked = sc.powerOff(h.logind)
			h.nodes[0].shutdown = true
			h.record("systemctl poweroff on %s (logind PowerOff)", sc.nodes[0])
			return true
		}},
		{"cancel-shutdown", 2, func() bool {
			if !h.nodes[0].shutdown {
				return false
			}
			sc.waitPowerOffJob(h.logind, h.asked, historyShutdownTimeout+time.Minute)
			if n, err := h.logind.CancelJobs(sc.ctx); err != nil || n < 1 {
				sc.t.Fatalf("cancelling the poweroff job: %d jobs, %v", n, err)
			}
			h.nodes[0].shutdown = false
			// The holder takes its lock again: a power-off before that is not held.
			sc.waitLock(h.logind, h.pair.holder)
			h.record("the poweroff job on %s cancelled (systemctl cancel)", sc.nodes[0])
			return true
		}},
		{"reboot", 2, func() bool {
			if !h.nodes[0].shutdown {
				return false
			}
			sc.waitPowerOffJob(h.logind, h.asked, historyShutdownTimeout+time.Minute)
			h.pair.engine.kill()
			h.pair.holder.kill()
			h.reboot(0)
			if err := h.logind.RestartLogind(sc.ctx, false); err != nil {
				sc.t.Fatal(err)
			}
			h.pair.startHolder(h.holderFlags()...)
			sc.waitLock(h.logind, h.pair.holder)
			h.pair.startEngine()
			h.pair.engine.waitServing("/readyz", time.Minute)
			h.agents[0] = h.pair.engine
			h.nodes[0].shutdown = false
			h.record("%s powered off and booted again (new boot ID, fresh logind)", sc.nodes[0])
			return true
		}},
		{"crash", 1, func() bool {
			i := 1 + h.rnd.IntN(len(h.agents)-1)
			h.agents[i].kill()
			h.reboot(i)
			h.agents[i] = sc.startAgent(sc.nodes[i])
			h.record("%s crashed and booted again (new boot ID)", sc.nodes[i])
			return true
		}},
		{"taint-key", 1, func() bool {
			if h.nodes[0].shutdown {
				return false
			}
			key := historyCustomKey
			if h.key == historyCustomKey {
				key = nodeinfo.DefaultDrainTaintKey
			}
			if err := sc.env.cluster.UpdateKubeVirtConfiguration(sc.ctx, func(c *kubevirtv1.KubeVirtConfiguration) {
				if c.MigrationConfiguration == nil {
					c.MigrationConfiguration = &kubevirtv1.MigrationConfiguration{}
				}
				c.MigrationConfiguration.NodeDrainTaintKey = ptr.To(key)
			}); err != nil {
				sc.t.Fatal(err)
			}
			h.key = key
			h.record("the KubeVirt CR's nodeDrainTaintKey set to %s", key)
			return true
		}},
		{"migrate", 2, func() bool { return h.migrateOne() }},
		{"create", 3, func() bool {
			h.createVM([]string{"vm", "vm", "vmirs", "vmi"}[h.rnd.IntN(4)])
			return true
		}},
		{"delete", 1, func() bool {
			if len(h.vms) <= 3 {
				return false
			}
			h.deleteVM()
			return true
		}},
		{"cluster-strategy", 1, func() bool {
			all := []kubevirtv1.EvictionStrategy{kubevirtv1.EvictionStrategyLiveMigrate, kubevirtv1.EvictionStrategyLiveMigrateIfPossible,
				kubevirtv1.EvictionStrategyNone, kubevirtv1.EvictionStrategyExternal}
			s := all[h.rnd.IntN(len(all))]
			if s == h.cluster {
				return false
			}
			if err := sc.env.cluster.UpdateKubeVirtConfiguration(sc.ctx, func(c *kubevirtv1.KubeVirtConfiguration) { c.EvictionStrategy = ptr.To(s) }); err != nil {
				sc.t.Fatal(err)
			}
			if err := sc.waitDefaultEvictionStrategy(sc.ctx, s); err != nil {
				sc.t.Fatal(err)
			}
			h.cluster = s
			h.record("the KubeVirt CR's evictionStrategy set to %s", s)
			return true
		}},
	}
}

// createVM creates a VM of kind with a random strategy, migratability and pace, on an
// open node (a VM: first pinned there, then free to go anywhere in the pool).
func (h *history) createVM(kind string) {
	sc := h.sc
	strategies := []struct {
		name string
		opt  sim.VMOption
	}{
		{"LiveMigrate", liveMigrate}, {"LiveMigrate", liveMigrate}, {"LiveMigrateIfPossible", ifPossible},
		{"None", noneStrategy}, {"External", external}, {"cluster's", nil},
	}
	s := strategies[h.rnd.IntN(len(strategies))]
	var opts []sim.VMOption
	desc := []string{s.name}
	if s.opt != nil {
		opts = append(opts, s.opt)
	}
	if h.rnd.IntN(4) == 0 {
		opts = append(opts, notMigratable)
		desc = append(desc, "not migratable")
	}
	if h.rnd.IntN(3) == 0 {
		d := time.Duration(2+h.rnd.IntN(5)) * time.Second
		opts = append(opts, sim.WithMigrationDuration(d))
		desc = append(desc, "migration "+d.String())
	}
	if h.rnd.IntN(8) == 0 {
		opts = append(opts, sim.WithMigrationFailures(1))
		desc = append(desc, "first migration fails")
	}
	if h.rnd.IntN(4) == 0 {
		opts = append(opts, sim.WithShutdownDuration(2*time.Second), sim.WithTerminationGracePeriod(10))
		desc = append(desc, "shutdown 2s")
	}
	h.next++
	v := &historyVM{kind: kind, name: fmt.Sprintf("%s%d", kind, h.next)}
	switch kind {
	case "vm":
		node := sc.nodes[h.pick(h.open(-1))]
		sc.pinned(v.name, node, opts...)
		desc = append(desc, "started on "+node)
	case "vmirs":
		v.replicas = int32(1 + h.rnd.IntN(2))
		sc.createVMIRS(v.name, v.replicas, opts...)
		desc = append(desc, fmt.Sprintf("%d replicas", v.replicas))
	case "vmi":
		sc.createVMI(v.name, opts...)
	}
	v.desc = strings.Join(desc, ", ")
	h.vms[v.name] = v
	h.record("create %s %s (%s)", kind, v.name, v.desc)
}

func (h *history) deleteVM() {
	names := sortedKeys(h.vms)
	v := h.vms[names[h.rnd.IntN(len(names))]]
	res := map[string]string{"vm": nodeinfo.ResourceVMs, "vmirs": nodeinfo.ResourceVMIRSs, "vmi": nodeinfo.ResourceVMIs}[v.kind]
	h.vmis.expectEnd(v.name)
	if err := h.sc.env.cluster.KubeVirt.Delete().Namespace(h.sc.ns).Resource(res).Name(v.name).Do(h.sc.ctx).Error(); err != nil {
		h.sc.t.Fatalf("deleting %s %s: %v", v.kind, v.name, err)
	}
	delete(h.vms, v.name)
	h.record("delete %s %s", v.kind, v.name)
}

// migrateOne asks for a live migration of a running, migratable VMI that nothing else
// migrates, on a node not being drained, when another node is open.
func (h *history) migrateOne() bool {
	sc := h.sc
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err != nil {
		sc.t.Fatal(err)
	}
	var candidates []string
	for _, v := range list.Items {
		i := sc.nodeIndex(v.Status.NodeName)
		if i < 0 || h.draining(i) || len(h.open(i)) == 0 || v.Status.Phase != kubevirtv1.Running || v.DeletionTimestamp != nil ||
			!migratable(&v) || h.migrations.unfinishedOf(v.Name) > 0 || v.Status.MigrationState != nil && !v.Status.MigrationState.Completed && !v.Status.MigrationState.Failed {
			continue
		}
		candidates = append(candidates, v.Name)
	}
	if len(candidates) == 0 {
		return false
	}
	sort.Strings(candidates)
	vmi := candidates[h.rnd.IntN(len(candidates))]
	h.next++
	name := fmt.Sprintf("manual%d", h.next)
	err := sc.env.sim.Create(sc.ctx, sim.NewMigration(sc.ns, name, vmi))
	h.record("migration %s of VMI %s created (%v)", name, vmi, errOrOK(err))
	return true
}

func errOrOK(err error) string {
	if err != nil {
		return "refused: " + err.Error()
	}
	return "accepted"
}

func migratable(v *kubevirtv1.VirtualMachineInstance) bool {
	for _, c := range v.Status.Conditions {
		if c.Type == kubevirtv1.VirtualMachineInstanceIsMigratable {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (sc *scenario) nodeIndex(node string) int {
	for i, n := range sc.nodes {
		if n == node {
			return i
		}
	}
	return -1
}

// draining is whether the model expects the agent on node i to drain.
func (h *history) draining(i int) bool { return h.tainted(i) || h.nodes[i].shutdown }

// reboot reboots node i's host (its agent is stopped): every VM on it is gone, which
// the history expects.
func (h *history) reboot(i int) {
	sc := h.sc
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err != nil {
		sc.t.Fatal(err)
	}
	for _, v := range list.Items {
		if v.Status.NodeName == sc.nodes[i] {
			h.vmis.expectEnd(string(v.UID))
		}
	}
	if err := sc.env.sim.Reboot(sc.ctx, sc.nodes[i]); err != nil {
		sc.t.Fatal(err)
	}
}

// settle waits until the effects of the steps so far have settled: each agent drains
// exactly when its node is tainted, no VM is on its way (migrating, shutting down,
// starting, pending), no migration is unfinished, every VM and VMIRS runs.
func (h *history) settle() {
	sc := h.sc
	var last string
	err := wait.PollUntilContextTimeout(sc.ctx, 250*time.Millisecond, historySettle, true, func(context.Context) (bool, error) {
		ok, msg := h.settledNow()
		last = msg
		return ok, nil
	})
	if err != nil {
		sc.t.Fatalf("waiting %s for the history's last step to settle: %v (last seen: %s)\n%s", historySettle, err, last, h.describe())
	}
	h.settled++
}

// describe says what is on the cluster, for a failure message.
func (h *history) describe() string {
	sc := h.sc
	var b strings.Builder
	for _, a := range h.agents {
		code, st := a.safeToShutdown("")
		fmt.Fprintf(&b, "agent on %s: %s\n", a.node, statusJSON(code, st))
	}
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err == nil {
		for _, v := range list.Items {
			fmt.Fprintf(&b, "VMI %s: %s, evacuationNodeName %q, migrationState %+v\n", v.Name, describeVMI(&v), v.Status.EvacuationNodeName, v.Status.MigrationState)
		}
	}
	if pods, err := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{}); err == nil {
		for _, p := range pods.Items {
			fmt.Fprintf(&b, "pod %s: node %s, phase %s, deleting %v, VMI uid %s, labels %v\n", p.Name, p.Spec.NodeName, p.Status.Phase,
				p.DeletionTimestamp != nil, p.Labels[kubevirtv1.CreatedByLabel], p.Labels)
		}
	}
	ms := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).Do(sc.ctx).Into(ms); err == nil {
		for _, m := range ms.Items {
			fmt.Fprintf(&b, "migration %s of %s: %s\n", m.Name, m.Spec.VMIName, m.Status.Phase)
		}
	}
	return b.String()
}

// settledNow is one look at whether the steps' effects settled, and what is still
// moving if not.
func (h *history) settledNow() (bool, string) {
	sc := h.sc
	for i, a := range h.agents {
		code, st := a.safeToShutdown("")
		if code != http.StatusOK && code != http.StatusServiceUnavailable {
			return false, fmt.Sprintf("%s: /safe-to-shutdown %d", a.node, code)
		}
		if st.Draining != h.draining(i) {
			return false, fmt.Sprintf("%s: draining %v, want %v", a.node, st.Draining, h.draining(i))
		}
		for _, v := range st.VMs {
			switch v.State {
			case agent.StateBlocked, agent.StateWaitingExternal:
			case agent.StateRunning:
				if st.Draining {
					return false, fmt.Sprintf("%s: VM %s still running while draining", a.node, v.Name)
				}
			default:
				return false, fmt.Sprintf("%s: VM %s %s %s", a.node, v.Name, v.State, v.Detail)
			}
		}
		n := sc.node(a.node)
		if _, ok := n.Annotations[agent.AnnotationDrain]; ok != h.draining(i) {
			return false, fmt.Sprintf("%s: drain record present %v, want %v", a.node, ok, h.draining(i))
		}
	}
	if n := h.migrations.pending(); n != "" {
		return false, "unfinished migrations: " + n
	}
	return h.vmsSettled()
}

// vmsSettled says whether every VMI is Running or ended, every VM runs and every VMIRS
// has its replicas running.
func (h *history) vmsSettled() (bool, string) {
	sc := h.sc
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err != nil {
		return false, err.Error()
	}
	running := map[string]int32{}
	for _, v := range list.Items {
		if v.IsFinal() {
			continue
		}
		if v.Status.Phase != kubevirtv1.Running || v.DeletionTimestamp != nil {
			return false, fmt.Sprintf("VMI %s: %s", v.Name, describeVMI(&v))
		}
		owner := v.Name
		if rs := v.Labels[sim.LabelVMIRS]; rs != "" {
			owner = rs
		}
		running[owner]++
	}
	for name, v := range h.vms {
		switch v.kind {
		case "vm":
			if running[name] != 1 {
				return false, fmt.Sprintf("VM %s: %d VMIs running", name, running[name])
			}
		case "vmirs":
			if running[name] != v.replicas {
				return false, fmt.Sprintf("VMIRS %s: %d of %d replicas running", name, running[name], v.replicas)
			}
		}
	}
	return true, ""
}

// checkWatched checks the invariants watched all along: no LiveMigrate VM shut down,
// never two unfinished migrations for one VMI.
func (h *history) checkWatched() {
	sc := h.sc
	h.migrations.mu.Lock()
	for _, v := range h.migrations.violations {
		sc.t.Errorf("after %q: %s", h.log[len(h.log)-1], v)
	}
	h.migrations.violations = nil
	h.migrations.mu.Unlock()
	for _, v := range h.vmis.takeViolations() {
		sc.t.Errorf("after %q: %s", h.log[len(h.log)-1], v)
	}
	if sc.t.Failed() {
		sc.t.FailNow()
	}
}

// check checks every invariant once the steps' effects settled.
func (h *history) check() {
	sc := h.sc
	h.checkWatched()
	for i, a := range h.agents {
		node := sc.nodes[i]
		// /safe-to-shutdown is 200 exactly when no VM is on the node; a drained node
		// reports each VM left as blocked (or left to its external controller) with the
		// reason.
		var last string
		sc.eventually(15*time.Second, node+"'s /safe-to-shutdown to match the VMs on it", func() (bool, string) {
			left := sc.vmsOnNode(node)
			code, st := a.safeToShutdown("")
			last = fmt.Sprintf("%s; VMs on the node: %v", statusJSON(code, st), left)
			return (code == http.StatusOK) == (len(left) == 0), last
		})
		_, st := a.safeToShutdown("")
		if st.Draining {
			for _, v := range st.VMs {
				if (v.State != agent.StateBlocked && v.State != agent.StateWaitingExternal) || v.Detail == "" {
					sc.t.Errorf("drained node %s reports VM %s/%s as %s (%q): want blocked or waiting-external with a reason", node, v.Namespace, v.Name, v.State, v.Detail)
				}
				if v.State == agent.StateBlocked && v.Strategy != string(kubevirtv1.EvictionStrategyLiveMigrate) {
					sc.t.Errorf("drained node %s reports VM %s/%s (%s) blocked: only a LiveMigrate VM may be", node, v.Namespace, v.Name, v.Strategy)
				}
			}
		}
		// No node left cordoned or tainted by the agent with no drain or shutdown
		// pending: the taint and cordon are exactly the operator's.
		// After a reboot or a cancelled shutdown only the agent's own additions are gone.
		n := sc.node(node)
		m := h.nodes[i]
		for _, key := range []string{nodeinfo.DefaultDrainTaintKey, historyCustomKey} {
			if want := m.taints[key] || m.shutdown && key == h.key; hasTaintKey(n, key) != want {
				sc.t.Errorf("node %s: taint %s present %v, want %v (the operator's taints %v, shutdown pending %v)", node, key, hasTaintKey(n, key), want, sortedKeys(m.taints), m.shutdown)
			}
		}
		if want := m.cordoned || m.shutdown; n.Spec.Unschedulable != want {
			sc.t.Errorf("node %s: cordoned %v, want %v (the operator's cordon %v, shutdown pending %v)", node, n.Spec.Unschedulable, want, m.cordoned, m.shutdown)
		}
		if raw, ok := n.Annotations[agent.AnnotationOwned]; ok && !m.shutdown {
			sc.t.Errorf("node %s: the agent claims %s with no shutdown pending", node, raw)
		}
	}
	h.checkShutdownEvents()
	if sc.t.Failed() {
		sc.t.FailNow()
	}
}

// checkShutdownEvents checks that the agent never asked a LiveMigrate VM to shut down
// (its ShutdownRequested events).
func (h *history) checkShutdownEvents() {
	sc := h.sc
	list, err := sc.kube().CoreV1().Events(sc.ns).List(sc.ctx, metav1.ListOptions{FieldSelector: "reason=" + agent.ReasonShutdownRequested})
	if err != nil {
		sc.t.Fatal(err)
	}
	for _, ev := range list.Items {
		if s := h.vmis.strategyOf(string(ev.InvolvedObject.UID)); s == kubevirtv1.EvictionStrategyLiveMigrate {
			sc.t.Errorf("%s event on LiveMigrate VMI %s: %s", ev.Reason, ev.InvolvedObject.Name, ev.Message)
		}
	}
}

// vmsOnNode lists the VMs on node as the SPEC counts them: VMIs there not in a final
// phase, and virt-launcher pods scheduled there that have not terminated.
func (sc *scenario) vmsOnNode(node string) []string {
	sc.t.Helper()
	var out []string
	for name := range sc.vmisOn(node) {
		out = append(out, "vmi/"+name)
	}
	pods, err := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node, LabelSelector: "kubevirt.io=virt-launcher"})
	if err != nil {
		sc.t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			out = append(out, "pod/"+p.Name)
		}
	}
	sort.Strings(out)
	return out
}

// pending names the unfinished migrations, empty when there is none.
func (u *unfinishedMigrations) pending() string {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []string
	for vmi, ms := range u.unfinished {
		for m := range ms {
			out = append(out, vmi+"/"+m)
		}
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

func (u *unfinishedMigrations) unfinishedOf(vmi string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.unfinished[vmi])
}

func (u *unfinishedMigrations) count() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, ms := range u.all {
		n += len(ms)
	}
	return n
}

// vmiEnds watches the namespace's VMIs and records every LiveMigrate VMI that ended
// (final phase, being deleted or gone) although the history did not delete it.
type vmiEnds struct {
	mu         sync.Mutex
	strategy   map[string]kubevirtv1.EvictionStrategy // by UID
	ended      map[string]bool                        // by UID
	expected   map[string]bool                        // owners the history deleted, UIDs on a rebooted node
	violations []string
}

func (sc *scenario) watchVMIEnds() *vmiEnds {
	sc.t.Helper()
	w := &vmiEnds{strategy: map[string]kubevirtv1.EvictionStrategy{}, ended: map[string]bool{}, expected: map[string]bool{}}
	lw := cache.NewListWatchFromClient(sc.env.cluster.KubeVirt, nodeinfo.ResourceVMIs, sc.ns, fields.Everything())
	_, ctl := cache.NewInformerWithOptions(cache.InformerOptions{
		ListerWatcher: lw,
		ObjectType:    &kubevirtv1.VirtualMachineInstance{},
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { w.observe(obj, false) },
			UpdateFunc: func(_, obj any) { w.observe(obj, false) },
			DeleteFunc: func(obj any) {
				if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				w.observe(obj, true)
			},
		},
	})
	ctx, cancel := context.WithCancel(sc.ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctl.RunWithContext(ctx)
	}()
	sc.t.Cleanup(func() {
		cancel()
		<-done
	})
	if !cache.WaitForCacheSync(sc.ctx.Done(), ctl.HasSynced) {
		sc.t.Fatal("the VMI watch did not sync")
	}
	return w
}

func (w *vmiEnds) observe(obj any, deleted bool) {
	v, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	uid := string(v.UID)
	s := kubevirtv1.EvictionStrategyNone
	if v.Spec.EvictionStrategy != nil {
		s = *v.Spec.EvictionStrategy
	}
	w.strategy[uid] = s
	if w.ended[uid] || !(deleted || v.IsFinal() || v.DeletionTimestamp != nil) {
		return
	}
	w.ended[uid] = true
	owner := v.Name
	if rs := v.Labels[sim.LabelVMIRS]; rs != "" {
		owner = rs
	}
	if s == kubevirtv1.EvictionStrategyLiveMigrate && !w.expected[owner] && !w.expected[uid] {
		w.violations = append(w.violations, fmt.Sprintf("LiveMigrate VMI %s (uid %s) on %s was shut down: phase %s, deleting %v, gone %v",
			v.Name, uid, v.Status.NodeName, v.Status.Phase, v.DeletionTimestamp != nil, deleted))
	}
}

// expectEnd says that the VMIs of an owner (or one VMI, by UID) may end.
func (w *vmiEnds) expectEnd(ownerOrUID string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.expected[ownerOrUID] = true
}

func (w *vmiEnds) strategyOf(uid string) kubevirtv1.EvictionStrategy {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.strategy[uid]
}

func (w *vmiEnds) takeViolations() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.violations
	w.violations = nil
	return out
}

func (w *vmiEnds) ends() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.ended)
}
