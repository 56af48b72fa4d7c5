package e2e

// node-agent's shutdown path end to end: a real systemd-logind on a private system bus
// (integration/logind, one per test) announces a power-off over D-Bus; the agent, a
// real node-agent process holding a logind delay lock, takes its node out of service
// on the real test cluster, drains it and releases its lock; logind then starts the
// poweroff job, which the systemd1 stub records (StartUnit) and never carries out.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
	"github.com/node-agent/node-agent/systemd"
)

const (
	// powerOffUnit is the unit logind starts for PowerOff once no delay lock holds it.
	powerOffUnit = "poweroff.target"
	// Messages of the agent's log the tests take times from.
	msgReleased    = "released the shutdown inhibitor lock"
	msgLockTaken   = "holding the logind shutdown inhibitor lock"
	msgShutdownRun = "host shutdown started"
	// logClockSlack: the Guard logs the release just after closing the lock's file, so
	// logind may start the poweroff job a little before the logged time.
	logClockSlack = 50 * time.Millisecond
	// watchSlack: the agent and the test see the last VM leave through two watches of
	// the same API server; either may hear of it first (by a few milliseconds, as
	// measured). The drains the tests time take a second or more, so a lock that did not
	// hold would miss by far more than this.
	watchSlack = 300 * time.Millisecond
)

// startLogind starts a private system bus with a real systemd-logind for the test.
func (sc *scenario) startLogind(opts ...logind.Option) *logind.Env {
	sc.t.Helper()
	env, err := logind.Start(sc.ctx, sc.t, opts...)
	if err != nil {
		sc.t.Fatalf("starting dbus-daemon and systemd-logind: %v", err)
	}
	return env
}

// startShutdownAgent runs the agent for node with its inhibitor lock on env's bus and
// JSON logs (the tests read times from them), and waits until logind lists its lock.
// Without --logind-dropin-dir in flags the agent writes no logind configuration (its
// default is the host's own /etc/systemd/logind.conf.d).
func (sc *scenario) startShutdownAgent(node string, env *logind.Env, flags ...string) *agentProc {
	sc.t.Helper()
	args := []string{"--shutdown-inhibitor=true", "--log-format=json"}
	if !hasFlag(flags, "--logind-dropin-dir") {
		args = append(args, "--logind-dropin-dir=")
	}
	a := sc.startAgentEnv(node, []string{"DBUS_SYSTEM_BUS_ADDRESS=" + env.Address}, append(args, flags...)...)
	sc.waitLock(env, a)
	return a
}

// agentLocks are the locks logind lists for the agent's process.
func agentLocks(list []logind.Inhibitor, a *agentProc) []logind.Inhibitor {
	var out []logind.Inhibitor
	for _, i := range list {
		if i.Who == "node-agent" && int(i.PID) == a.cmd.Process.Pid {
			out = append(out, i)
		}
	}
	return out
}

// waitLock waits until logind lists exactly one lock of the agent: a delay lock on
// shutdown.
func (sc *scenario) waitLock(env *logind.Env, a *agentProc) {
	sc.t.Helper()
	sc.eventually(time.Minute, "logind to list the agent's delay lock", func() (bool, string) {
		list, err := env.Inhibitors(sc.ctx)
		if err != nil {
			return false, err.Error()
		}
		ours := agentLocks(list, a)
		return len(ours) == 1 && ours[0].Mode == "delay" && ours[0].What == "shutdown", fmt.Sprintf("%+v", list)
	})
}

// waitInhibitDelayMax waits until logind reports InhibitDelayMaxSec d.
func (sc *scenario) waitInhibitDelayMax(env *logind.Env, d time.Duration) {
	sc.t.Helper()
	sc.eventually(30*time.Second, fmt.Sprintf("logind's InhibitDelayMaxSec to be %v", d), func() (bool, string) {
		got, err := env.InhibitDelayMax(sc.ctx)
		if err != nil {
			return false, err.Error()
		}
		return got == d, got.String()
	})
}

// waitPowerOffJob waits until logind starts the poweroff job (asked at or after since).
func (sc *scenario) waitPowerOffJob(env *logind.Env, since time.Time, timeout time.Duration) time.Time {
	sc.t.Helper()
	ctx, cancel := context.WithTimeout(sc.ctx, timeout)
	defer cancel()
	at, err := env.WaitStartUnit(ctx, powerOffUnit, since)
	if err != nil {
		sc.t.Fatalf("logind did not start %s: %v", powerOffUnit, err)
	}
	return at
}

// powerOff asks logind to power off, as `systemctl poweroff` does, and returns when.
func (sc *scenario) powerOff(env *logind.Env) time.Time {
	sc.t.Helper()
	asked := time.Now()
	if err := env.PowerOff(sc.ctx); err != nil {
		sc.t.Fatalf("logind PowerOff: %v", err)
	}
	return asked
}

