package e2e

// The shutdown lock held where a crash of the drain engine cannot drop it: the lock
// holder (`node-agent inhibit`) and the engine (`node-agent run --lock-holder`) as two
// processes, as the DaemonSet's two containers run them, on the real logind tier. The
// engine is SIGKILLed at several points of a held shutdown and started again at once;
// the holder keeps the shutdown until the node is safe. And a shutdown that no lock of
// ours holds (the holder restarted mid-shutdown, or the engine holding the lock itself
// and restarted) is reported as such, never as held or released safely.

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
	"github.com/node-agent/node-agent/systemd"
)

const (
	// killRunsEnv sets how many seeded runs TestShutdownHeldAcrossEngineKills makes (default
	// 3, one per kill point); killSeedEnv fixes the first seed (default: the time).
	killRunsEnv = "NODE_AGENT_E2E_KILL_RUNS"
	killSeedEnv = "NODE_AGENT_E2E_KILL_SEED"
	// msgEngineFollows is what an engine logs when it picks up a shutdown.
	msgEngineFollows = "host shutdown: taking the node out of service"
)

// lockPair is the DaemonSet's pod: the lock holder and the engine beside it.
type lockPair struct {
	sc         *scenario
	node       string
	env        *logind.Env
	holder     *agentProc
	engine     *agentProc
	engineAddr string
	flags      []string // the engine's extra flags
}

// startLockPair starts the lock holder (its lock listed by logind) and the engine
// following it, for node.
func (sc *scenario) startLockPair(node string, env *logind.Env, holderFlags, engineFlags []string) *lockPair {
	sc.t.Helper()
	p := &lockPair{sc: sc, node: node, env: env, engineAddr: freeAddr(sc.t), flags: engineFlags}
	p.startHolder(holderFlags...)
	p.startEngine()
	p.engine.waitServing("/readyz", time.Minute)
	return p
}

func (p *lockPair) startHolder(flags ...string) {
	p.sc.t.Helper()
	addr := freeAddr(p.sc.t)
	if p.holder != nil {
		addr = p.holder.addr // restarted where the engine looks for it
	}
	args := []string{"inhibit", "--node-name=" + p.node, "--listen-address=" + addr, "--engine-url=http://" + p.engineAddr,
		"--log-format=json", "--log-level=debug"}
	if !hasFlag(flags, "--logind-dropin-dir") {
		args = append(args, "--logind-dropin-dir=")
	}
	p.holder = p.sc.spawnAgent(p.sc.env.agentBin, p.node+"-holder", addr, append(args, flags...), []string{"DBUS_SYSTEM_BUS_ADDRESS=" + p.env.Address})
	p.holder.waitServing("/healthz", 30*time.Second)
}

// startEngine starts the engine (at the same address each time); it does not wait for it.
func (p *lockPair) startEngine() {
	p.sc.t.Helper()
	args := []string{"run", "--kubeconfig=" + p.sc.env.cluster.Kubeconfig, "--node-name=" + p.node, "--listen-address=" + p.engineAddr,
		"--resync=1s", "--log-level=debug", "--log-format=json", "--shutdown-inhibitor=true", "--lock-holder=http://" + p.holder.addr}
	p.engine = p.sc.spawnAgent(p.sc.env.agentBin, p.node, p.engineAddr, append(args, p.flags...), nil)
}

// holderState reads the holder's GET /v1/shutdown.
func (p *lockPair) holderState() systemd.ShutdownState {
	p.sc.t.Helper()
	code, body := p.holder.get("/v1/shutdown")
	var st systemd.ShutdownState
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		p.sc.t.Fatalf("holder's /v1/shutdown: %d %s", code, body)
	}
	return st
}

// rss is a process's resident memory in KiB, from /proc.
func rss(a *agentProc) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", a.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n
		}
	}
	return -1
}

type killPoint string

const (
	killBeforeFirstEviction killPoint = "before the first eviction"
	killMidMigration        killPoint = "mid-migration"
	killBeforeRelease       killPoint = "just before the release"
)

