package e2e

import (
	"net/http"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// A host shutdown handled by the deployed agent, end to end: manifests/ applied, the
// agent built by hack/build.sh and run as the DaemonSet's pod runs it on node A (both
// containers with their args and env, no flag of the test's but ports and the token's
// kubeconfig, the lock holder on the real logind through the bus folder as the DaemonSet
// mounts it, the service account's pod-bound token, the own-node admission policy in
// force). logind is asked to power off: the holder's delay lock holds the shutdown while
// the engine taints and cordons node A through the policy and drains it (a LiveMigrate
// VM migrates to node B, a None VM is evicted through the Eviction API and starts again
// on B); /safe-to-shutdown says 200, the lock is released and logind starts the poweroff
// job only then. The shutdown is then cancelled: the node is given back and the lock held
// again. What an operator would check: logind's list of inhibitors, the VMs' placement,
// the Nodes' taints and cordon, the events; and the API server's audit log shows that
// the agent's Node writes all went to node A and were let through.
//
// Broken deployments this fails on (each tried by hand): the DaemonSet without the
// system-dbus volume mount (the holder finds no bus: the engine never gets ready), the
// ClusterRole without "update" on nodes (the agent cannot take its node out of service).
func TestDeployAgentHoldsAHostShutdown(t *testing.T) {
	bin := buildWithBuildScript(t)
	sc := newClusterWideScenario(t, 2) // manifests/: cluster-scoped objects
	nodeA, nodeB := sc.nodes[0], sc.nodes[1]
	sc.applyManifests()
	d := sc.agentPodOn(nodeA)
	kube, _ := sc.tokenClient(d.token)
	bus := sc.startLogind()
	sc.waitOwnNodePolicy(kube, nodeA, nodeB)

	// The LiveMigrate VM's migration takes a few seconds, so that the hold can be seen.
	live := sc.pinned("live", nodeA, liveMigrate, sim.WithMigrationDuration(6*time.Second))
	none := sc.pinned("none", nodeA, noneStrategy)
	nonePod := sc.launcherPod(none, nodeA)
	engine, holder := sc.startDeployed(bin, d, nodeA, bus)
	sc.waitInhibitDelayMax(bus, d.holderShutdownTimeout(t))
	vms := sc.watchVMs(nodeA)
	bootID := sc.node(nodeA).Status.NodeInfo.BootID

	asked := sc.powerOff(bus)
	sc.waitOutOfService(nodeA, bootID)
	engine.waitStatus(time.Minute, "the LiveMigrate VM migrating for the host shutdown", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "live")
		return st.Draining && st.Trigger == agent.TriggerShutdown && v != nil && v.State == agent.StateMigrating
	})
	// Held: logind still lists the holder's lock and has not started the poweroff job.
	sc.waitLock(bus, holder)
	if at, started, err := bus.StartUnitAt(sc.ctx, powerOffUnit, asked); err != nil || started {
		t.Errorf("logind started %s at %s (%v) while a VM was still migrating", powerOffUnit, at.Format(time.StampMicro), err)
	}
	sc.nodeEvent(nodeA, agent.ReasonShutdownDelayed)

	sc.waitMigrated(live, nodeB)
	sc.waitRestarted(none, nodeB)
	sc.waitReleasedWhenEmpty(bus, holder, vms, asked, 2*time.Minute)
	list, err := bus.Inhibitors(sc.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ours := agentLocks(list, holder); len(ours) != 0 {
		t.Errorf("logind still lists the holder's lock after the release: %+v", ours)
	}
	if code, st := engine.safeToShutdown(""); code != http.StatusOK || !st.Safe || len(st.VMs) != 0 {
		t.Errorf("/safe-to-shutdown after the release: %s", statusJSON(code, st))
	}
	if ev := sc.nodeEvent(nodeA, agent.ReasonShutdownReleased); ev.Type != corev1.EventTypeNormal {
		t.Errorf("%s event %s %q, want Normal", ev.Reason, ev.Type, ev.Message)
	}
	sc.nodeEvent(nodeA, agent.ReasonDrainStarted)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "none", agent.ReasonShutdownRequested, time.Minute)
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "live", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on the LiveMigrate VM", n, agent.ReasonShutdownRequested)
	}
	if hasEvent(sc.events(metav1.NamespaceDefault, "Node", nodeA), agent.ReasonShutdownNotHeld) {
		t.Errorf("a %s event for a shutdown the holder held", agent.ReasonShutdownNotHeld)
	}
	engine.checkMetrics(map[string]float64{
		`node_agent_drains_started_total{node="` + nodeA + `",trigger="shutdown"}`: 1,
		`node_agent_shutdown_releases_total{node="` + nodeA + `",outcome="safe"}`:  1,
	})
	sc.waitOutOfService(nodeA, bootID) // still, until the host is back or the shutdown cancelled
	if n := sc.node(nodeB); n.Spec.Unschedulable || hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) || n.Annotations[agent.AnnotationOwned] != "" {
		t.Errorf("node B was changed: unschedulable %v, taints %v, annotations %v", n.Spec.Unschedulable, n.Spec.Taints, n.Annotations)
	}
	// The same cordon on node B with the agent's token: the policy refuses it.
	sc.checkNodePatch(kube, nodePatch{what: "cordoning node B during node A's shutdown", node: nodeB, patch: `{"spec":{"unschedulable":true}}`,
		want: "may change only that Node, not " + nodeB})
	sc.checkShutdownRequests(asked, nodeA, nonePod)

	// The shutdown cancelled: the agent gives the node back and the holder holds the
	// lock again.
	if n, err := bus.CancelJobs(sc.ctx); err != nil || n < 1 {
		t.Fatalf("cancelling the poweroff job: %d jobs, %v", n, err)
	}
	sc.waitGivenBack(nodeA, "cancelled")
	sc.waitLock(bus, holder)
	engine.waitStatus(30*time.Second, "the agent to stop draining", http.StatusOK, func(st agent.NodeStatus) bool { return !st.Draining })
	if code, body := engine.get("/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after the cancelled shutdown: %d %s", code, body)
	}
	sc.waitVMIOn("live", nodeB)
	sc.waitVMIOn("none", nodeB)
}