// logEntry is one line of the agent's JSON log.
type logEntry struct {
	Time time.Time `json:"time"`
	Msg  string    `json:"msg"`
}

// logEntries are the entries of a JSON log file whose message contains msg.
func logEntries(path, msg string) []logEntry {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []logEntry
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64*1024), 1024*1024)
	for s.Scan() {
		var e logEntry
		if json.Unmarshal(s.Bytes(), &e) == nil && strings.Contains(e.Msg, msg) {
			out = append(out, e)
		}
	}
	return out
}

// waitLogged waits until the agent has logged msg at least n times, and returns the
// time of the n-th entry.
func (a *agentProc) waitLogged(msg string, n int) time.Time {
	a.sc.t.Helper()
	var at time.Time
	a.sc.eventually(time.Minute, fmt.Sprintf("the agent to log %q %d times", msg, n), func() (bool, string) {
		es := logEntries(a.logPath, msg)
		if len(es) < n {
			return false, fmt.Sprintf("%d times", len(es))
		}
		at = es[n-1].Time
		return true, ""
	})
	return at
}

// metric reads a gauge from the agent's /metrics: the first sample of that name,
// whatever its labels (every agent metric carries the node label).
func (a *agentProc) metric(name string) (float64, bool) {
	code, body := a.get("/metrics")
	if code != http.StatusOK {
		return 0, false
	}
	for _, line := range strings.Split(body, "\n") {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		fields := strings.Fields(rest[strings.LastIndex(rest, "}")+1:])
		if len(fields) == 0 {
			return 0, false
		}
		f, err := strconv.ParseFloat(fields[0], 64)
		return f, err == nil
	}
	return 0, false
}

// vmWatch follows from the cluster whether a VM is left on a node, counted as the
// agent counts them: VMIs whose status.nodeName is the node and whose phase is not
// final, and virt-launcher pods bound there that have not terminated.
type vmWatch struct {
	node string
	vmis cache.SharedIndexInformer
	pods cache.SharedIndexInformer

	mu    sync.Mutex
	left  int
	empty time.Time // when the node was last seen becoming empty; zero while a VM is on it
	// lastLeft is the resourceVersion of the newest write seen that took a VM off the
	// node (a VMI handed to another node or final, a virt-launcher pod terminated or
	// deleted): once the node is empty, the write that emptied it.
	lastLeft uint64
}

// watchVMs starts a vmWatch for a node of the scenario's namespace.
func (sc *scenario) watchVMs(node string) *vmWatch {
	sc.t.Helper()
	ctx, cancel := context.WithCancel(sc.ctx)
	sc.t.Cleanup(cancel)
	factory := informers.NewSharedInformerFactoryWithOptions(sc.kube(), 0, informers.WithNamespace(sc.ns))
	w := &vmWatch{
		node: node,
		pods: factory.Core().V1().Pods().Informer(),
		vmis: cache.NewSharedIndexInformer(
			cache.NewFilteredListWatchFromClient(sc.env.cluster.KubeVirt, nodeinfo.ResourceVMIs, sc.ns, func(*metav1.ListOptions) {}),
			&kubevirtv1.VirtualMachineInstance{}, 0, cache.Indexers{}),
		left: -1,
	}
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { w.recount() },
		UpdateFunc: func(old, cur any) { w.left1(old, cur, cur); w.recount() },
		DeleteFunc: func(obj any) {
			// A tombstone (the watch missed the delete) carries no delete's
			// resourceVersion: no departure is recorded for it.
			if _, tombstone := obj.(cache.DeletedFinalStateUnknown); !tombstone {
				w.left1(obj, nil, obj)
			}
			w.recount()
		},
	}
	for _, inf := range []cache.SharedIndexInformer{w.pods, w.vmis} {
		if _, err := inf.AddEventHandler(handler); err != nil {
			sc.t.Fatal(err)
		}
	}
	factory.Start(ctx.Done())
	go w.vmis.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), w.pods.HasSynced, w.vmis.HasSynced) {
		sc.t.Fatalf("syncing the watch of node %s", node)
	}
	w.recount()
	return w
}

// on says whether obj (a VMI or a pod; nil for none) counts as a VM on the node.
func (w *vmWatch) on(obj any) bool {
	switch o := obj.(type) {
	case *kubevirtv1.VirtualMachineInstance:
		return o.Status.NodeName == w.node && !o.IsFinal()
	case *corev1.Pod:
		return o.Spec.NodeName == w.node && o.Labels[kubevirtv1.AppLabel] == "virt-launcher" &&
			o.Status.Phase != corev1.PodSucceeded && o.Status.Phase != corev1.PodFailed
	}
	return false
}

