package e2e

// Faults of the parts around the agent (issue 13.2), each in the middle of a drain, on
// a cluster of the test's own (newPrivateEnv): these tests break the control plane on
// purpose. docs/RELIABILITY.md reports what they measured.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
)

// faultDrain is a drain of several VMs under way on a private cluster: LiveMigrate VMs
// whose migrations take a while (KubeVirt runs two at a time from the node, so some
// wait their turn), None VMs whose guests take a while to power off, and one None VM
// whose eviction a PodDisruptionBudget refuses until release, so that the agent still
// has an eviction to request after the fault.
type faultDrain struct {
	sc    *scenario
	a     *agentProc
	node  string
	live  []*kubevirtv1.VirtualMachineInstance
	none  []*kubevirtv1.VirtualMachineInstance
	held  *kubevirtv1.VirtualMachineInstance
	pods  map[string]string // VMI name -> its virt-launcher pod on node at the start
	start time.Time
	// safeAt: when finish saw /safe-to-shutdown answer 200.
	safeAt time.Time
}

const (
	faultLiveVMs = 4
	faultNoneVMs = 2
	heldBudget   = "held"
)

// startFaultDrain starts the drain (the agent's own taint key) on a cluster of the
// test's own and returns once it is under way: a migration running, the None VMs
// shutting down, the held VM's eviction refused.
func startFaultDrain(t *testing.T) *faultDrain {
	f := newFaultVMs(t)
	f.a = f.sc.startAgent(f.node, "--drain-taint-key="+agentOnlyKey)
	f.start = time.Now()
	f.sc.taint(f.node, agentOnlyKey)
	f.underWay(agent.TriggerTaint)
	return f
}

// newFaultVMs starts a cluster of the test's own (marked faulted) with three nodes and
// puts the fault drain's VMs on the first, and the budget that refuses the held VM's
// eviction.
func newFaultVMs(t *testing.T) *faultDrain {
	// The controller-manager's node grace as a real cluster's (40 s and more), longer
	// than the faults' 30 s: with the test cluster's 16 s, the nodes turned NotReady
	// after the etcd pause, their pods were marked not ready, and in that moment the
	// Eviction API let the held VM's pod go (a budget lets an unhealthy pod go while
	// its status still shows the healthy count): node lifecycle is not what this tests.
	e := newPrivateEnv(t, cluster.Options{NodeMonitorGracePeriod: 50 * time.Second})
	e.faulted = true
	sc := newScenarioIn(t, e, 3)
	f := &faultDrain{sc: sc, node: sc.nodes[0]}
	for i := 0; i < faultLiveVMs; i++ {
		f.live = append(f.live, sc.pinned(fmt.Sprintf("live%d", i), f.node, liveMigrate, sim.WithMigrationDuration(5*time.Second)))
	}
	for i := 0; i < faultNoneVMs; i++ {
		f.none = append(f.none, sc.pinned(fmt.Sprintf("none%d", i), f.node, noneStrategy,
			sim.WithTerminationGracePeriod(60), sim.WithShutdownDuration(20*time.Second)))
	}
	f.held = sc.pinned("held", f.node, noneStrategy, sim.WithLabels(map[string]string{"budget": heldBudget}))
	if _, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: heldBudget},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(1)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{"budget": heldBudget, kubevirtv1.AppLabel: "virt-launcher"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.pods = map[string]string{}
	for _, v := range append(append(append([]*kubevirtv1.VirtualMachineInstance{}, f.live...), f.none...), f.held) {
		f.pods[v.Name] = sc.launcherPod(v, f.node).Name
	}
	return f
}

// underWay waits until the drain (started by trigger) is under way: a migration
// running, the None VMs shutting down, the held VM's eviction refused.
func (f *faultDrain) underWay(trigger string) {
	sc := f.sc
	f.a.waitStatus(time.Minute, "the drain under way", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		migrating := 0
		for _, v := range f.live {
			if s := vmStatus(st, sc.ns, v.Name); s != nil && s.State == agent.StateMigrating && s.Migration != nil && s.Migration.Phase == string(kubevirtv1.MigrationRunning) {
				migrating++
			}
		}
		for _, v := range f.none {
			if s := vmStatus(st, sc.ns, v.Name); s == nil || s.State != agent.StateShuttingDown {
				return false
			}
		}
		h := vmStatus(st, sc.ns, f.held.Name)
		return st.Draining && st.Trigger == trigger && migrating > 0 && h != nil && strings.Contains(h.Detail, "eviction refused")
	})
	sc.t.Logf("drain under way %s after it was asked for", time.Since(f.start).Round(100*time.Millisecond))
}