// The engine SIGKILLed during a held shutdown, at several points, and started again at
// once: the holder keeps the lock, the new engine carries on draining, logind starts the
// poweroff job only once the node is safe, no VMI gets a second migration, and after
// the simulated reboot only the agent's own taint and cordon are removed. Seeded runs:
// the seed of each is printed; NODE_AGENT_E2E_KILL_RUNS=10 (or more) for a longer run.
func TestShutdownHeldAcrossEngineKills(t *testing.T) {
	t.Parallel() // its subtests run one after another (newScenario in a subtest)
	runs := 3
	if v := os.Getenv(killRunsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", killRunsEnv, v)
		}
		runs = n
	}
	seed := time.Now().UnixNano()
	if v := os.Getenv(killSeedEnv); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: want a number", killSeedEnv, v)
		}
		seed = n
	}
	points := []killPoint{killBeforeFirstEviction, killMidMigration, killBeforeRelease}
	var carryOn, releaseGap []time.Duration
	for i := 0; i < runs; i++ {
		runSeed := seed + int64(i)
		point := points[i%len(points)]
		t.Run(fmt.Sprintf("run%d", i), func(t *testing.T) {
			t.Logf("seed %d (%s=%d reproduces it as run 0), engine killed %s", runSeed, killSeedEnv, runSeed, point)
			c, g := killDuringHeldShutdown(t, rand.New(rand.NewSource(runSeed)), point)
			carryOn, releaseGap = append(carryOn, c), append(releaseGap, g)
		})
	}
	t.Logf("%d runs: SIGKILL -> the restarted engine follows the shutdown: %v; last VM gone -> poweroff job: %v", runs, carryOn, releaseGap)
}

