package e2e

// Bad input, end to end: a malformed legacy ConfigMap, an invalid taint key in the
// KubeVirt CR or on the command line, an unknown cluster evictionStrategy, a VMI
// without status, and a cluster without KubeVirt's CRDs. Each gets a clear error and
// the agent keeps doing its job.

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// alive fails the test if the agent process has exited, and checks /healthz.
func (a *agentProc) alive() {
	a.sc.t.Helper()
	select {
	case <-a.exited:
		a.sc.t.Fatalf("node-agent exited: %s", a.logTail())
	default:
	}
	if code, body := a.get("/healthz"); code != http.StatusOK {
		a.sc.t.Errorf("/healthz: %d %s", code, body)
	}
}

// A kubevirt-config ConfigMap whose data.migrations is not YAML: a ConfigError event
// on the Node, and the agent drains on the default key.
func TestDrainMalformedLegacyConfigMap(t *testing.T) {
	sc := newClusterWideScenario(t, 2)
	sc.legacyConfigMap("nodeDrainTaintKey: [mytaint/drain")
	node, other := sc.nodes[0], sc.nodes[1]
	always := sc.pinned("always", node, noneStrategy)
	a := sc.startAgent(node)

	ev := sc.nodeEvent(node, agent.ReasonConfigError)
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, nodeinfo.SourceConfigMap) || !strings.Contains(ev.Message, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("ConfigError event %s %q: want a Warning naming the ConfigMap and the key in use", ev.Type, ev.Message)
	}
	_, st := a.safeToShutdown("")
	if st.TaintKey != nodeinfo.DefaultDrainTaintKey || !strings.Contains(st.ConfigError, "data.migrations") {
		t.Errorf("/safe-to-shutdown: taint key %q, config error %q", st.TaintKey, st.ConfigError)
	}
	// Once per distinct error, which the NodeAgentConfigError alert counts.
	a.checkMetrics(map[string]float64{`node_agent_config_errors_total{node="` + node + `",source="config"}`: 1})

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitSafe(2 * time.Minute)
	// KubeVirt's taint-driven evacuation leaves a None VM alone: the agent shut it down.
	sc.waitRestarted(always, other)
	a.alive()
}

// An invalid taint key in the KubeVirt CR: a ConfigError event on the Node naming it,
// and the agent keeps the last good key.
func TestDrainInvalidTaintKeyInKubeVirtCR(t *testing.T) {
	const bad = "not a key!"
	sc := newClusterWideScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	always := sc.pinned("always", node, noneStrategy)
	a := sc.startAgent(node)

	// The KubeVirt CRD has no pattern for the key: the API server stores it.
	sc.setDrainTaintKey(bad)
	sc.eventually(30*time.Second, "a ConfigError event naming the bad key", func() (bool, string) {
		for _, e := range sc.events(metav1.NamespaceDefault, "Node", node) {
			if e.Reason == agent.ReasonConfigError && strings.Contains(e.Message, bad) && strings.Contains(e.Message, nodeinfo.SourceKubeVirt) {
				return true, ""
			}
		}
		return false, ""
	})
	_, st := a.safeToShutdown("")
	if st.TaintKey != nodeinfo.DefaultDrainTaintKey || st.ConfigError == "" {
		t.Errorf("/safe-to-shutdown: taint key %q, config error %q; want the last good key and the error", st.TaintKey, st.ConfigError)
	}

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitSafe(2 * time.Minute)
	sc.waitRestarted(always, other)
	a.alive()
}

// An invalid --drain-taint-key: the binary exits with status 2 and says what to fix.
func TestAgentRejectsInvalidTaintKeyFlag(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, shared.agentBin, "run", "--kubeconfig="+shared.cluster.Kubeconfig,
		"--node-name=n1", "--shutdown-inhibitor=false", "--drain-taint-key=not a key!")
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 {
		t.Fatalf("node-agent run with an invalid --drain-taint-key: %v, want exit status 2; stderr: %s", err, stderr.String())
	}
	msg := stderr.String()
	for _, want := range []string{"--drain-taint-key", `"not a key!"`, "alphanumeric"} {
		if !strings.Contains(msg, want) {
			t.Errorf("the message does not say %q: %s", want, msg)
		}
	}
}