// finish lifts the budget, waits for the drain to complete and checks what a user
// checks after a fault: the drain finished; each VM's action was requested once (the
// evictions the API server accepted, per pod, in its audit log; KubeVirt's migrations
// per VMI; the agent's events per VMI); no VM lost (each LiveMigrate VM runs elsewhere,
// the same VMI; each None VM was shut down by its one eviction and started again
// elsewhere). recovered is when the fault ended; it returns how long after it the
// drain completed.
func (f *faultDrain) finish(recovered time.Time) time.Duration {
	sc, t := f.sc, f.sc.t
	t.Helper()
	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, heldBudget, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	f.a.waitSafe(3 * time.Minute)
	f.safeAt = time.Now()
	done := f.safeAt.Sub(recovered)
	t.Logf("drain completed %s after the fault ended (%s after the taint)", done.Round(100*time.Millisecond), time.Since(f.start).Round(100*time.Millisecond))

	for _, before := range f.live {
		after := sc.vmi(before.Name)
		switch {
		case after == nil || after.UID != before.UID:
			t.Errorf("LiveMigrate VM %s was not live-migrated: %s", before.Name, describeVMI(after))
		case after.Status.Phase != kubevirtv1.Running || after.Status.NodeName == f.node || after.DeletionTimestamp != nil:
			t.Errorf("LiveMigrate VM %s does not run elsewhere: %s", before.Name, describeVMI(after))
		}
		if ms := sc.migrationsOf(before.Name); len(ms) != 1 {
			t.Errorf("LiveMigrate VM %s: %d migrations, want 1", before.Name, len(ms))
		}
		if n := sc.eventCount(sc.ns, "VirtualMachineInstance", before.Name, agent.ReasonMigrationRequested); n != 1 {
			t.Errorf("LiveMigrate VM %s: %d %s events, want 1", before.Name, n, agent.ReasonMigrationRequested)
		}
		if n := sc.eventCount(sc.ns, "VirtualMachineInstance", before.Name, agent.ReasonShutdownRequested); n != 0 {
			t.Errorf("LiveMigrate VM %s: %d %s events, want none", before.Name, n, agent.ReasonShutdownRequested)
		}
	}
	for _, before := range append(append([]*kubevirtv1.VirtualMachineInstance{}, f.none...), f.held) {
		sc.waitRestartedElsewhere(before, f.node)
		if n := sc.eventCount(sc.ns, "VirtualMachineInstance", before.Name, agent.ReasonShutdownRequested); n != 1 {
			t.Errorf("None VM %s: %d %s events, want 1", before.Name, n, agent.ReasonShutdownRequested)
		}
	}

	accepted, all, err := evictionsByAnswer(sc.env.cluster.AuditLog, sc.ns)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range f.live {
		pod := f.pods[v.Name]
		if accepted[pod] != 0 {
			t.Errorf("LiveMigrate VM %s: its pod %s was evicted (%d accepted evictions): shut down, not migrated", v.Name, pod, accepted[pod])
		}
	}
	for _, v := range append(append([]*kubevirtv1.VirtualMachineInstance{}, f.none...), f.held) {
		if pod := f.pods[v.Name]; accepted[pod] != 1 {
			t.Errorf("None VM %s: %d accepted evictions of its pod %s, want 1", v.Name, accepted[pod], pod)
		}
	}
	t.Logf("eviction requests per pod (any answer): %v; accepted: %v", sortedCounts(all), sortedCounts(accepted))
	return done
}

// waitRestartedElsewhere waits until the VM (runStrategy Always) runs as a new VMI on
// another node than node.
func (sc *scenario) waitRestartedElsewhere(before *kubevirtv1.VirtualMachineInstance, node string) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, before.Name, "a new VMI running elsewhere than "+node, func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.UID != before.UID && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName != node && v.DeletionTimestamp == nil
	}); err != nil {
		sc.t.Errorf("None VM %s was not started again elsewhere: %v", before.Name, err)
	}
}

