package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// poolLabel isolates a scenario: its nodes carry it and its VMs select it.
const poolLabel = "e2e.node-agent.test/pool"

// scenario is one test's own namespace and nodes on the shared cluster.
type scenario struct {
	t     testing.TB
	ctx   context.Context
	ns    string
	pool  string
	nodes []string
	env   *env
}

var nonAlnum = regexp.MustCompile(`[^a-z0-9]+`)

// newScenario creates a namespace and n nodes for the test on the shared cluster
// (see the package doc for what is cleaned up when it ends). The test runs in
// parallel with the other scenarios (t.Parallel; a benchmark runs alone): it must
// change nothing another test sees, see newClusterWideScenario. A subtest's scenario
// runs in its turn within its parent, which calls t.Parallel itself when it may.
func newScenario(t testing.TB, nodes int) *scenario {
	t.Helper()
	parallel(t)
	slots.take(t)
	return newScenarioIn(t, shared, nodes)
}

// parallel calls t.Parallel for a top-level test (a benchmark runs alone), once: a
// test may wait for its turn (oneContainerTestAtATime) before its scenario.
func parallel(t testing.TB) {
	if pt, ok := t.(*testing.T); ok && !strings.Contains(pt.Name(), "/") {
		if _, called := parallelCalled.LoadOrStore(pt, true); !called {
			pt.Parallel()
		}
	}
}

// parallelCalled: the tests parallel has made parallel.
var parallelCalled sync.Map

// newClusterWideScenario is newScenario for a test that changes what every test on
// its cluster sees: the KubeVirt CR's configuration, the legacy kubevirt-config
// ConfigMap, the deployed manifests' cluster-scoped objects; or that loads the API
// server (the Node-update flood). Such tests run on a second cluster of their own,
// configured as the shared one (wideCluster, started by the first of them), one at a
// time, beside the parallel scenarios on the shared cluster; each puts back what it
// changed in t.Cleanup. They are a lane of their own: a test waiting for its turn, or
// holding it, takes no slot (scenarioSlots).
func newClusterWideScenario(t testing.TB, nodes int) *scenario {
	t.Helper()
	parallel(t)
	asked := time.Now()
	wideCluster.turn.Lock()
	t.Cleanup(wideCluster.turn.Unlock)
	slots.lane(t, asked)
	return newScenarioIn(t, wideEnv(t), nodes)
}

// changeClusterConfig fails the test if it would change the shared cluster's
// configuration while other tests run beside it (see newClusterWideScenario).
func (sc *scenario) changeClusterConfig(what string) {
	sc.t.Helper()
	if sc.env == shared {
		sc.t.Fatalf("%s changes the shared cluster for every test: start the test with newClusterWideScenario", what)
	}
}

// newScenarioIn is newScenario on another cluster (see newPrivateEnv), without
// t.Parallel: the caller decides.
func newScenarioIn(t testing.TB, e *env, nodes int) *scenario {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	t.Cleanup(cancel)
	name := strings.Trim(nonAlnum.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	if len(name) > 40 {
		sum := sha256.Sum256([]byte(name))
		name = strings.Trim(name[:32], "-") + "-" + hex.EncodeToString(sum[:])[:6]
	}
	sc := &scenario{t: t, ctx: ctx, ns: name, pool: name, env: e}
	if _, err := sc.kube().CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: sc.ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating namespace %s: %v", sc.ns, err)
	}
	// Cleanups run last first: the nodes go after the VMs.
	t.Cleanup(func() { e.retireNodes(sc.nodes) })
	t.Cleanup(sc.deleteKubeVirtObjects)
	for i := 0; i < nodes; i++ {
		sc.addNode()
	}
	return sc
}