// An unknown evictionStrategy in the KubeVirt CR: the VMs without their own strategy
// are left alone and reported blocked, naming the strategy; none is shut down.
func TestDrainUnknownClusterEvictionStrategy(t *testing.T) {
	const bogus = kubevirtv1.EvictionStrategy("MoveItSomehow")
	sc := newClusterWideScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	// Created first: with the bogus value in the CR, virt-api refuses new VMIs
	// without a strategy of their own.
	unset := sc.pinned("unset", node)
	sc.withoutOwnEvictionStrategy("unset")
	always := sc.pinned("always", node, noneStrategy)
	if err := sc.setClusterEvictionStrategy(bogus); err != nil {
		t.Fatalf("the KubeVirt CRD refuses evictionStrategy %q: %v", bogus, err)
	}
	pod := sc.launcherPod(unset, node)
	a := sc.startAgent(node)
	a.waitStatus(30*time.Second, "the cluster's strategy to be read", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "unset")
		return v != nil && v.Strategy == string(bogus)
	})

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	sc.waitRestarted(always, other)
	st := a.waitStatus(time.Minute, "the VM without a strategy blocked", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "unset")
		return len(st.VMs) == 1 && v != nil && v.State == agent.StateBlocked
	})
	if v := vmStatus(st, sc.ns, "unset"); !strings.Contains(v.Detail, string(bogus)) {
		t.Errorf("blocked without naming the strategy: %q", v.Detail)
	}
	after := sc.vmi("unset")
	if after.UID != unset.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM was moved: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
	sc.podUntouched(pod, "an unknown strategy is never a reason to shut down")
	if ev := sc.waitEvent(sc.ns, "VirtualMachineInstance", "unset", agent.ReasonBlocked, 30*time.Second); !strings.Contains(ev.Message, string(bogus)) {
		t.Errorf("DrainBlocked event %q does not name the strategy", ev.Message)
	}
	a.alive()
}

// A VMI labelled as on the node but without status (never scheduled, status emptied):
// no crash, and it is not counted as a VM on the node.
func TestDrainVMIWithoutStatus(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	a := sc.startAgent(node)

	// Only KubeVirt's own programs may set a VMI's kubevirt.io/nodeName label and
	// its status (virt-api's VMI webhooks): act as virt-controller.
	kv, err := sc.env.cluster.KubeVirtClientAs(cluster.VirtControllerServiceAccount)
	if err != nil {
		t.Fatal(err)
	}
	ghost := sim.NewVMI(sc.ns, "ghost", liveMigrate,
		sim.WithLabels(map[string]string{nodeinfo.NodeNameLabel: node}),
		sim.WithNodeSelector(map[string]string{poolLabel: "nowhere"}))
	if err := kv.Post().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Body(ghost).Do(sc.ctx).Error(); err != nil {
		t.Fatalf("creating the VMI: %v", err)
	}
	// The VMI CRD has no status subresource: empty it with a plain update, once.
	err = wait.PollUntilContextTimeout(sc.ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		cur := sc.vmi("ghost")
		cur.Status = kubevirtv1.VirtualMachineInstanceStatus{}
		err := kv.Put().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Name("ghost").Body(cur).Do(ctx).Error()
		return err == nil, ignoreConflict(err)
	})
	if err != nil {
		t.Fatalf("emptying the VMI's status: %v", err)
	}

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	sc.waitMigrated(migrating, other)
	st := a.waitSafe(time.Minute)
	if v := vmStatus(st, sc.ns, "ghost"); v != nil {
		t.Errorf("the VMI without status is counted: %+v", v)
	}
	if v := sc.vmi("ghost"); v == nil || v.Labels[nodeinfo.NodeNameLabel] != node {
		t.Errorf("the test's premise is gone: the VMI is not labelled as on %s any more", node)
	}
	a.alive()
}