// left1 records a write that took a VM off the node: old counted, cur (nil once
// deleted) does not; rv carries the write's resourceVersion (a watch's delete event
// carries the object with the delete's resourceVersion).
func (w *vmWatch) left1(old, cur, rv any) {
	if !w.on(old) || w.on(cur) {
		return
	}
	m, err := meta.Accessor(rv)
	if err != nil {
		return
	}
	v, err := strconv.ParseUint(m.GetResourceVersion(), 10, 64)
	if err != nil {
		return
	}
	w.mu.Lock()
	w.lastLeft = max(w.lastLeft, v)
	w.mu.Unlock()
}

func (w *vmWatch) recount() {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, obj := range w.vmis.GetStore().List() {
		if w.on(obj) {
			n++
		}
	}
	for _, obj := range w.pods.GetStore().List() {
		if w.on(obj) {
			n++
		}
	}
	switch {
	case n > 0:
		w.empty = time.Time{}
	case w.empty.IsZero():
		w.empty = time.Now()
	}
	w.left = n
}

// emptySince is when the node was last seen becoming empty; zero while a VM is on it.
func (w *vmWatch) emptySince() time.Time {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.empty
}

// lastLeftRV is the resourceVersion of the newest write seen that took a VM off the
// node; 0 if none did.
func (w *vmWatch) lastLeftRV() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastLeft
}

// checkReleasedAfterLastVM checks, once vms has seen the node empty, that the write
// that took the last VM off the node came before the ShutdownReleased event the agent
// wrote after releasing the shutdown asked for at asked: the API server's order of
// writes, whoever hears of them first (see waitReleasedWhenEmpty). It returns both
// resourceVersions, for the log.
func (sc *scenario) checkReleasedAfterLastVM(vms *vmWatch, asked time.Time) string {
	sc.t.Helper()
	leftRV := vms.lastLeftRV()
	ev, evRV := sc.releasedEvent(vms.node, asked)
	if leftRV >= evRV {
		sc.t.Errorf("the write that took the last VM off %s (resourceVersion %d) came after the %s event (%d) the agent wrote once it released the lock: the lock was released with a VM on the node",
			vms.node, leftRV, ev.Reason, evRV)
	}
	return fmt.Sprintf("resourceVersion of the last VM's leaving %d, of the %s event %d", leftRV, ev.Reason, evRV)
}

// releasedEvent waits for the agent's ShutdownReleased event on node for the shutdown
// asked for at asked, and returns it with its resourceVersion.
func (sc *scenario) releasedEvent(node string, asked time.Time) (corev1.Event, uint64) {
	sc.t.Helper()
	var ev corev1.Event
	var rv uint64
	sc.eventually(time.Minute, "a "+agent.ReasonShutdownReleased+" event on "+node, func() (bool, string) {
		for _, e := range sc.events(metav1.NamespaceDefault, "Node", node) {
			if e.Reason != agent.ReasonShutdownReleased || e.CreationTimestamp.Time.Before(asked.Truncate(time.Second)) {
				continue
			}
			v, err := strconv.ParseUint(e.ResourceVersion, 10, 64)
			if err != nil {
				sc.t.Fatalf("event %s: resourceVersion %q: %v", e.Name, e.ResourceVersion, err)
			}
			if v > rv {
				ev, rv = e, v
			}
		}
		return rv > 0, "none yet"
	})
	return ev, rv
}

// waitEmpty waits until the watch has seen the node empty (the agent's own watch may
// hear of it first) and returns when it did.
func (w *vmWatch) waitEmpty(sc *scenario, timeout time.Duration) time.Time {
	sc.t.Helper()
	var at time.Time
	sc.eventually(timeout, "the test's watch to see no VM left on "+w.node, func() (bool, string) {
		w.mu.Lock()
		defer w.mu.Unlock()
		at = w.empty
		return !at.IsZero(), fmt.Sprintf("%d VMs", w.left)
	})
	return at
}

// ownershipOf reads the agent's ownership annotation on a node.
func ownershipOf(n *corev1.Node) (agent.Ownership, bool, error) {
	var own agent.Ownership
	raw, ok := n.Annotations[agent.AnnotationOwned]
	if !ok {
		return own, false, nil
	}
	err := json.Unmarshal([]byte(raw), &own)
	return own, true, err
}

// waitOutOfService waits until the agent has tainted and cordoned node, recording
// both as its own with the boot ID.
func (sc *scenario) waitOutOfService(node, bootID string) {
	sc.t.Helper()
	sc.eventually(time.Minute, "node "+node+" to be tainted and cordoned by the agent", func() (bool, string) {
		n := sc.node(node)
		own, ok, err := ownershipOf(n)
		msg := fmt.Sprintf("taints %v, unschedulable %v, %s=%q", n.Spec.Taints, n.Spec.Unschedulable, agent.AnnotationOwned, n.Annotations[agent.AnnotationOwned])
		return hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && n.Spec.Unschedulable && ok && err == nil &&
			own.TaintKey == nodeinfo.DefaultDrainTaintKey && own.Cordoned && own.BootID == bootID && own.Reason == agent.TriggerShutdown, msg
	})
}