func killDuringHeldShutdown(t *testing.T, rnd *rand.Rand, point killPoint) (carryOn, releaseGap time.Duration) {
	const operatorKey = "example.com/maintenance"
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	var vms []*kubevirtv1.VirtualMachineInstance
	for i := 0; i < 3; i++ {
		d := time.Duration(2000+rnd.Intn(2000)) * time.Millisecond
		vms = append(vms, sc.pinned(fmt.Sprintf("vm%d", i), node, liveMigrate, sim.WithMigrationDuration(d)))
	}
	sc.taint(node, operatorKey) // an operator's taint of another key: it stays
	env := sc.startLogind()
	p := sc.startLockPair(node, env, []string{"--shutdown-timeout=2m", "--logind-dropin-dir=" + env.DropInDir}, nil)
	sc.waitInhibitDelayMax(env, 2*time.Minute)
	watch := sc.watchVMs(node)
	migrations := sc.watchMigrations()
	bootID := sc.node(node).Status.NodeInfo.BootID

	asked := sc.powerOff(env)
	jitter := time.Duration(rnd.Intn(300)) * time.Millisecond
	switch point {
	case killBeforeFirstEviction:
		sc.eventually(30*time.Second, "the holder to hold the shutdown", func() (bool, string) {
			st := p.holderState()
			return st.ShuttingDown && st.Held, fmt.Sprintf("%+v", st)
		})
	case killMidMigration:
		sc.eventually(2*time.Minute, "a migration running", func() (bool, string) {
			for _, v := range vms {
				for _, m := range sc.migrationsOf(v.Name) {
					if m.Status.Phase == kubevirtv1.MigrationRunning {
						return true, ""
					}
				}
			}
			return false, "no migration running"
		})
	case killBeforeRelease:
		sc.eventually(time.Minute, "one VM left", func() (bool, string) {
			watch.mu.Lock()
			defer watch.mu.Unlock()
			return watch.vmisLeftLocked() == 1, fmt.Sprintf("%d VMIs and pods left", watch.left)
		})
	}
	time.Sleep(jitter) // the seeded moment of the kill within the point; not a synchronisation
	killed := time.Now()
	p.engine.kill()
	p.startEngine()
	followed := p.engine.waitLogged(msgEngineFollows, 1)
	carryOn = followed.Sub(killed)
	t.Logf("engine killed %s (%v after PowerOff); the restarted engine followed the shutdown %v after the kill; holder RSS %d KiB, engine RSS %d KiB",
		point, killed.Sub(asked).Round(time.Millisecond), carryOn.Round(time.Millisecond), rss(p.holder), rss(p.engine))

	sc.waitOutOfService(node, bootID)
	for _, v := range vms {
		sc.waitMigrated(v, other)
	}
	started := sc.waitPowerOffJob(env, asked, 2*time.Minute)
	gone := watch.waitEmpty(sc, 30*time.Second)
	releaseGap = started.Sub(gone)
	if started.Before(gone.Add(-watchSlack)) {
		t.Errorf("logind started the poweroff job at %s, before the last VM left at %s", started.Format(time.StampMicro), gone.Format(time.StampMicro))
	}
	// The holder records its outcome just after closing the lock.
	sc.eventually(10*time.Second, "the holder to say it released the shutdown as safe", func() (bool, string) {
		st := p.holderState()
		return st.Released && st.ReleaseOutcome == systemd.OutcomeSafe, fmt.Sprintf("%+v", st)
	})
	migrations.stop()
	migrations.mu.Lock()
	for vmi, names := range migrations.all {
		if len(names) != 1 {
			t.Errorf("VMI %s had %d migrations %v, want exactly one", vmi, len(names), names)
		}
	}
	if len(migrations.violations) > 0 {
		t.Errorf("second unfinished migrations: %v", migrations.violations)
	}
	migrations.mu.Unlock()
	if hasEvent(sc.events(metav1.NamespaceDefault, "Node", node), agent.ReasonShutdownNotHeld) {
		t.Errorf("a %s event for a shutdown the holder held throughout", agent.ReasonShutdownNotHeld)
	}

	// The simulated reboot: everything on the host is gone; the node comes back with a
	// new boot ID and a fresh logind; the pod starts again.
	p.engine.kill()
	p.holder.kill()
	if err := sc.env.sim.Reboot(sc.ctx, node); err != nil {
		t.Fatal(err)
	}
	if err := env.RestartLogind(sc.ctx, false); err != nil {
		t.Fatal(err)
	}
	p.startHolder("--shutdown-timeout=2m", "--logind-dropin-dir="+env.DropInDir)
	p.startEngine()
	sc.eventually(time.Minute, "the agent to remove its own taint and cordon after the reboot", func() (bool, string) {
		n := sc.node(node)
		_, owned := n.Annotations[agent.AnnotationOwned]
		return !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !n.Spec.Unschedulable && !owned,
			fmt.Sprintf("taints %v, unschedulable %v, annotations %v", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	})
	if !hasTaintKey(sc.node(node), operatorKey) {
		t.Errorf("the operator's taint %s was removed", operatorKey)
	}
	return carryOn, releaseGap
}

// vmisLeftLocked counts the VMIs (not pods) left on the node; w.mu held.
func (w *vmWatch) vmisLeftLocked() int {
	n := 0
	for _, obj := range w.vmis.GetStore().List() {
		if v := obj.(*kubevirtv1.VirtualMachineInstance); v.Status.NodeName == w.node && !v.IsFinal() {
			n++
		}
	}
	return n
}

// A shutdown that no lock of ours holds is said to be so: the lock holder killed and
// restarted during a held shutdown (logind refuses it a new lock), or an engine that
// holds the lock itself (no --lock-holder) killed and restarted. logind goes ahead at
// once; the agent sends a Warning ShutdownNotHeld naming the VMs left, /readyz is not
// ready with the reason, node_agent_shutdown_not_held is 1 and the release is counted
// as unheld; no ShutdownReleased event claims a safe release.
func TestShutdownNotHeldIsReported(t *testing.T) {
	t.Parallel() // its subtests run one after another (newScenario in a subtest)
	for _, tc := range []struct {
		name    string
		ownLock bool // the engine holds the lock itself
	}{
		{name: "the lock holder restarted mid-shutdown"},
		{name: "an engine holding its own lock restarted mid-shutdown", ownLock: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc := newScenario(t, 1)
			node := sc.nodes[0]
			sc.createVM("blocked", liveMigrate, notMigratable, onNode(node))
			env := sc.startLogind()
			flags := []string{"--shutdown-timeout=2m", "--logind-dropin-dir=" + env.DropInDir}
			var restart func() *agentProc // kills what holds the lock, starts it again, returns the engine
			var engine *agentProc
			if tc.ownLock {
				engine = sc.startShutdownAgent(node, env, flags...)
				restart = func() *agentProc {
					engine.kill()
					a := sc.spawnAgent(sc.env.agentBin, node, engine.addr, engine.cmd.Args[1:], []string{"DBUS_SYSTEM_BUS_ADDRESS=" + env.Address})
					a.waitServing("/healthz", time.Minute)
					return a
				}
			} else {
				p := sc.startLockPair(node, env, flags, nil)
				engine = p.engine
				restart = func() *agentProc {
					p.holder.kill()
					p.startHolder(flags...)
					return p.engine
				}
			}
			sc.waitInhibitDelayMax(env, 2*time.Minute)
			asked := sc.powerOff(env)
			engine.waitStatus(time.Minute, "the blocked VM holding the shutdown", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
				v := vmStatus(st, sc.ns, "blocked")
				return st.Draining && st.Trigger == agent.TriggerShutdown && v != nil && v.State == agent.StateBlocked
			})
			if _, started, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || started {
				t.Fatalf("the poweroff job started (%v) while the lock was held", err)
			}
			killed := time.Now()
			engine = restart()
			started := sc.waitPowerOffJob(env, asked, 30*time.Second)
			t.Logf("the lock's process killed: logind started the poweroff job %v later", started.Sub(killed).Round(time.Millisecond))

			ev := sc.nodeEvent(node, agent.ReasonShutdownNotHeld)
			if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, sc.ns+"/blocked") {
				t.Errorf("%s event %s %q: want a Warning naming %s/blocked", ev.Reason, ev.Type, ev.Message, sc.ns)
			}
			sc.eventually(30*time.Second, "/readyz not ready saying the shutdown is not held", func() (bool, string) {
				code, body := engine.get("/readyz")
				return code == http.StatusServiceUnavailable && strings.Contains(body, "not held"), fmt.Sprintf("%d %s", code, body)
			})
			sc.eventually(30*time.Second, "node_agent_shutdown_not_held 1", func() (bool, string) {
				v, ok := engine.metric("node_agent_shutdown_not_held")
				return ok && v == 1, fmt.Sprint(v, ok)
			})
			// The restarted holder's state (released, unheld) reaches the engine after the
			// gap in which it did not answer (already not held).
			sc.eventually(30*time.Second, `node_agent_shutdown_releases_total{outcome="unheld"}`, func() (bool, string) {
				_, metrics := engine.get("/metrics")
				return strings.Contains(metrics, `outcome="unheld"`), "not in /metrics"
			})
			for _, e := range sc.events(metav1.NamespaceDefault, "Node", node) {
				if e.Reason == agent.ReasonShutdownReleased {
					t.Errorf("%s event %q: nothing of ours was released", e.Reason, e.Message)
				}
			}
		})
	}
}