func ignoreConflict(err error) error {
	if apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// Without KubeVirt's CRDs the agent is alive but not ready, and says what is
// missing; once KubeVirt is installed it becomes ready by itself. This needs a
// cluster of its own.
func TestAgentWithoutKubeVirtCRDs(t *testing.T) {
	t.Parallel() // a cluster of its own
	slots.take(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c, err := cluster.Start(ctx, cluster.Options{WithoutKubeVirt: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopPrivateCluster(t, c) })
	const node = "no-kubevirt-n0"
	if _, err := c.Kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sc := &scenario{t: t, ctx: ctx, env: &env{cluster: c, agentBin: shared.agentBin}}
	a := sc.launchAgent(node)

	sc.eventually(time.Minute, "/readyz to say what is missing", func() (bool, string) {
		code, body := a.get("/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "virtualmachineinstances.kubevirt.io"), body
	})
	a.alive()
	_, body := a.get("/readyz")
	t.Logf("/readyz without KubeVirt: %s", strings.TrimSpace(body))

	// The VMIs cannot be read, but the virt-launcher pods can: with none on the node it is
	// safe to power off (a host shutdown is released at once), with one it is not (held,
	// the reason in readiness and metrics).
	sc.eventually(time.Minute, "/safe-to-shutdown 200 without KubeVirt once the pods are listed (none on the node)", func() (bool, string) {
		code, st := a.safeToShutdown("")
		return code == http.StatusOK && strings.Contains(st.SafeBlind, "no virt-launcher pod"), statusJSON(code, st)
	})
	launcher := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "virt-launcher-x", Namespace: metav1.NamespaceDefault, Labels: map[string]string{kubevirtv1.AppLabel: "virt-launcher"}},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "compute", Image: "example.com/virt-launcher"}}},
	}
	if _, err := c.Kube.CoreV1().Pods(metav1.NamespaceDefault).Create(ctx, launcher, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, "/safe-to-shutdown 503 with a virt-launcher pod it cannot see the VM of", func() (bool, string) {
		code, st := a.safeToShutdown("")
		return code == http.StatusServiceUnavailable && st.SafeBlind == "" && strings.Contains(st.Reason, "virtualmachineinstances"), statusJSON(code, st)
	})
	if v, ok := a.metric("node_agent_view_synced"); !ok || v != 0 {
		t.Errorf("node_agent_view_synced %v (%v), want 0", v, ok)
	}
	if err := c.Kube.CoreV1().Pods(metav1.NamespaceDefault).Delete(ctx, launcher.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, "/safe-to-shutdown 200 again without the pod", func() (bool, string) {
		code, st := a.safeToShutdown("")
		return code == http.StatusOK, statusJSON(code, st)
	})

	if err := c.InstallKubeVirt(ctx, kubevirtv1.KubeVirtConfiguration{EvictionStrategy: ptr.To(kubevirtv1.EvictionStrategyLiveMigrate)}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(2*time.Minute, "the agent to become ready", func() (bool, string) {
		code, body := a.get("/readyz")
		return code == http.StatusOK, body
	})
	if code, st := a.safeToShutdown(""); code != http.StatusOK || st.Draining || len(st.VMs) != 0 {
		t.Errorf("/safe-to-shutdown on an empty node: %s", statusJSON(code, st))
	}
	a.alive()
}

// launchAgent runs `node-agent run` for node against sc's cluster without waiting for
// it to be ready; it is stopped when the test ends.
func (sc *scenario) launchAgent(node string, flags ...string) *agentProc {
	sc.t.Helper()
	addr := freeAddr(sc.t)
	args := append([]string{"run", "--kubeconfig=" + sc.env.cluster.Kubeconfig, "--node-name=" + node,
		"--listen-address=" + addr, "--resync=1s", "--log-level=debug", "--shutdown-inhibitor=false"}, flags...)
	a := sc.spawnAgent(sc.env.agentBin, node, addr, args, nil)
	a.waitServing("/healthz", 30*time.Second)
	return a
}