// waitReleasedWhenEmpty waits until logind starts the poweroff job asked for at asked,
// and checks that the process holding the lock (a: an agent, or a lock holder) released
// it after the last VM left, and just after, and that logind went ahead just after the
// release, not before.
//
// "After the last VM left" is judged by the API server's order of writes, not by when
// the test's watch heard of them: the write that took the last VM off the node must
// come before the ShutdownReleased event the agent writes once the lock is released.
// (The test process, which runs the simulators of every parallel test, may hear of a
// write hundreds of milliseconds after the agent does; the order of writes does not
// depend on who listens. The test cluster has one etcd, so a resourceVersion is its
// revision, and orders writes across resources.)
func (sc *scenario) waitReleasedWhenEmpty(env *logind.Env, a *agentProc, vms *vmWatch, asked time.Time, timeout time.Duration) {
	sc.t.Helper()
	started := sc.waitPowerOffJob(env, asked, timeout)
	released := a.waitLogged(msgReleased, 1)
	gone := vms.waitEmpty(sc, 30*time.Second)
	order := sc.checkReleasedAfterLastVM(vms, asked)
	sc.t.Logf("PowerOff -> last VM gone %v; last VM gone -> lock released %v (as the test's watch heard it); lock released -> poweroff job %v; %s",
		gone.Sub(asked).Round(time.Millisecond), released.Sub(gone).Round(time.Millisecond), started.Sub(released).Round(time.Millisecond), order)
	if started.Before(released.Add(-logClockSlack)) {
		sc.t.Errorf("logind started the poweroff job %v before the lock was released", released.Sub(started))
	}
	if d := released.Sub(gone); d > 5*time.Second {
		sc.t.Errorf("the lock was released %v after the last VM left, want within moments", d)
	}
	if d := started.Sub(released); d > 2*time.Second {
		sc.t.Errorf("logind started the poweroff job %v after the release, want within moments", d)
	}
}

// waitGivenBack waits until the agent has removed its taint, cordon and records from
// node, and checks that its NodeReenabled event says why (cancelled, rebooted).
func (sc *scenario) waitGivenBack(node, why string) {
	sc.t.Helper()
	sc.eventually(time.Minute, "the agent's taint, cordon and records on "+node+" to be removed", func() (bool, string) {
		n := sc.node(node)
		_, owned := n.Annotations[agent.AnnotationOwned]
		_, draining := n.Annotations[agent.AnnotationDrain]
		return !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !n.Spec.Unschedulable && !owned && !draining,
			fmt.Sprintf("taints %v, unschedulable %v, annotations %v", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	})
	if ev := sc.nodeEvent(node, agent.ReasonNodeReenabled); !strings.Contains(ev.Message, why) {
		sc.t.Errorf("%s event %q does not say %q", ev.Reason, ev.Message, why)
	}
}

// A power-off through the real logind: the agent taints and cordons its node as its
// own, drains it (the LiveMigrate VM migrates, the None VM is shut down and restarts
// elsewhere), and logind starts the poweroff job only once the lock is released, just
// after the last VM left.
func TestShutdownPowerOffDrainsThenReleases(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	always := sc.pinned("always", node, noneStrategy)
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=3m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 3*time.Minute)
	vms := sc.watchVMs(node)
	bootID := sc.node(node).Status.NodeInfo.BootID
	a.checkMetrics(map[string]float64{
		`node_agent_inhibitor_lock_held{node="` + node + `"}`:        1,
		`node_agent_logind_connected{node="` + node + `"}`:           1,
		`node_agent_shutdown_delay_max_seconds{node="` + node + `"}`: 180,
	})

	asked := sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	sc.waitMigrated(migrating, other)
	sc.waitRestarted(always, other)
	sc.waitReleasedWhenEmpty(env, a, vms, asked, 3*time.Minute)
	if ev := sc.nodeEvent(node, agent.ReasonShutdownReleased); ev.Type != corev1.EventTypeNormal {
		t.Errorf("%s event %s: %q, want Normal", ev.Reason, ev.Type, ev.Message)
	}
	sc.nodeEvent(node, agent.ReasonShutdownDelayed)
	a.checkMetrics(map[string]float64{
		`node_agent_drains_started_total{node="` + node + `",trigger="shutdown"}`: 1,
		`node_agent_shutdown_releases_total{node="` + node + `",outcome="safe"}`:  1,
		`node_agent_shutdown_delay_seconds_count{node="` + node + `"}`:            1,
		`node_agent_safe_to_shutdown{node="` + node + `"}`:                        1,
	})
	if !hasEvent(sc.events(sc.ns, "VirtualMachineInstance", "always"), agent.ReasonShutdownRequested) {
		t.Errorf("no %s event on the None VM", agent.ReasonShutdownRequested)
	}
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "migrating", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on the LiveMigrate VM", n, agent.ReasonShutdownRequested)
	}
}