// The DaemonSet's rolling update deletes the pod during a held host shutdown: the
// kubelet sends SIGTERM to both containers. The lock holder keeps the lock through its
// SIGTERM, and the engine keeps draining through its own, until the node is safe: logind
// starts the poweroff job only after the last VM left, and each process exits only after
// the release (README "Upgrade").
func TestShutdownHeldAcrossThePodsDeletion(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	var vms []*kubevirtv1.VirtualMachineInstance
	for i := 0; i < 2; i++ {
		vms = append(vms, sc.pinned(fmt.Sprintf("vm%d", i), node, liveMigrate, sim.WithMigrationDuration(3*time.Second)))
	}
	env := sc.startLogind()
	p := sc.startLockPair(node, env, []string{"--shutdown-timeout=2m", "--logind-dropin-dir=" + env.DropInDir}, nil)
	sc.waitInhibitDelayMax(env, 2*time.Minute)
	watch := sc.watchVMs(node)

	asked := sc.powerOff(env)
	sc.eventually(2*time.Minute, "a migration running", func() (bool, string) {
		for _, v := range vms {
			for _, m := range sc.migrationsOf(v.Name) {
				if m.Status.Phase == kubevirtv1.MigrationRunning {
					return true, ""
				}
			}
		}
		return false, "no migration running"
	})
	// The kubelet deletes the pod: SIGTERM to both containers at once.
	terminated := time.Now()
	_ = p.holder.cmd.Process.Signal(syscall.SIGTERM)
	_ = p.engine.cmd.Process.Signal(syscall.SIGTERM)

	for _, v := range vms {
		sc.waitMigrated(v, other)
	}
	started := sc.waitPowerOffJob(env, asked, 2*time.Minute)
	gone := watch.waitEmpty(sc, 30*time.Second)
	if started.Before(gone.Add(-watchSlack)) {
		t.Errorf("logind started the poweroff job at %s, before the last VM left at %s", started.Format(time.StampMicro), gone.Format(time.StampMicro))
	}
	for _, a := range []*agentProc{p.holder, p.engine} {
		select {
		case <-a.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not exit within 30 s of the release", a.node)
		}
	}
	t.Logf("SIGTERM %v after PowerOff; last VM left %v after the SIGTERM; poweroff job %v after that",
		terminated.Sub(asked).Round(time.Millisecond), gone.Sub(terminated).Round(time.Millisecond), started.Sub(gone).Round(time.Millisecond))
}