// deleteKubeVirtObjects deletes the scenario's migrations, VMs, VMIRSs and VMIs when
// the test ends: migrations left unfinished (a VM with nowhere to go) would count
// against KubeVirt's cluster-wide limit of parallel migrations in the tests after it.
func (sc *scenario) deleteKubeVirtObjects() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, res := range []string{nodeinfo.ResourceMigrations, nodeinfo.ResourceVMs, nodeinfo.ResourceVMIRSs, nodeinfo.ResourceVMIs} {
		if err := sc.env.cluster.KubeVirt.Delete().Namespace(sc.ns).Resource(res).Do(ctx).Error(); err != nil {
			sc.t.Logf("cleaning up the %s of %s: %v", res, sc.ns, err)
		}
	}
}

// retireWithin bounds how long retireNodes waits for a finished scenario's pods and
// VMs to leave its nodes: a virt-launcher's grace period, a guest's shutdown.
const retireWithin = 3 * time.Minute

// retireNodes removes a finished scenario's nodes from the cluster once their pods and
// VMs are gone (sim.RemoveNode), in the background, so that the cluster keeps the nodes
// of the running tests only, as a real one keeps its hosts: otherwise the simulated
// kubelets of every finished test's nodes would go on renewing their Leases, hundreds
// of writes a second by the end of a run. A node still busy after retireWithin stays.
func (e *env) retireNodes(nodes []string) {
	if e.sim == nil || e.ctx == nil || len(nodes) == 0 {
		return
	}
	left := append([]string(nil), nodes...)
	go func() {
		_ = wait.PollUntilContextTimeout(e.ctx, 2*time.Second, retireWithin, true, func(ctx context.Context) (bool, error) {
			busy := left[:0]
			for _, node := range left {
				if err := e.sim.RemoveNode(ctx, node); err != nil {
					busy = append(busy, node)
					continue
				}
				e.retired.Add(1)
			}
			left = busy
			return len(left) == 0, nil
		})
		e.kept.Add(int64(len(left)))
	}()
}

func (sc *scenario) kube() kubernetes.Interface { return sc.env.cluster.Kube }

// addNode adds a node to the scenario's pool.
func (sc *scenario) addNode(opts ...sim.NodeOption) string {
	sc.t.Helper()
	node := fmt.Sprintf("%s-n%d", sc.pool, len(sc.nodes))
	opts = append([]sim.NodeOption{sim.WithNodeLabels(map[string]string{poolLabel: sc.pool})}, opts...)
	if _, err := sc.env.sim.AddNode(sc.ctx, node, opts...); err != nil {
		sc.t.Fatalf("adding node %s: %v", node, err)
	}
	sc.nodes = append(sc.nodes, node)
	return node
}

// vmOpts are the options every VM of the scenario gets: its pool.
func (sc *scenario) vmOpts(opts []sim.VMOption) []sim.VMOption {
	return append([]sim.VMOption{sim.WithNodeSelector(map[string]string{poolLabel: sc.pool})}, opts...)
}

// createVM creates a VM (runStrategy Always unless given) and waits until its VMI runs.
func (sc *scenario) createVM(name string, opts ...sim.VMOption) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	if err := sc.env.sim.Create(sc.ctx, sim.NewVM(sc.ns, name, sc.vmOpts(opts)...)); err != nil {
		sc.t.Fatal(err)
	}
	return sc.waitRunning(name)
}

// createVMI creates a bare VMI and waits until it runs.
func (sc *scenario) createVMI(name string, opts ...sim.VMOption) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	if err := sc.env.sim.Create(sc.ctx, sim.NewVMI(sc.ns, name, sc.vmOpts(opts)...)); err != nil {
		sc.t.Fatal(err)
	}
	return sc.waitRunning(name)
}

