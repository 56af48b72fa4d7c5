package e2e

// The workstation commands (node-agent drain, undrain, status), run as an operator
// would: the real binary, with the cluster's kubeconfig, through a pipe or a
// pseudo-terminal.

import (
	"bytes"
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

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// ctl runs a workstation command; it returns stdout, stderr and the exit status.
func (sc *scenario) ctl(args ...string) (string, string, int) {
	sc.t.Helper()
	cmd := exec.CommandContext(sc.ctx, sc.env.agentBin, append(args, "--kubeconfig="+sc.env.cluster.Kubeconfig)...)
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