// The deadline: a LiveMigrate VM that cannot migrate holds the shutdown only until
// --shutdown-timeout (logind would wait a minute), is never shut down, and the Warning
// ShutdownReleased event on the Node names it.
func TestShutdownDeadlineReleasesWithABlockedVM(t *testing.T) {
	const timeout = 5 * time.Second
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	blocked := sc.pinned("blocked", node, liveMigrate, notMigratable)
	env := sc.startLogind(logind.WithInhibitDelayMax(time.Minute))
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout="+timeout.String())

	asked := sc.powerOff(env)
	started := sc.waitPowerOffJob(env, asked, time.Minute)
	held := started.Sub(asked)
	t.Logf("shutdown held %v with --shutdown-timeout=%v and logind's InhibitDelayMaxSec=1m", held.Round(time.Millisecond), timeout)
	if held < timeout || held > timeout+15*time.Second {
		t.Errorf("the shutdown was held %v, want about --shutdown-timeout (%v)", held, timeout)
	}
	ev := sc.nodeEvent(node, agent.ReasonShutdownReleased)
	want := sc.ns + "/blocked (" + string(kubevirtv1.EvictionStrategyLiveMigrate) + ", " + string(agent.StateBlocked) + ")"
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, want) {
		t.Errorf("%s event %s %q, want a Warning naming %s", ev.Reason, ev.Type, ev.Message, want)
	}
	if after := sc.vmi("blocked"); after == nil || after.UID != blocked.UID || after.Status.Phase != kubevirtv1.Running ||
		after.Status.NodeName != node || after.DeletionTimestamp != nil {
		t.Errorf("the blocked LiveMigrate VM did not stay running where it was: %s", describeVMI(after))
	}
	if p := sc.launcherPod(blocked, node); p.DeletionTimestamp != nil {
		t.Errorf("the blocked VM's virt-launcher pod is being deleted")
	}
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "blocked", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on a LiveMigrate VM", n, agent.ReasonShutdownRequested)
	}
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "blocked", agent.ReasonBlocked, time.Minute)
	code, st := a.safeToShutdown("")
	if v := vmStatus(st, sc.ns, "blocked"); code != http.StatusServiceUnavailable || v == nil || v.State != agent.StateBlocked {
		t.Errorf("/safe-to-shutdown after the deadline: %s", statusJSON(code, st))
	}
}

func describeVMI(v *kubevirtv1.VirtualMachineInstance) string {
	if v == nil {
		return "no VMI"
	}
	return fmt.Sprintf("uid %s phase %s node %s deleting %v", v.UID, v.Status.Phase, v.Status.NodeName, v.DeletionTimestamp != nil)
}

// A cancelled shutdown: systemd cancels the poweroff job, logind sends
// PrepareForShutdown(false), and the agent removes its own taint and cordon, says so
// in an event, withdraws the drain and holds the lock again.
func TestShutdownCancelledReenablesTheNode(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=2m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 2*time.Minute)
	bootID := sc.node(node).Status.NodeInfo.BootID

	asked := sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	sc.waitMigrated(migrating, other)
	sc.waitPowerOffJob(env, asked, 2*time.Minute)
	if n, err := env.CancelJobs(sc.ctx); err != nil || n < 1 {
		t.Fatalf("cancelling the poweroff job: %d jobs, %v", n, err)
	}
	sc.waitGivenBack(node, "cancelled")
	a.waitLogged(msgLockTaken, 2)
	sc.waitLock(env, a)
	a.waitStatus(30*time.Second, "the agent to stop draining", http.StatusOK, func(st agent.NodeStatus) bool { return !st.Draining })
	if code, body := a.get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after the cancelled shutdown: %d %s", code, body)
	}
}