// checkShutdownRequests reads the deployed agent's requests since from in the API
// server's audit log: each write of a Node went to node and was let through (RBAC and
// the admission policy), and the None VM's virt-launcher pod was evicted through the
// Eviction API.
func (sc *scenario) checkShutdownRequests(from time.Time, node string, nonePod *corev1.Pod) {
	sc.t.Helper()
	evs, err := agentRequests(sc.env.cluster.AuditLog, deployUser, agentUserAgent)
	if err != nil {
		sc.t.Fatal(err)
	}
	writes, evicted := 0, false
	for _, ev := range evs {
		if ev.Stamp.Before(from) || ev.ObjectRef == nil {
			continue
		}
		code := 0
		if ev.ResponseStatus != nil {
			code = ev.ResponseStatus.Code
		}
		ref := ev.ObjectRef
		switch {
		case ref.Resource == "nodes" && (ev.Verb == "update" || ev.Verb == "patch"):
			writes++
			if ref.Name != node || code >= 300 {
				sc.t.Errorf("the agent's %s of node %s: %d %s", ev.Verb, ref.Name, code, ev.RequestURI)
			}
		case ref.Resource == "pods" && ref.Subresource == "eviction" && ref.Namespace == nonePod.Namespace && ref.Name == nonePod.Name:
			evicted = evicted || (code >= 200 && code < 300)
		}
	}
	sc.t.Logf("the agent wrote node %s %d times during the shutdown", node, writes)
	if writes == 0 {
		sc.t.Errorf("no write of node %s by the agent in the audit log", node)
	}
	if !evicted {
		sc.t.Errorf("no eviction of the None VM's pod %s by the agent was let through", nonePod.Name)
	}
}