// evictionsByAnswer counts, from the API server's audit log, the eviction requests per
// pod of namespace: those the API server accepted (201: the pod is deleted), and all.
func evictionsByAnswer(path, namespace string) (accepted, all map[string]int, err error) {
	evs, err := readAudit(path, func(ev auditEvent) bool {
		ref := ev.ObjectRef
		return ref != nil && ref.Resource == "pods" && ref.Subresource == "eviction" && ref.Namespace == namespace && ev.Stage == "ResponseComplete"
	})
	accepted, all = map[string]int{}, map[string]int{}
	for _, ev := range evs {
		all[ev.ObjectRef.Name]++
		if ev.ResponseStatus != nil && ev.ResponseStatus.Code == http.StatusCreated {
			accepted[ev.ObjectRef.Name]++
		}
	}
	return accepted, all, err
}

// kube-apiserver restarted (same port, same etcd) in the middle of a drain of
// LiveMigrate and None VMs: the drain completes, each VM's action is requested once, no
// VM is lost.
func TestFaultAPIServerRestartedMidDrain(t *testing.T) {
	f := startFaultDrain(t)
	down, err := f.sc.env.cluster.RestartAPIServer(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	t.Logf("kube-apiserver answered nothing for %s", down.Round(100*time.Millisecond))
	f.a.waitServing("/readyz", time.Minute)
	t.Logf("the agent ready again %s after the API server", time.Since(back).Round(100*time.Millisecond))
	f.finish(back)
}

// etcd paused (SIGSTOP) for 30 s in the middle of a drain, then resumed: the API server
// cannot write meanwhile; /safe-to-shutdown stays 503; the drain completes, each VM's
// action is requested once, no VM is lost.
func TestFaultEtcdPausedMidDrain(t *testing.T) {
	f := startFaultDrain(t)
	paused, back, unknownAt := f.pauseEtcd(nil)
	if !unknownAt.IsZero() {
		t.Logf("the state reported unknown %s after etcd was paused", unknownAt.Sub(paused).Round(100*time.Millisecond))
	}
	t.Logf("etcd paused for %s", back.Sub(paused).Round(100*time.Millisecond))
	f.a.waitServing("/readyz", time.Minute)
	t.Logf("the agent ready %s after etcd resumed", time.Since(back).Round(100*time.Millisecond))
	f.finish(back)
}

// pauseEtcd pauses etcd for 30 s (SIGSTOP, then SIGCONT), checking meanwhile that
// /safe-to-shutdown never answers 200 and, with extra, whatever else must hold; it
// returns when etcd was paused and resumed, and when the agent first reported the
// state unknown (zero if it never did, which fails the test).
func (f *faultDrain) pauseEtcd(extra func() string) (paused, resumed, unknownAt time.Time) {
	t, c := f.sc.t, f.sc.env.cluster
	t.Helper()
	if err := c.PauseEtcd(); err != nil {
		t.Fatal(err)
	}
	paused = time.Now()
	done := false
	t.Cleanup(func() {
		if !done {
			_ = c.ResumeEtcd()
		}
	})
	f.sc.consistently(30*time.Second, "not safe while etcd is paused", func() (bool, string) {
		code, st := f.a.safeToShutdown("")
		if unknownAt.IsZero() && !st.Ready && strings.Contains(st.Reason, "API server has not answered") {
			unknownAt = time.Now()
		}
		if extra != nil {
			if why := extra(); why != "" {
				return false, why
			}
		}
		return code == http.StatusServiceUnavailable, statusJSON(code, st)
	})
	if unknownAt.IsZero() {
		t.Error("the agent did not report the state unknown while etcd was paused")
	}
	if err := c.ResumeEtcd(); err != nil {
		t.Fatal(err)
	}
	done = true
	return paused, time.Now(), unknownAt
}

// virt-controller and virt-api restarted in the middle of a drain (virt-controller
// runs the evacuations and migrations, virt-api answers the eviction webhook): the
// drain completes, each VM's action is requested once, no VM is lost.
func TestFaultKubeVirtRestartedMidDrain(t *testing.T) {
	f := startFaultDrain(t)
	c := f.sc.env.cluster
	start := time.Now()
	if err := c.RestartVirtController(f.sc.ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("virt-controller leads again %s after its restart began", time.Since(start).Round(100*time.Millisecond))
	start = time.Now()
	if err := c.RestartVirtAPI(f.sc.ctx); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	t.Logf("virt-api serves again %s after its restart began", back.Sub(start).Round(100*time.Millisecond))
	f.finish(back)
}

// apiProxy forwards TCP connections to the API server, for one agent: cut makes the
// API server unreachable from that agent alone (its connections closed, new ones
// closed at once), as a network fault between a node and the control plane does;
// restore ends the fault.
type apiProxy struct {
	t        testing.TB
	target   string
	listener net.Listener
	mu       sync.Mutex
	down     bool
	conns    map[net.Conn]struct{}
}

// startAPIProxy forwards a local port to the API server at host (https://ADDR).
func startAPIProxy(t testing.TB, host string) *apiProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &apiProxy{t: t, target: strings.TrimPrefix(host, "https://"), listener: l, conns: map[net.Conn]struct{}{}}
	t.Cleanup(func() {
		l.Close()
		p.cut()
	})
	go p.serve()
	return p
}

func (p *apiProxy) serve() {
	for {
		in, err := p.listener.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		if !down {
			p.conns[in] = struct{}{}
		}
		p.mu.Unlock()
		if down {
			in.Close()
			continue
		}
		go p.forward(in)
	}
}

func (p *apiProxy) forward(in net.Conn) {
	defer func() {
		p.mu.Lock()
		delete(p.conns, in)
		p.mu.Unlock()
		in.Close()
	}()
	out, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer out.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(out, in); done <- struct{}{} }()
	go func() { _, _ = io.Copy(in, out); done <- struct{}{} }()
	<-done
}