// logind restarted (with and without its state) and the system bus restarted while
// the agent holds its lock: each time the agent takes the lock again, and that lock
// holds the next power-off until the node is empty.
func TestShutdownLockHeldAgainAfterLogindAndBusRestarts(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	bare := sc.createVMI("bare", noneStrategy, onNode(node), sim.WithShutdownDuration(3*time.Second), sim.WithTerminationGracePeriod(30))
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=2m", "--logind-dropin-dir="+env.DropInDir)
	taken := len(logEntries(a.logPath, msgLockTaken))
	for _, restart := range []struct {
		what string
		do   func(context.Context) error
	}{
		{"logind restarted without its state", func(ctx context.Context) error { return env.RestartLogind(ctx, false) }},
		{"logind restarted with its state", func(ctx context.Context) error { return env.RestartLogind(ctx, true) }},
		{"the system bus restarted", env.RestartBus},
	} {
		start := time.Now()
		if err := restart.do(sc.ctx); err != nil {
			t.Fatalf("%s: %v", restart.what, err)
		}
		taken++
		a.waitLogged(msgLockTaken, taken)
		sc.waitLock(env, a)
		sc.eventually(30*time.Second, "/readyz after "+restart.what, func() (bool, string) {
			code, body := a.get("/readyz")
			return code == http.StatusOK, body
		})
		t.Logf("%s: the lock is held again, the agent ready, %s after the restart began", restart.what, time.Since(start).Round(time.Millisecond))
	}

	vms := sc.watchVMs(node)
	bootID := sc.node(node).Status.NodeInfo.BootID
	asked := sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	sc.waitStoppedForGood("bare", bare)
	started := sc.waitPowerOffJob(env, asked, 2*time.Minute)
	gone := vms.waitEmpty(sc, 30*time.Second)
	t.Logf("the VM left %v after PowerOff, logind started the poweroff job %v after that (as the test's watch heard it); %s",
		gone.Sub(asked).Round(time.Millisecond), started.Sub(gone).Round(time.Millisecond), sc.checkReleasedAfterLastVM(vms, asked))
}

