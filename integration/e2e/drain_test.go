package e2e

// node-agent's drain, end to end: the seed document's flows, each strategy of the
// SPEC's table, and re-enabling the node.

import (
	"net/http"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// The seed's first flow, "evict all VMs on a node", by the drain taint alone: every VM
// leaves as its strategy and owner say, other pods stay, the node reports safe.
func TestDrainEvictsVMsOnly(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.createVM("migrating", liveMigrate, onNode(node))
	always := sc.createVM("always", noneStrategy, onNode(node))
	bare := sc.createVMI("bare", noneStrategy, onNode(node))
	rs := sc.createVMIRS("rs", 1, noneStrategy, onNode(node))
	// Let restarted VMs go anywhere in the pool.
	sc.patchVMNodeSelector("migrating", map[string]string{poolLabel: sc.pool})
	sc.patchVMNodeSelector("always", map[string]string{poolLabel: sc.pool})
	sc.patchVMIRSNodeSelector("rs", map[string]string{poolLabel: sc.pool})
	app := sc.plainPod("app", node)

	a := sc.startAgent(node, "--log-format=json")
	if code, st := a.safeToShutdown(""); code != http.StatusServiceUnavailable || len(st.VMs) != 4 || st.Draining {
		t.Fatalf("before the drain: /safe-to-shutdown %d, %d VMs, draining %v; want 503, 4 VMs, not draining", code, len(st.VMs), st.Draining)
	}

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	st := a.waitSafe(2 * time.Minute)
	if !st.Draining || len(st.VMs) != 0 {
		t.Errorf("after the drain: %+v", st)
	}
	if moved := sc.waitVMIOn("migrating", other); moved.UID != migrating.UID {
		t.Errorf("the LiveMigrate VM was restarted, not migrated")
	}
	if restarted := sc.waitVMIOn("always", other); restarted.UID == always.UID {
		t.Errorf("the runStrategy Always VM did not restart as a new VMI")
	}
	sc.waitStoppedForGood("bare", bare)
	sc.waitReplaced("rs", rs[0], other)
	if p, err := sc.kube().CoreV1().Pods(sc.ns).Get(sc.ctx, app.Name, metav1.GetOptions{}); err != nil || p.DeletionTimestamp != nil {
		t.Errorf("the plain pod was touched without --all-pods: %v", err)
	}
	n := sc.node(node)
	if got := n.Annotations[agent.AnnotationState]; got != "drained: no VM left, safe to power off" {
		t.Errorf("state annotation %q", got)
	}
	for _, reason := range []string{agent.ReasonDrainStarted, agent.ReasonDrainCompleted} {
		sc.nodeEvent(node, reason) // sent in the background: waited for
	}
	if !hasEvent(sc.events(sc.ns, "VirtualMachineInstance", "always"), agent.ReasonShutdownRequested) {
		t.Errorf("no %s event on the VMI it shut down", agent.ReasonShutdownRequested)
	}
	a.checkMetrics(map[string]float64{
		`node_agent_drains_started_total{node="` + node + `",trigger="taint"}`:                        1,
		`node_agent_drain_duration_seconds_count{node="` + node + `",trigger="taint"}`:                1,
		`node_agent_safe_to_shutdown{node="` + node + `"}`:                                            1,
		`node_agent_draining{node="` + node + `"}`:                                                    1,
		`node_agent_eviction_requests_total{action="shutdown",node="` + node + `",outcome="evicted"}`: 3,
	})
	a.checkJSONLogs(sc.ns, "always", "bare")
}