// createVMIRS creates a VMIRS and waits until its replicas run; it returns their VMIs.
func (sc *scenario) createVMIRS(name string, replicas int32, opts ...sim.VMOption) []*kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	if err := sc.env.sim.Create(sc.ctx, sim.NewVMIRS(sc.ns, name, replicas, sc.vmOpts(opts)...)); err != nil {
		sc.t.Fatal(err)
	}
	vmis, err := sc.env.sim.WaitForVMIs(sc.ctx, sc.ns, sim.LabelVMIRS+"="+name, "running", func(vs []*kubevirtv1.VirtualMachineInstance) bool {
		running := 0
		for _, v := range vs {
			if v.Status.Phase == kubevirtv1.Running {
				running++
			}
		}
		return running == int(replicas)
	})
	if err != nil {
		sc.t.Fatal(err)
	}
	return vmis
}

func (sc *scenario) waitRunning(name string) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	vmi, err := sc.env.sim.WaitForVMIRunning(sc.ctx, sc.ns, name)
	if err != nil {
		sc.t.Fatal(err)
	}
	return vmi
}

// vmi reads a VMI from the API server; nil when it does not exist.
func (sc *scenario) vmi(name string) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	vmi := &kubevirtv1.VirtualMachineInstance{}
	err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Name(name).Do(sc.ctx).Into(vmi)
	if err != nil {
		if strings.Contains(err.Error(), "not found") {
			return nil
		}
		sc.t.Fatalf("reading VMI %s: %v", name, err)
	}
	return vmi
}

// eventually polls cond until it returns true or the deadline passes; what says what
// was awaited, and cond's last message says what was seen.
func (sc *scenario) eventually(timeout time.Duration, what string, cond func() (bool, string)) {
	sc.t.Helper()
	var last string
	err := wait.PollUntilContextTimeout(sc.ctx, 100*time.Millisecond, timeout, true, func(context.Context) (bool, error) {
		ok, msg := cond()
		last = msg
		return ok, nil
	})
	if err != nil {
		sc.t.Fatalf("waiting %s for %s: %v (last seen: %s)", timeout, what, err, last)
	}
}

// waitVMIOn waits until the VMI named name runs on node (a new VMI of that name counts).
func (sc *scenario) waitVMIOn(name, node string) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	vmi, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, name, "Running on "+node, func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName == node && v.DeletionTimestamp == nil
	})
	if err != nil {
		sc.t.Fatal(err)
	}
	return vmi
}

// waitVMIOffNode waits until the VMI named name runs on a node other than node.
func (sc *scenario) waitVMIOffNode(name, node string) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	vmi, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, name, "Running elsewhere than "+node, func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName != node && v.Status.NodeName != "" && v.DeletionTimestamp == nil
	})
	if err != nil {
		sc.t.Fatal(err)
	}
	return vmi
}

// taint puts a NoSchedule taint with key on node, as `kubectl taint` would.
func (sc *scenario) taint(node, key string) {
	sc.t.Helper()
	sc.patchNode(node, func(n *corev1.Node) {
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: key, Value: "draining", Effect: corev1.TaintEffectNoSchedule})
	})
}

// tryTaint adds the drain taint with key to node as `kubectl taint` without
// --overwrite does: a node that already has a taint of that key and effect (an agent's
// own, for a host shutdown) is left as it is, and it reports false.
func (sc *scenario) tryTaint(node, key string) bool {
	sc.t.Helper()
	added := false
	err := nodeinfo.UpdateNode(sc.ctx, sc.kube(), node, func(n *corev1.Node) (bool, error) {
		for _, t := range n.Spec.Taints {
			if t.Key == key && t.Effect == corev1.TaintEffectNoSchedule {
				added = false
				return false, nil
			}
		}
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: key, Value: "draining", Effect: corev1.TaintEffectNoSchedule})
		added = true
		return true, nil
	})
	if err != nil {
		sc.t.Fatal(err)
	}
	return added
}

// untaint removes every taint with key from node, as `kubectl taint KEY-` would.
func (sc *scenario) untaint(node, key string) {
	sc.t.Helper()
	sc.patchNode(node, func(n *corev1.Node) {
		var keep []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key != key {
				keep = append(keep, t)
			}
		}
		n.Spec.Taints = keep
	})
}