// InhibitDelayMaxSec: the agent raises logind's value to --shutdown-timeout through its
// drop-in and a reload, and reads it back from the real logind; it never lowers a larger
// value set by someone else, and when a later drop-in keeps the value smaller it uses
// logind's value.
func TestShutdownRaisesInhibitDelayMaxSec(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	env := sc.startLogind()
	if d, err := env.InhibitDelayMax(sc.ctx); err != nil || d != 5*time.Second {
		t.Fatalf("logind's InhibitDelayMaxSec before the agent: %v, %v; want its default 5s", d, err)
	}
	dropIn := "--logind-dropin-dir=" + env.DropInDir
	waitDelayMetric := func(a *agentProc, want time.Duration) {
		t.Helper()
		sc.eventually(30*time.Second, fmt.Sprintf("node_agent_shutdown_delay_max_seconds %v", want.Seconds()), func() (bool, string) {
			v, ok := a.metric("node_agent_shutdown_delay_max_seconds")
			return ok && v == want.Seconds(), strconv.FormatFloat(v, 'f', -1, 64)
		})
	}

	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=90s", dropIn)
	sc.waitInhibitDelayMax(env, 90*time.Second)
	waitDelayMetric(a, 90*time.Second)
	data, err := os.ReadFile(filepath.Join(env.DropInDir, systemd.DropInName))
	if err != nil || !strings.Contains(string(data), "InhibitDelayMaxSec=90\n") {
		t.Errorf("the agent's drop-in %s: %v\n%s", systemd.DropInName, err, data)
	}
	a.stop()

	// The kubelet's 99-kubelet.conf asks for more: the agent leaves it alone.
	kubelet := filepath.Join(env.DropInDir, "99-kubelet.conf")
	if err := os.WriteFile(kubelet, []byte("[Login]\nInhibitDelayMaxSec=300\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := env.ReloadLogind(sc.ctx); err != nil {
		t.Fatal(err)
	}
	sc.waitInhibitDelayMax(env, 300*time.Second)
	a = sc.startShutdownAgent(node, env, "--shutdown-timeout=90s", dropIn)
	waitDelayMetric(a, 90*time.Second)
	if d, err := env.InhibitDelayMax(sc.ctx); err != nil || d != 300*time.Second {
		t.Errorf("logind's InhibitDelayMaxSec with the agent wanting less: %v, %v; want 300s kept", d, err)
	}
	a.stop()

	// A later drop-in asks for less: logind's smaller value is what the agent can use.
	if err := os.WriteFile(kubelet, []byte("[Login]\nInhibitDelayMaxSec=20\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := env.ReloadLogind(sc.ctx); err != nil {
		t.Fatal(err)
	}
	sc.waitInhibitDelayMax(env, 20*time.Second)
	a = sc.startShutdownAgent(node, env, "--shutdown-timeout=90s", dropIn)
	waitDelayMetric(a, 20*time.Second)
	a.waitLogged("shutdown can be held for less than wanted", 1)
}

// A reboot (the node reports a new boot ID; the agent starts again with a fresh
// logind, as after a real boot): the agent removes the taint and cordon it added for
// the shutdown, and leaves what an operator had set before it.
func TestShutdownRebootReenablesOnlyTheAgentsOwn(t *testing.T) {
	const operatorKey = "example.com/maintenance"
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	env := sc.startLogind()
	flags := []string{"--shutdown-timeout=1m", "--logind-dropin-dir=" + env.DropInDir}
	reboot := func(a *agentProc) *agentProc {
		t.Helper()
		a.kill()
		if err := sc.env.sim.Reboot(sc.ctx, node); err != nil {
			t.Fatal(err)
		}
		if err := env.RestartLogind(sc.ctx, false); err != nil {
			t.Fatal(err)
		}
		return sc.startShutdownAgent(node, env, flags...)
	}

	// The operator's own taint (another key) is there before the shutdown.
	sc.taint(node, operatorKey)
	a := sc.startShutdownAgent(node, env, flags...)
	oldBoot := sc.node(node).Status.NodeInfo.BootID
	asked := sc.powerOff(env)
	sc.waitOutOfService(node, oldBoot)
	sc.waitPowerOffJob(env, asked, time.Minute)

	a = reboot(a)
	if newBoot := sc.node(node).Status.NodeInfo.BootID; newBoot == oldBoot {
		t.Fatalf("the simulated reboot kept boot ID %s", oldBoot)
	}
	sc.eventually(time.Minute, "the agent to remove its own taint and cordon after the reboot", func() (bool, string) {
		n := sc.node(node)
		_, owned := n.Annotations[agent.AnnotationOwned]
		return !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !n.Spec.Unschedulable && !owned,
			fmt.Sprintf("taints %v, unschedulable %v, annotations %v", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	})
	if ev := sc.nodeEvent(node, agent.ReasonNodeReenabled); !strings.Contains(ev.Message, "rebooted") {
		t.Errorf("%s event %q does not say the node rebooted", ev.Reason, ev.Message)
	}
	if !hasTaintKey(sc.node(node), operatorKey) {
		t.Errorf("the operator's taint %s was removed", operatorKey)
	}
	a.waitStatus(30*time.Second, "the agent not draining after the reboot", http.StatusOK, func(st agent.NodeStatus) bool { return !st.Draining })

	// Now the operator cordons the node and puts the drain taint on it before the
	// shutdown: the agent adds nothing, so after the next reboot both stay.
	sc.untaint(node, operatorKey)
	sc.cordon(node, true)
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitStatus(30*time.Second, "the operator's drain", http.StatusOK, func(st agent.NodeStatus) bool {
		return st.Draining && st.Trigger == agent.TriggerTaint
	})
	reenabled := sc.eventCount(metav1.NamespaceDefault, "Node", node, agent.ReasonNodeReenabled)
	oldBoot = sc.node(node).Status.NodeInfo.BootID
	asked = sc.powerOff(env)
	if held := sc.waitPowerOffJob(env, asked, 2*time.Minute).Sub(asked); held > 10*time.Second {
		t.Errorf("the shutdown of a node with no VM was held %v, want it released at once", held)
	}
	if _, owned, _ := ownershipOf(sc.node(node)); owned {
		t.Errorf("the agent recorded as its own what the operator had set: %s", sc.node(node).Annotations[agent.AnnotationOwned])
	}
	a = reboot(a)
	a.waitStatus(30*time.Second, "the agent to carry on with the operator's drain after the reboot", http.StatusOK, func(st agent.NodeStatus) bool {
		return st.Draining && st.Trigger == agent.TriggerTaint
	})
	n := sc.node(node)
	if n.Status.NodeInfo.BootID == oldBoot || !n.Spec.Unschedulable || !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("after the reboot: boot ID %s (was %s), unschedulable %v, taints %v; want the operator's cordon and taint kept",
			n.Status.NodeInfo.BootID, oldBoot, n.Spec.Unschedulable, n.Spec.Taints)
	}
	if got := sc.eventCount(metav1.NamespaceDefault, "Node", node, agent.ReasonNodeReenabled); got != reenabled {
		t.Errorf("%d %s events, want still %d: nothing of the agent's was left to remove", got, agent.ReasonNodeReenabled, reenabled)
	}
}

// /safe-to-shutdown during the shutdown's drain: each VM left with its strategy and
// state; ?wait= returns as soon as the node is safe; a malformed wait gets 400.
func TestShutdownSafeToShutdownDuringTheDrain(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	slow := sc.pinned("slow", node, liveMigrate, sim.WithMigrationDuration(8*time.Second))
	stopping := sc.pinned("stopping", node, noneStrategy, sim.WithShutdownDuration(5*time.Second), sim.WithTerminationGracePeriod(30))
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=3m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 3*time.Minute)
	vms := sc.watchVMs(node)

	asked := sc.powerOff(env)
	st := a.waitStatus(time.Minute, "both VMs listed as leaving", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		s, p := vmStatus(st, sc.ns, "slow"), vmStatus(st, sc.ns, "stopping")
		return st.Draining && st.Trigger == agent.TriggerShutdown && s != nil && s.State == agent.StateMigrating &&
			p != nil && p.State == agent.StateShuttingDown
	})
	for name, strategy := range map[string]kubevirtv1.EvictionStrategy{"slow": kubevirtv1.EvictionStrategyLiveMigrate, "stopping": kubevirtv1.EvictionStrategyNone} {
		if v := vmStatus(st, sc.ns, name); v.Strategy != string(strategy) || v.Since.IsZero() {
			t.Errorf("VM %s listed as %+v, want strategy %s and a since", name, *v, strategy)
		}
	}
	for _, bad := range []string{"soon", "-5s", "2h", "10"} {
		if code, body := a.get("/safe-to-shutdown?wait=" + bad); code != http.StatusBadRequest {
			t.Errorf("?wait=%s: %d %s, want 400", bad, code, body)
		}
	}
	if code, st := a.safeToShutdown("?wait=1ms"); code != http.StatusServiceUnavailable || len(st.VMs) != 2 {
		t.Errorf("?wait=1ms during the drain: %s", statusJSON(code, st))
	}

	type answer struct {
		code int
		st   agent.NodeStatus
		at   time.Time
	}
	done := make(chan answer, 1)
	waitFrom := time.Now()
	go func() {
		code, body := a.get("/safe-to-shutdown?wait=3m")
		var st agent.NodeStatus
		_ = json.Unmarshal([]byte(body), &st)
		done <- answer{code, st, time.Now()}
	}()
	var got answer
	select {
	case got = <-done:
	case <-sc.ctx.Done():
		t.Fatal("?wait=3m did not return")
	}
	released := a.waitLogged(msgReleased, 1)
	gone := vms.waitEmpty(sc, 30*time.Second)
	t.Logf("?wait=3m held %v; answered %v after the last VM left and %v from the lock's release",
		got.at.Sub(waitFrom).Round(time.Millisecond), got.at.Sub(gone).Round(time.Millisecond), got.at.Sub(released).Round(time.Millisecond))
	if got.code != http.StatusOK || !got.st.Safe || len(got.st.VMs) != 0 {
		t.Errorf("?wait=3m answered %s, want 200 and no VM", statusJSON(got.code, got.st))
	}
	if got.at.Before(gone.Add(-watchSlack)) || got.at.Sub(gone) > 3*time.Second {
		t.Errorf("?wait=3m answered at %s, the last VM left at %s: want as soon as the node is safe",
			got.at.Format(time.StampMicro), gone.Format(time.StampMicro))
	}
	sc.waitMigrated(slow, other)
	sc.waitRestarted(stopping, other)
	started := sc.waitPowerOffJob(env, asked, time.Minute)
	if started.Before(released.Add(-logClockSlack)) {
		t.Errorf("logind started the poweroff job %v before the lock was released", released.Sub(started))
	}
	t.Logf("%s", sc.checkReleasedAfterLastVM(vms, asked))
}

