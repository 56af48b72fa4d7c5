package e2e

// The workstation commands (node-agent drain, undrain, status), run as an operator
// would: the real binary, with the cluster's kubeconfig, through a pipe or a
// pseudo-terminal.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// ctl runs a workstation command; it returns stdout, stderr and the exit status.
func (sc *scenario) ctl(args ...string) (string, string, int) {
	sc.t.Helper()
	return sc.ctlWith(sc.env.cluster.Kubeconfig, args...)
}

// ctlWith runs a workstation command with another kubeconfig.
func (sc *scenario) ctlWith(kubeconfig string, args ...string) (string, string, int) {
	sc.t.Helper()
	cmd := exec.CommandContext(sc.ctx, sc.env.agentBin, append(args, "--kubeconfig="+kubeconfig)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		sc.t.Fatalf("running node-agent %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

func TestCLIStatusAndDryRunChangeNothing(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	sc.createVM("web", liveMigrate, onNode(node))
	sc.createVM("batch", noneStrategy, onNode(node))
	sc.createVM("stuck", liveMigrate, notMigratable, onNode(node))
	sc.createVMI("scratch", noneStrategy, onNode(node))

	out, errOut, code := sc.ctl("status", node)
	if code != 0 {
		t.Fatalf("status exited %d: %s", code, errOut)
	}
	for _, want := range []string{
		"node/" + node + ": not draining",
		sc.ns + "/web", "migrated to another node",
		sc.ns + "/batch", "shut down, restarted on another node (runStrategy Always)",
		sc.ns + "/stuck", "blocked: not live-migratable",
		sc.ns + "/scratch", "shut down, stays stopped (a bare VMI)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}

	out, errOut, code = sc.ctl("status", node, "-o", "json")
	if code != 0 {
		t.Fatalf("status -o json exited %d: %s", code, errOut)
	}
	var v struct {
		Node      string            `json:"node"`
		Draining  bool              `json:"draining"`
		VMs       []agent.VMStatus  `json:"vms"`
		Predicted map[string]string `json:"predicted"`
	}
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("status -o json is not JSON: %v\n%s", err, out)
	}
	if v.Node != node || v.Draining || len(v.VMs) != 4 || len(v.Predicted) != 4 {
		t.Errorf("status -o json: %+v", v)
	}

	out, errOut, code = sc.ctl("drain", node, "--dry-run")
	if code != 0 {
		t.Fatalf("drain --dry-run exited %d: %s", code, errOut)
	}
	if !strings.Contains(out, "Dry run") || !strings.Contains(out, "blocked: not live-migratable") {
		t.Errorf("drain --dry-run output:\n%s", out)
	}
	n := sc.node(node)
	if n.Spec.Unschedulable || len(n.Spec.Taints) != 0 {
		t.Errorf("drain --dry-run changed the node: unschedulable %v, taints %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
}

func TestCLIDrainFollowsUntilEmptyThenUndrain(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.createVM("web", liveMigrate, onNode(node), sim.WithMigrationDuration(2*time.Second))
	sc.createVM("batch", noneStrategy, onNode(node))
	sc.patchVMNodeSelector("web", map[string]string{poolLabel: sc.pool})
	sc.patchVMNodeSelector("batch", map[string]string{poolLabel: sc.pool})
	sc.startAgent(node)

	out, errOut, code := sc.ctl("drain", node, "--timeout=3m", "--interval=200ms")
	if code != 0 {
		t.Fatalf("drain exited %d, want 0\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	for _, want := range []string{
		"node/" + node + " tainted " + nodeinfo.DefaultDrainTaintKey + "=draining:NoSchedule and cordoned",
		sc.ns + "/web", "migrating",
		sc.ns + "/batch",
		"left the node",
		"drained in",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("drain output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "\x1b[") {
		t.Errorf("drain wrote terminal escapes to a pipe:\n%q", out)
	}
	if moved := sc.waitVMIOn("web", other); moved.UID != migrating.UID {
		t.Error("the LiveMigrate VM was not migrated")
	}

	out, errOut, code = sc.ctl("undrain", node)
	if code != 0 {
		t.Fatalf("undrain exited %d: %s %s", code, out, errOut)
	}
	n := sc.node(node)
	if n.Spec.Unschedulable || len(n.Spec.Taints) != 0 {
		t.Errorf("after undrain: unschedulable %v, taints %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
}

// `drain --all-pods` evicts the other pods by the agent's rule: a pod a budget
// protects is asked once per backoff (one request, not client-go's retries of the
// 429), the refusal written to stderr once; at the timeout the pod is named; once
// the budget is gone the next drain evicts it and the node is empty.
func TestCLIDrainAllPods(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	guarded := sc.plainPod("guarded", node, func(p *corev1.Pod) { p.Labels = map[string]string{"app": "guarded"} })
	free := sc.plainPod("free", node)
	if _, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "guard"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MaxUnavailable: ptr.To(intstr.FromInt32(0)),
			Selector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "guarded"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	out, errOut, code := sc.ctl("drain", node, "--all-pods", "--timeout=12s")
	end := time.Now()
	if code != 1 {
		t.Fatalf("drain with a guarded pod exited %d, want 1\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if !strings.Contains(out, "1 other pods") {
		t.Errorf("the timeout does not name the pod left:\n%s", out)
	}
	if n := strings.Count(errOut, "pod eviction refused"); n != 1 || !strings.Contains(errOut, "pod=guarded") {
		t.Errorf("want one refusal of pod guarded on stderr, got %d:\n%s", n, errOut)
	}
	if _, ok := sc.podPhase(sc.ns, free.Name, free.UID); ok {
		t.Error("the free pod was not evicted")
	}
	counts, err := evictionsPerPod(sc.env.cluster.AuditLog, sc.ns, start, end)
	if err != nil {
		t.Fatal(err)
	}
	// At 0 s and after 5 s (the backoff then doubles to 10 s).
	if n := counts[guarded.Name]; n < 1 || n > 2 {
		t.Errorf("%d eviction requests for the guarded pod in 12 s, want 1 or 2", n)
	}

	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, "guard", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	out, errOut, code = sc.ctl("drain", node, "--all-pods", "--timeout=1m")
	if code != 0 || !strings.Contains(out, "drained in") {
		t.Fatalf("drain once the budget is gone exited %d, want 0\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if _, ok := sc.podPhase(sc.ns, guarded.Name, guarded.UID); ok {
		t.Error("the guarded pod is still there once its budget is gone")
	}
}

func TestCLIDrainTimesOutOnABlockedVM(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	sc.createVM("stuck", liveMigrate, notMigratable, onNode(node))
	sc.startAgent(node)

	out, errOut, code := sc.ctl("drain", node, "--timeout=5s", "--interval=200ms")
	if code != 1 {
		t.Fatalf("drain exited %d, want 1 on timeout\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	if !strings.Contains(out, "timed out") || !strings.Contains(out, sc.ns+"/stuck (blocked") {
		t.Errorf("the timeout message does not name the blocked VM:\n%s", out)
	}
	if v := sc.vmi("stuck"); v == nil || v.Status.NodeName != node || v.IsFinal() {
		t.Errorf("the blocked LiveMigrate VM did not stay where it was")
	}
}

func TestCLIDrainOnATerminal(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	sc.createVM("web", liveMigrate, onNode(node), sim.WithMigrationDuration(2*time.Second))
	sc.patchVMNodeSelector("web", map[string]string{poolLabel: sc.pool})
	sc.startAgent(node)

	cmd := exec.CommandContext(sc.ctx, sc.env.agentBin, "drain", node, "--timeout=3m", "--interval=200ms", "--kubeconfig="+sc.env.cluster.Kubeconfig)
	tty, err := pty.Start(cmd)
	if err != nil {
		t.Fatalf("starting drain on a pseudo-terminal: %v", err)
	}
	defer tty.Close()
	var screen bytes.Buffer
	copied := make(chan struct{})
	go func() {
		_, _ = io.Copy(&screen, tty) // ends with EIO when the command exits
		close(copied)
	}()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("drain on a terminal: %v\n%s", err, screen.String())
	}
	<-copied
	out := screen.String()
	for _, want := range []string{"[", "#", "VMs left node/" + node, "\x1b[", "drained in"} {
		if !strings.Contains(out, want) {
			t.Errorf("the terminal output lacks %q:\n%q", want, out)
		}
	}
}

func TestCLIBadUsageAndKubectlPlugin(t *testing.T) {
	sc := newScenario(t, 1)
	for _, args := range [][]string{{"drain"}, {"drain", "a", "b"}, {"status", "x", "-o", "yaml"}, {"frobnicate"}, {"drain", "x", "--drain-taint-key=not a key!"}} {
		cmd := exec.CommandContext(sc.ctx, sc.env.agentBin, args...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("node-agent %v: %v, want exit status 2\n%s", args, err, out)
		}
		if len(out) == 0 {
			t.Errorf("node-agent %v said nothing", args)
		}
	}
	dir := t.TempDir()
	plugin := filepath.Join(dir, "kubectl-node_agent")
	if err := os.Symlink(sc.env.agentBin, plugin); err != nil {
		t.Fatal(err)
	}
	out, err := exec.CommandContext(sc.ctx, plugin, "status", sc.nodes[0], "--kubeconfig="+sc.env.cluster.Kubeconfig).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "node/"+sc.nodes[0]+": not draining; 0 VMs") {
		t.Errorf("as a kubectl plugin: %v\n%s", err, out)
	}
}

// limitedOperator is a kubeconfig for a service account of the scenario that may read
// and write nodes, read VMIs and pods, but not read the KubeVirt CR.
func (sc *scenario) limitedOperator() (kubeconfig, user string) {
	sc.t.Helper()
	name := "limited-operator"
	if _, err := sc.kube().CoreV1().ServiceAccounts(sc.ns).Create(sc.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: sc.ns + "-" + name},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch", "update", "patch"}},
			{APIGroups: []string{""}, Resources: []string{"pods", "configmaps"}, Verbs: []string{"get", "list", "watch"}},
			{APIGroups: []string{"kubevirt.io"}, Resources: []string{"virtualmachineinstances", "virtualmachines", "virtualmachineinstancemigrations"}, Verbs: []string{"get", "list", "watch"}},
		},
	}
	if _, err := sc.kube().RbacV1().ClusterRoles().Create(sc.ctx, role, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: sc.ns, Name: name}},
	}
	if _, err := sc.kube().RbacV1().ClusterRoleBindings().Create(sc.ctx, binding, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	sc.t.Cleanup(func() {
		ctx := context.Background()
		_ = sc.kube().RbacV1().ClusterRoleBindings().Delete(ctx, binding.Name, metav1.DeleteOptions{})
		_ = sc.kube().RbacV1().ClusterRoles().Delete(ctx, role.Name, metav1.DeleteOptions{})
	})
	return sc.serviceAccountKubeconfig(name)
}

// An operator who cannot read the KubeVirt CR cannot tell the drain taint key: undrain
// and status say so and fail, and change nothing (they used to remove the taint "",
// uncordon the node and say that they succeeded).
func TestCLIUndrainAndStatusFailWhenTheKeyCannotBeRead(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	sc.cordon(node, true)
	kubeconfig, user := sc.limitedOperator()

	for _, cmd := range []string{"undrain", "status"} {
		out, errOut, code := sc.ctlWith(kubeconfig, cmd, node)
		if code != 1 {
			t.Errorf("%s without access to the KubeVirt CR exited %d, want 1\nstdout:\n%s\nstderr:\n%s", cmd, code, out, errOut)
		}
		for _, want := range []string{"cannot tell the drain taint key", "kubevirts", "--drain-taint-key"} {
			if !strings.Contains(errOut, want) {
				t.Errorf("%s: stderr lacks %q:\n%s", cmd, want, errOut)
			}
		}
		n := sc.node(node)
		if !n.Spec.Unschedulable || !agent.HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
			t.Fatalf("%s changed the node: unschedulable %v, taints %v", cmd, n.Spec.Unschedulable, n.Spec.Taints)
		}
	}

	// kubectl's --as, and the key named: status works, with the same identity.
	out, errOut, code := sc.ctl("status", node, "--as="+user, "--drain-taint-key="+nodeinfo.DefaultDrainTaintKey)
	if code != 0 || !strings.Contains(out, "node/"+node+": draining (taint "+nodeinfo.DefaultDrainTaintKey+"), cordoned") {
		t.Errorf("status --as=%s --drain-taint-key exited %d:\n%s\n%s", user, code, out, errOut)
	}
	if out, errOut, code := sc.ctlWith(kubeconfig, "undrain", node, "--drain-taint-key="+nodeinfo.DefaultDrainTaintKey); code != 0 {
		t.Fatalf("undrain --drain-taint-key exited %d:\n%s\n%s", code, out, errOut)
	}
	if n := sc.node(node); n.Spec.Unschedulable || len(n.Spec.Taints) != 0 {
		t.Errorf("after undrain --drain-taint-key: unschedulable %v, taints %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
}