func (sc *scenario) cordon(node string, on bool) {
	sc.t.Helper()
	sc.patchNode(node, func(n *corev1.Node) { n.Spec.Unschedulable = on })
}

func (sc *scenario) patchNode(node string, mutate func(*corev1.Node)) {
	sc.t.Helper()
	err := nodeinfo.UpdateNode(sc.ctx, sc.kube(), node, func(n *corev1.Node) (bool, error) {
		mutate(n)
		return true, nil
	})
	if err != nil {
		sc.t.Fatal(err)
	}
}

func (sc *scenario) node(name string) *corev1.Node {
	sc.t.Helper()
	n, err := sc.kube().CoreV1().Nodes().Get(sc.ctx, name, metav1.GetOptions{})
	if err != nil {
		sc.t.Fatalf("reading node %s: %v", name, err)
	}
	return n
}

// events lists the events about an object (kind and name) in a namespace.
func (sc *scenario) events(namespace, kind, name string) []corev1.Event {
	sc.t.Helper()
	list, err := sc.kube().CoreV1().Events(namespace).List(sc.ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=" + kind + ",involvedObject.name=" + name,
	})
	if err != nil {
		sc.t.Fatalf("listing events: %v", err)
	}
	return list.Items
}

func hasEvent(events []corev1.Event, reason string) bool {
	for _, e := range events {
		if e.Reason == reason {
			return true
		}
	}
	return false
}

// agentProc is a node-agent process run by a test.
type agentProc struct {
	sc      *scenario
	node    string
	cmd     *exec.Cmd
	addr    string
	logPath string
	exited  chan struct{}
}

// startAgent runs `node-agent run` for node against the test cluster, and waits
// until it is ready.
func (sc *scenario) startAgent(node string, flags ...string) *agentProc {
	sc.t.Helper()
	return sc.startAgentEnv(node, nil, flags...)
}

// startAgentEnv is startAgent with extra environment for the agent (NAME=value), such
// as DBUS_SYSTEM_BUS_ADDRESS for a private system bus.
func (sc *scenario) startAgentEnv(node string, env []string, flags ...string) *agentProc {
	sc.t.Helper()
	return sc.startAgentBin(sc.env.agentBin, node, env, flags...)
}

// startAgentBin is startAgentEnv with another build of the agent (releaseBuild).
func (sc *scenario) startAgentBin(bin, node string, env []string, flags ...string) *agentProc {
	sc.t.Helper()
	addr := freeAddr(sc.t)
	args := []string{"run", "--kubeconfig=" + sc.env.cluster.Kubeconfig, "--node-name=" + node,
		"--listen-address=" + addr, "--resync=1s", "--log-level=debug"}
	if !hasFlag(flags, "--shutdown-inhibitor") {
		// No system bus here: the drain tests run without the logind part.
		args = append(args, "--shutdown-inhibitor=false")
	}
	a := sc.spawnAgent(bin, node, addr, append(args, flags...), env)
	a.waitServing("/readyz", 60*time.Second)
	return a
}

// freeAddr returns a free local address for an agent's --listen-address.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// spawnAgent runs bin with args (its --listen-address is addr) and extra environment,
// logging to a file that the test prints when it fails; the process is stopped when
// the test ends.
func (sc *scenario) spawnAgent(bin, node, addr string, args, env []string) *agentProc {
	sc.t.Helper()
	if len(args) > 0 && args[0] == "run" && sc.ns != "" && !hasFlag(args, "--namespace") && !slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, "NODE_AGENT_NAMESPACE=") }) {
		// The Leases of the turns to drain for host shutdowns: the scenario's own queue.
		args = append(args[:1:1], append([]string{"--namespace=" + sc.ns}, args[1:]...)...)
	}
	logPath := filepath.Join(sc.t.TempDir(), "node-agent-"+node+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		sc.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		sc.t.Fatalf("starting node-agent: %v", err)
	}
	a := &agentProc{sc: sc, node: node, cmd: cmd, addr: addr, logPath: logPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(a.exited)
	}()
	sc.t.Cleanup(func() {
		a.stop()
		if sc.t.Failed() {
			data, _ := os.ReadFile(logPath)
			if len(data) > 20000 {
				data = data[len(data)-20000:]
			}
			sc.t.Logf("node-agent log for %s:\n%s", node, data)
		}
	})
	return a
}