// logind restarted while the agent holds a shutdown: the new logind knows no shutdown,
// so the host is not going down. The agent hears it as a cancelled shutdown at once
// (not at its deadline): it re-enables the node, holds the lock again, and does not
// report a release.
func TestShutdownForgottenByARestartedLogindIsCancelled(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	sc.createVM("blocked", liveMigrate, notMigratable, onNode(node))
	env := sc.startLogind()
	a := sc.startShutdownAgent(node, env, "--shutdown-timeout=3m", "--logind-dropin-dir="+env.DropInDir)
	sc.waitInhibitDelayMax(env, 3*time.Minute)
	bootID := sc.node(node).Status.NodeInfo.BootID

	asked := sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	a.waitStatus(time.Minute, "the blocked VM holding the shutdown", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "blocked")
		return st.Draining && st.Trigger == agent.TriggerShutdown && v != nil && v.State == agent.StateBlocked
	})
	if err := env.RestartLogind(sc.ctx, false); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	sc.eventually(time.Minute, "the agent to re-enable the node", func() (bool, string) {
		n := sc.node(node)
		_, owned := n.Annotations[agent.AnnotationOwned]
		return !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !n.Spec.Unschedulable && !owned,
			fmt.Sprintf("taints %v, unschedulable %v, annotations %v", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	})
	t.Logf("node re-enabled %v after logind restarted", time.Since(restarted).Round(time.Millisecond))
	if ev := sc.nodeEvent(node, agent.ReasonNodeReenabled); !strings.Contains(ev.Message, "cancelled") {
		t.Errorf("%s event %q does not say the shutdown was cancelled", ev.Reason, ev.Message)
	}
	sc.waitLock(env, a)
	a.waitStatus(30*time.Second, "the agent to stop draining", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return !st.Draining })
	if hasEvent(sc.events(metav1.NamespaceDefault, "Node", node), agent.ReasonShutdownReleased) {
		t.Errorf("a %s event for a shutdown that logind forgot", agent.ReasonShutdownReleased)
	}
	if _, ok, err := env.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || ok {
		t.Errorf("logind started %s (%v, %v) although the shutdown was forgotten", powerOffUnit, ok, err)
	}
}
