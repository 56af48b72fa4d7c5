package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/node-agent/node-agent/agent"
)

// Without a system bus the agent keeps draining on the taint; /readyz and the metrics
// say that host shutdowns are not held. The drain taint key is one KubeVirt does not
// watch (its evacuation controller would move the VM on kubevirt.io/drain by itself):
// the VM leaves only if the agent drains.
func TestShutdownNoBusIsDegradedNotDown(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	vmi := sc.createVM("vm", liveMigrate, onNode(node))
	sc.patchVMNodeSelector("vm", map[string]string{poolLabel: sc.pool})

	addr := freeAddr(t)
	noBus := "DBUS_SYSTEM_BUS_ADDRESS=unix:path=" + filepath.Join(t.TempDir(), "no-bus-here")
	a := sc.spawnAgent(sc.env.agentBin, node, addr, []string{"run", "--kubeconfig=" + sc.env.cluster.Kubeconfig,
		"--node-name=" + node, "--listen-address=" + addr, "--resync=1s", "--shutdown-inhibitor=true", "--drain-taint-key=" + agentOnlyKey,
		"--logind-dropin-dir="}, []string{noBus})
	a.waitServing("/healthz", 60*time.Second)
	sc.eventually(time.Minute, "/readyz to say the inhibitor is degraded", func() (bool, string) {
		code, body := a.get("/readyz")
		return code == http.StatusServiceUnavailable && strings.Contains(body, "shutdown inhibitor degraded"), body
	})
	a.checkMetrics(map[string]float64{
		`node_agent_inhibitor_lock_held{node="` + node + `"}`: 0,
		`node_agent_logind_connected{node="` + node + `"}`:    0,
	})

	sc.taint(node, agentOnlyKey)
	a.waitSafe(2 * time.Minute)
	if moved := sc.waitVMIOn("vm", other); moved.UID != vmi.UID {
		t.Error("the VM was not migrated")
	}
	// The events are sent in the background: wait for them, as a user watching would.
	for _, reason := range []string{agent.ReasonDrainStarted, agent.ReasonDrainCompleted} {
		sc.nodeEvent(node, reason)
	}
	select {
	case <-a.exited:
		t.Fatalf("the agent exited: %s", a.logTail())
	default:
	}
}