// waitServing waits until the agent answers 200 on path; it fails the test if the
// agent exits first.
func (a *agentProc) waitServing(path string, timeout time.Duration) {
	a.sc.t.Helper()
	a.sc.eventually(timeout, "node-agent on "+a.node+" to answer "+path, func() (bool, string) {
		select {
		case <-a.exited:
			a.sc.t.Fatalf("node-agent exited at start: %s", a.logTail())
		default:
		}
		code, body := a.get(path)
		return code == http.StatusOK, body
	})
}

func (a *agentProc) logTail() string {
	data, _ := os.ReadFile(a.logPath)
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

// kill ends the agent with SIGKILL, as a crash or an OOM kill would.
func (a *agentProc) kill() {
	_ = a.cmd.Process.Signal(syscall.SIGKILL)
	<-a.exited
}

// stop ends the agent with SIGTERM, as the kubelet would.
func (a *agentProc) stop() {
	select {
	case <-a.exited:
		return
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(10 * time.Second):
		a.kill()
	}
}

func (a *agentProc) get(path string) (int, string) {
	// Bounded: an agent that hangs fails the wait that asked (its deadline) instead of
	// stalling the test until go test's own timeout; longer than the longest ?wait= a
	// test asks (3m, TestShutdownSafeToShutdownDuringTheDrain).
	client := &http.Client{Timeout: 4 * time.Minute}
	resp, err := client.Get("http://" + a.addr + path)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// safeToShutdown asks GET /safe-to-shutdown.
func (a *agentProc) safeToShutdown(query string) (int, agent.NodeStatus) {
	a.sc.t.Helper()
	code, body := a.get("/safe-to-shutdown" + query)
	var st agent.NodeStatus
	if code == http.StatusOK || code == http.StatusServiceUnavailable {
		if err := json.Unmarshal([]byte(body), &st); err != nil {
			a.sc.t.Fatalf("/safe-to-shutdown answered %d with a body that is not JSON: %v: %s", code, err, body)
		}
	}
	return code, st
}

// waitSafe waits until /safe-to-shutdown answers 200.
func (a *agentProc) waitSafe(timeout time.Duration) agent.NodeStatus {
	a.sc.t.Helper()
	var st agent.NodeStatus
	a.sc.eventually(timeout, "node "+a.node+" to be safe to shut down", func() (bool, string) {
		var code int
		code, st = a.safeToShutdown("")
		raw, _ := json.Marshal(st)
		return code == http.StatusOK, strconv.Itoa(code) + " " + string(raw)
	})
	return st
}

// migrationsOf lists the migrations of one VMI.
func (sc *scenario) migrationsOf(vmi string) []kubevirtv1.VirtualMachineInstanceMigration {
	sc.t.Helper()
	list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).Do(sc.ctx).Into(list); err != nil {
		sc.t.Fatalf("listing migrations: %v", err)
	}
	var out []kubevirtv1.VirtualMachineInstanceMigration
	for _, m := range list.Items {
		if m.Spec.VMIName == vmi {
			out = append(out, m)
		}
	}
	return out
}

// launcherPod returns the VMI's virt-launcher pod on node.
func (sc *scenario) launcherPod(vmi *kubevirtv1.VirtualMachineInstance, node string) *corev1.Pod {
	sc.t.Helper()
	pods, err := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{LabelSelector: kubevirtv1.CreatedByLabel + "=" + string(vmi.UID)})
	if err != nil {
		sc.t.Fatal(err)
	}
	for i := range pods.Items {
		if pods.Items[i].Spec.NodeName == node {
			return &pods.Items[i]
		}
	}
	sc.t.Fatalf("no virt-launcher pod of VMI %s on %s", vmi.Name, node)
	return nil
}