func (p *apiProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		c.Close()
	}
}

func (p *apiProxy) restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = false
}

// kubeconfig writes a copy of the kubeconfig at path that reaches the API server
// through the proxy.
func (p *apiProxy) kubeconfig(path string) string {
	p.t.Helper()
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		p.t.Fatal(err)
	}
	for _, c := range cfg.Clusters {
		c.Server = "https://" + p.listener.Addr().String()
	}
	out := filepath.Join(p.t.TempDir(), "kubeconfig-via-proxy")
	if err := clientcmd.WriteToFile(*cfg, out); err != nil {
		p.t.Fatal(err)
	}
	return out
}

// The API server unreachable from the agent while it holds a host shutdown (the real
// logind): the agent cannot know whether the VMs left are gone, so /safe-to-shutdown
// says the state is unknown (not ready, with the reason) and not safe, /readyz says
// so too, and the lock holds the shutdown until the deadline, not longer; the VMs are
// not touched. Once the API server is reachable again the agent is ready again.
func TestFaultAPIServerUnreachableDuringHeldShutdown(t *testing.T) {
	const timeout = 30 * time.Second
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	slow := sc.pinned("slow", node, liveMigrate, sim.WithMigrationDuration(3*time.Minute))
	stopping := sc.pinned("stopping", node, noneStrategy, sim.WithShutdownDuration(10*time.Second), sim.WithTerminationGracePeriod(60))
	proxy := startAPIProxy(t, sc.env.cluster.RESTConfig.Host)
	env := sc.startLogind(logind.WithInhibitDelayMax(2 * time.Minute))
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout="+timeout.String(), "--kubeconfig="+proxy.kubeconfig(sc.env.cluster.Kubeconfig))

	asked := sc.powerOff(env)
	a.waitStatus(time.Minute, "the drain for the shutdown under way", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		s, p := vmStatus(st, sc.ns, slow.Name), vmStatus(st, sc.ns, stopping.Name)
		return st.Ready && st.Draining && st.Trigger == agent.TriggerShutdown && s != nil && s.State == agent.StateMigrating &&
			p != nil && p.State == agent.StateShuttingDown
	})
	proxy.cut()
	cutAt := time.Now()
	st := a.waitStatus(45*time.Second, "the state reported unknown", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return !st.Ready && strings.Contains(st.Reason, "API server")
	})
	t.Logf("the API server cut off %s after the power-off was asked; reported unknown %s after the cut: %q",
		cutAt.Sub(asked).Round(100*time.Millisecond), time.Since(cutAt).Round(100*time.Millisecond), st.Reason)
	if code, body := a.get("/readyz"); code != http.StatusServiceUnavailable {
		t.Errorf("/readyz with the API server unreachable: %d %s, want 503", code, body)
	}
	deadline := asked.Add(timeout)
	sc.consistently(time.Until(deadline.Add(-2*time.Second)), "the shutdown held, the state unknown", func() (bool, string) {
		code, st := a.safeToShutdown("")
		if at, ok, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || ok {
			return false, fmt.Sprintf("poweroff job started at %s (%v)", at, err)
		}
		return code == http.StatusServiceUnavailable && !st.Ready, statusJSON(code, st)
	})
	started := sc.waitPowerOffJob(env, asked, time.Minute)
	held := started.Sub(asked)
	t.Logf("shutdown held %s with --shutdown-timeout=%s and the API server unreachable", held.Round(100*time.Millisecond), timeout)
	if held < timeout || held > timeout+15*time.Second {
		t.Errorf("the shutdown was held %s, want about --shutdown-timeout (%s)", held, timeout)
	}

	proxy.restore()
	back := time.Now()
	a.waitServing("/readyz", 2*time.Minute)
	t.Logf("the agent ready again %s after the API server was reachable again", time.Since(back).Round(100*time.Millisecond))
	if after := sc.vmi(slow.Name); after == nil || after.UID != slow.UID {
		t.Errorf("the LiveMigrate VM was not kept: %s", describeVMI(after))
	}
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", slow.Name, agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on the LiveMigrate VM", n, agent.ReasonShutdownRequested)
	}
}

