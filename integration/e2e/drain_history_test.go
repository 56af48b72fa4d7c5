package e2e

// Drains on nodes with a history: VMs that arrived by live migration drain like any
// other (issue 9).

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// Rolling maintenance of three nodes in turn, with the agent's own taint key (which
// KubeVirt's evacuation controller does not act on): drain node 0, re-enable it,
// drain node 1, re-enable it, drain node 2. The node after the one drained is the only
// one open (the others are cordoned, as an operator steering the rollout would), so
// from the second drain on, every LiveMigrate VM on the drained node came there by a
// live migration, in a pod that keeps KubeVirt's kubevirt.io/migrationJobUID label.
// Every drain empties its node; LiveMigrate VMs migrate each time (same VMI), the
// None VM is shut down each time (runStrategy Always starts it on the open node); after
// every step: no second unfinished migration of a VMI, no LiveMigrate VM shut down, no
// VM left on the drained node. While VMs migrate into a node, its agent reports their
// target pods as incoming-migration.
func TestDrainRollingMaintenance(t *testing.T) {
	sc := newScenario(t, 3)
	flag := "--drain-taint-key=" + agentOnlyKey
	live := []string{"lm0", "lm1", "lm2"}
	vmis := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, name := range live {
		vmis[name] = sc.pinned(name, sc.nodes[0], liveMigrate, sim.WithMigrationDuration(2*time.Second))
	}
	vmis["none"] = sc.pinned("none", sc.nodes[0], noneStrategy)
	migrations := sc.watchMigrations()
	defer migrations.stop()
	agents := make([]*agentProc, len(sc.nodes))
	for i, node := range sc.nodes {
		agents[i] = sc.startAgent(node, flag)
	}

	for i, node := range sc.nodes {
		next := sc.nodes[(i+1)%len(sc.nodes)]
		for _, n := range sc.nodes {
			sc.cordon(n, n != next && n != node)
		}
		onNode := sc.vmisOn(node)
		if i > 0 {
			sc.checkMigratedIn(node, live)
		}
		incoming := sc.watchIncoming(agents[(i+1)%len(agents)])
		sc.taint(node, agentOnlyKey)
		st := agents[i].waitSafe(2 * time.Minute)
		if !st.Draining || len(st.VMs) != 0 {
			t.Errorf("drain %d (%s): status %s", i, node, statusJSON(http.StatusOK, st))
		}
		for _, name := range live {
			if onNode[name] {
				sc.waitMigrated(vmis[name], next)
			}
		}
		if onNode["none"] {
			sc.waitRestarted(vmis["none"], next)
			vmis["none"] = sc.vmi("none")
		}
		if seen := incoming.stop(); onNode["lm0"] && !seen {
			t.Errorf("drain %d: the agent on %s never reported an incoming-migration while VMs migrated into it", i, next)
		}
		sc.checkRollingInvariants(node, live, vmis, migrations)

		sc.untaint(node, agentOnlyKey)
		agents[i].waitStatus(time.Minute, "node "+node+" re-enabled", http.StatusOK, func(st agent.NodeStatus) bool { return !st.Draining })
	}
	for _, n := range sc.nodes {
		sc.cordon(n, false)
	}
	for _, name := range live {
		if n := len(migrations.of(name)); n != len(sc.nodes) {
			t.Errorf("VMI %s had %d migrations over %d drains, want one per drain", name, n, len(sc.nodes))
		}
	}
}

// vmisOn says which VMs of the scenario run on node.
func (sc *scenario) vmisOn(node string) map[string]bool {
	sc.t.Helper()
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(sc.ctx).Into(list); err != nil {
		sc.t.Fatal(err)
	}
	on := map[string]bool{}
	for _, v := range list.Items {
		if v.Status.NodeName == node && !v.IsFinal() {
			on[v.Name] = true
		}
	}
	return on
}

// checkMigratedIn checks that the LiveMigrate VMs on node run in a pod that a
// migration brought there and that still carries KubeVirt's migration label (as
// KubeVirt's migration controller leaves it): the history this test is about.
func (sc *scenario) checkMigratedIn(node string, names []string) {
	sc.t.Helper()
	for _, name := range names {
		vmi := sc.vmi(name)
		if vmi == nil || vmi.Status.NodeName != node {
			sc.t.Fatalf("VM %s is not on %s before its drain", name, node)
		}
		pod := sc.launcherPod(vmi, node)
		if _, ok := pod.Labels[kubevirtv1.MigrationJobLabel]; !ok {
			sc.t.Errorf("VM %s runs on %s in pod %s without the %s label: not a migrated-in VM", name, node, pod.Name, kubevirtv1.MigrationJobLabel)
		}
	}
}

// checkRollingInvariants checks, after a drain of node: no VM and no running
// virt-launcher pod left on it; every LiveMigrate VM still runs as the same VMI and
// was never asked to shut down; no VMI ever had two unfinished migrations.
func (sc *scenario) checkRollingInvariants(node string, live []string, vmis map[string]*kubevirtv1.VirtualMachineInstance, m *unfinishedMigrations) {
	sc.t.Helper()
	if on := sc.vmisOn(node); len(on) != 0 {
		sc.t.Errorf("after draining %s: VMs still there: %v", node, on)
	}
	pods, err := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node, LabelSelector: "kubevirt.io=virt-launcher"})
	if err != nil {
		sc.t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			sc.t.Errorf("after draining %s: virt-launcher pod %s is %s", node, p.Name, p.Status.Phase)
		}
	}
	for _, name := range live {
		v := sc.vmi(name)
		if v == nil || v.UID != vmis[name].UID || v.Status.Phase != kubevirtv1.Running {
			sc.t.Errorf("after draining %s: LiveMigrate VM %s was not kept running as the same VMI: %v", node, name, v)
		}
		if n := sc.eventCount(sc.ns, "VirtualMachineInstance", name, agent.ReasonShutdownRequested); n != 0 {
			sc.t.Errorf("after draining %s: %d %s events on LiveMigrate VM %s", node, n, agent.ReasonShutdownRequested, name)
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, v := range m.violations {
		sc.t.Errorf("after draining %s: %s", node, v)
	}
	m.violations = nil
}

// of lists the names of the migrations seen for a VMI.
func (u *unfinishedMigrations) of(vmi string) []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	var out []string
	for name := range u.all[vmi] {
		out = append(out, name)
	}
	return out
}

// incomingWatch polls an agent's /safe-to-shutdown for a VM reported as
// incoming-migration.
type incomingWatch struct {
	done chan struct{}
	seen chan bool
}

func (sc *scenario) watchIncoming(a *agentProc) *incomingWatch {
	w := &incomingWatch{done: make(chan struct{}), seen: make(chan bool, 1)}
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		seen := false
		for {
			select {
			case <-w.done:
				w.seen <- seen
				return
			case <-tick.C:
			}
			if seen {
				continue
			}
			_, body := a.get("/safe-to-shutdown")
			var st agent.NodeStatus
			if json.Unmarshal([]byte(body), &st) == nil {
				for _, v := range st.VMs {
					seen = seen || v.State == agent.StateIncoming
				}
			}
		}
	}()
	return w
}

func (w *incomingWatch) stop() bool {
	close(w.done)
	return <-w.seen
}