func (sc *scenario) podPhase(ns, name string, uid types.UID) (corev1.PodPhase, bool) {
	p, err := sc.kube().CoreV1().Pods(ns).Get(sc.ctx, name, metav1.GetOptions{})
	if err != nil || p.UID != uid {
		return "", false
	}
	return p.Status.Phase, true
}

// waitStoppedForGood waits until the VMI (a bare one, or one whose owner does not
// restart it) has ended, Succeeded or Failed or deleted, and checks that no VMI of
// that name runs again.
func (sc *scenario) waitStoppedForGood(name string, old *kubevirtv1.VirtualMachineInstance) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, name, "ended", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v == nil || v.IsFinal()
	}); err != nil {
		sc.t.Fatal(err)
	}
	if v := sc.vmi(name); v != nil && v.UID != old.UID {
		sc.t.Errorf("VMI %s was started again (uid %s, phase %s)", name, v.UID, v.Status.Phase)
	}
}

func hasFlag(flags []string, name string) bool {
	for _, f := range flags {
		if f == name || strings.HasPrefix(f, name+"=") {
			return true
		}
	}
	return false
}

// checkMetrics scrapes /metrics and checks the value of each series named.
func (a *agentProc) checkMetrics(want map[string]float64) {
	a.sc.t.Helper()
	code, body := a.get("/metrics")
	if code != http.StatusOK {
		a.sc.t.Fatalf("/metrics answered %d", code)
	}
	got := map[string]string{}
	for _, line := range strings.Split(body, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if i := strings.LastIndexByte(line, ' '); i > 0 {
			got[line[:i]] = line[i+1:]
		}
	}
	for series, value := range want {
		raw, ok := got[series]
		if !ok {
			a.sc.t.Errorf("/metrics has no series %s", series)
			continue
		}
		if v, err := strconv.ParseFloat(raw, 64); err != nil || v != value {
			a.sc.t.Errorf("/metrics: %s = %s, want %v", series, raw, value)
		}
	}
}

// checkJSONLogs checks that every log line is a JSON object with the node field, and
// that there is a decision line with namespace and vmi fields for each VMI named.
func (a *agentProc) checkJSONLogs(namespace string, vmis ...string) {
	a.sc.t.Helper()
	data, err := os.ReadFile(a.logPath)
	if err != nil {
		a.sc.t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(data)), "\n") {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			a.sc.t.Errorf("a log line is not JSON: %q", line)
			continue
		}
		if _, ok := entry["msg"]; !ok {
			a.sc.t.Errorf("a log line has no msg: %q", line)
		}
		if entry["node"] != a.node && entry["msg"] != "node-agent stopped" {
			a.sc.t.Errorf("a log line lacks node=%s: %q", a.node, line)
		}
		if entry["namespace"] == namespace {
			if vmi, ok := entry["vmi"].(string); ok {
				seen[vmi] = true
			}
		}
	}
	for _, vmi := range vmis {
		if !seen[vmi] {
			a.sc.t.Errorf("no log line with namespace=%s vmi=%s", namespace, vmi)
		}
	}
}

var (
	liveMigrate   = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate)
	ifPossible    = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible)
	noneStrategy  = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyNone)
	external      = sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyExternal)
	notMigratable = sim.WithBridgeInterface()
)

// onNode pins a VM's first start to a node of the scenario.
func onNode(node string) sim.VMOption {
	return sim.WithNodeSelector(map[string]string{corev1.LabelHostname: node})
}