// The faults of the drain above (a, b, c), one after another, while a host shutdown
// is held (issue 13.2: each mid-held-shutdown): a power-off asked through the real
// logind starts the drain (the agent's lock on logind's bus, --shutdown-timeout 15m), and
// while it is under way (the held VM's eviction refused by its budget until the end)
// kube-apiserver is restarted, etcd is paused for 30 s, then virt-controller and virt-api
// are restarted. After each fault logind has started no power-off (the lock still
// holds) and the agent is ready again; then the budget is lifted, the drain completes
// with each VM's action requested once and no VM lost, and the lock is released once
// the node is safe, long before the deadline.
func TestFaultsDuringHeldShutdown(t *testing.T) {
	const timeout = 15 * time.Minute
	f := newFaultVMs(t)
	sc, c := f.sc, f.sc.env.cluster
	env := sc.startLogind(logind.WithInhibitDelayMax(timeout))
	// The agent's own taint key, as in the drains above: KubeVirt's evacuation controller
	// does not act on it, so that each VM's action is the agent's to request.
	f.a = sc.startShutdownAgent(f.node, env, "--shutdown-timeout="+timeout.String(), "--drain-taint-key="+agentOnlyKey)
	asked := sc.powerOff(env)
	f.start = asked
	f.underWay(agent.TriggerShutdown)
	// poweredOff says when logind started the power-off job, if it did (or could not tell).
	poweredOff := func() string {
		if at, ok, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || ok {
			return fmt.Sprintf("the power-off job started at %s (%v)", at, err)
		}
		return ""
	}
	held := func(after string) {
		t.Helper()
		if why := poweredOff(); why != "" {
			t.Fatalf("%s: %s: the lock did not hold", after, why)
		}
		if code, st := f.a.safeToShutdown(""); code != http.StatusServiceUnavailable || !st.Draining || vmStatus(st, sc.ns, f.held.Name) == nil {
			t.Fatalf("%s: want the drain still under way, the held VM left: %s", after, statusJSON(code, st))
		}
	}

	// a. kube-apiserver restarted.
	down, err := c.RestartAPIServer(sc.ctx)
	if err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	f.a.waitServing("/readyz", time.Minute)
	t.Logf("a: kube-apiserver answered nothing for %s; the agent ready again %s after", down.Round(100*time.Millisecond), time.Since(back).Round(100*time.Millisecond))
	held("after the API server's restart")

	// b. etcd paused for 30 s: the state unknown, never safe, the lock held.
	paused, back, unknownAt := f.pauseEtcd(poweredOff)
	f.a.waitServing("/readyz", time.Minute)
	t.Logf("b: etcd paused %s, the state unknown %s after the pause; the agent ready again %s after etcd resumed",
		back.Sub(paused).Round(100*time.Millisecond), unknownAt.Sub(paused).Round(100*time.Millisecond), time.Since(back).Round(100*time.Millisecond))
	held("after etcd's pause")

	// c. virt-controller, then virt-api restarted.
	start := time.Now()
	if err := c.RestartVirtController(sc.ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.RestartVirtAPI(sc.ctx); err != nil {
		t.Fatal(err)
	}
	back = time.Now()
	t.Logf("c: virt-controller and virt-api serve again %s after their restarts began", back.Sub(start).Round(100*time.Millisecond))
	held("after KubeVirt's restarts")

	f.finish(back)
	started := sc.waitPowerOffJob(env, asked, time.Minute)
	t.Logf("the power-off held %s in all (--shutdown-timeout %s); its job started %s after the test saw the node safe",
		started.Sub(asked).Round(100*time.Millisecond), timeout, started.Sub(f.safeAt).Round(100*time.Millisecond))
	if started.Sub(asked) >= timeout {
		t.Errorf("the power-off went at the deadline, not when the node was safe")
	}
}