// plainPod creates an unmanaged pod bound to node (as a pod with spec.nodeName is).
func (sc *scenario) plainPod(name, node string, mutate ...func(*corev1.Pod)) *corev1.Pod {
	sc.t.Helper()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: sc.ns},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: new(int64),
			Containers:                    []corev1.Container{{Name: "app", Image: "registry.example/app:1"}},
		},
	}
	for _, m := range mutate {
		m(pod)
	}
	created, err := sc.kube().CoreV1().Pods(sc.ns).Create(sc.ctx, pod, metav1.CreateOptions{})
	if err != nil {
		sc.t.Fatalf("creating pod %s: %v", name, err)
	}
	return created
}

// waitReplaced waits until the VMIRS has a running VMI other than old on node.
func (sc *scenario) waitReplaced(rs string, old *kubevirtv1.VirtualMachineInstance, node string) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForVMIs(sc.ctx, sc.ns, sim.LabelVMIRS+"="+rs, "replaced on "+node, func(vs []*kubevirtv1.VirtualMachineInstance) bool {
		for _, v := range vs {
			if v.UID != old.UID && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName == node {
				return true
			}
		}
		return false
	}); err != nil {
		sc.t.Errorf("VMIRS %s: %v", rs, err)
	}
}

func (sc *scenario) patchVMIRSNodeSelector(name string, sel map[string]string) {
	sc.t.Helper()
	sc.setTemplateNodeSelector(nodeinfo.ResourceVMIRSs, name, sel)
}

// setTemplateNodeSelector replaces the nodeSelector of a VM's or VMIRS's VMI template
// with one JSON patch (no read-modify-write, so no conflict to retry).
func (sc *scenario) setTemplateNodeSelector(resource, name string, sel map[string]string) {
	sc.t.Helper()
	patch, err := json.Marshal([]map[string]any{{"op": "add", "path": "/spec/template/spec/nodeSelector", "value": sel}})
	if err != nil {
		sc.t.Fatal(err)
	}
	if err := sc.env.cluster.KubeVirt.Patch(types.JSONPatchType).Namespace(sc.ns).Resource(resource).Name(name).Body(patch).Do(sc.ctx).Error(); err != nil {
		sc.t.Fatalf("setting the nodeSelector of %s %s: %v", resource, name, err)
	}
}

// auditEvent is the part of an audit.k8s.io/v1 Event the test reads.
type auditEvent struct {
	AuditID    string    `json:"auditID"`
	Stamp      time.Time `json:"requestReceivedTimestamp"`
	StageStamp time.Time `json:"stageTimestamp"`
	Stage      string    `json:"stage"`
	RequestURI string    `json:"requestURI"`
	Verb       string    `json:"verb"`
	User       struct {
		Username string `json:"username"`
	} `json:"user"`
	UserAgent string `json:"userAgent"`
	ObjectRef *struct {
		Resource    string `json:"resource"`
		Namespace   string `json:"namespace"`
		Name        string `json:"name"`
		APIGroup    string `json:"apiGroup"`
		Subresource string `json:"subresource"`
	} `json:"objectRef"`
	ResponseStatus *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"responseStatus"`
}

// readAudit reads the API server's audit log: one entry per request (the last stage
// seen of each audit ID), in the order they came, those keep accepts.
func readAudit(path string, keep func(auditEvent) bool) ([]auditEvent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	byID := map[string]auditEvent{}
	var order []string
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 1<<20), 16<<20)
	for s.Scan() {
		var ev auditEvent
		if err := json.Unmarshal(s.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if !keep(ev) {
			continue
		}
		if _, ok := byID[ev.AuditID]; !ok {
			order = append(order, ev.AuditID)
		}
		byID[ev.AuditID] = ev
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	out := make([]auditEvent, 0, len(order))
	for _, id := range order {
		out = append(out, byID[id])
	}
	return out, nil
}

// agentRequests reads the audit log: the requests of user made with userAgent.
func agentRequests(path, user, userAgent string) ([]auditEvent, error) {
	return readAudit(path, func(ev auditEvent) bool { return ev.User.Username == user && ev.UserAgent == userAgent })
}
