package e2e

// node-agent's drain flows, end to end: the seed document's second flow (--all-pods),
// a drain taint key from the KubeVirt CR (changed live) and from the legacy
// kubevirt-config ConfigMap, re-enabling the node, and each row of the SPEC's table.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// agentOnlyKey is a drain taint key that only the agent knows (given with
// --drain-taint-key): KubeVirt's own evacuation controller does not react to it, so
// whatever moves a VM is the agent's doing.
const agentOnlyKey = "e2e.node-agent.test/drain"

// eventCount is how many times an event with reason was recorded about an object,
// counting the repeats that a recorder folds into one Event.
func (sc *scenario) eventCount(namespace, kind, name, reason string) int {
	sc.t.Helper()
	n := 0
	for _, e := range sc.events(namespace, kind, name) {
		if e.Reason != reason {
			continue
		}
		if e.Count > 1 {
			n += int(e.Count)
		} else {
			n++
		}
	}
	return n
}

// waitEvent waits for an event with reason about an object, and returns it.
func (sc *scenario) waitEvent(namespace, kind, name, reason string, timeout time.Duration) corev1.Event {
	sc.t.Helper()
	var found corev1.Event
	sc.eventually(timeout, reason+" event on "+kind+" "+name, func() (bool, string) {
		evs := sc.events(namespace, kind, name)
		var seen []string
		for _, e := range evs {
			if e.Reason == reason {
				found = e
				return true, ""
			}
			seen = append(seen, e.Reason)
		}
		return false, fmt.Sprintf("events %v", seen)
	})
	return found
}

// nodeEvent waits for an event with reason on the Node (Node events are in "default").
func (sc *scenario) nodeEvent(node, reason string) corev1.Event {
	sc.t.Helper()
	return sc.waitEvent(metav1.NamespaceDefault, "Node", node, reason, time.Minute)
}

// pinned creates a VM on node, then lets it go anywhere in the pool, so that a
// migration or a restart can take it to another node.
func (sc *scenario) pinned(name, node string, opts ...sim.VMOption) *kubevirtv1.VirtualMachineInstance {
	sc.t.Helper()
	vmi := sc.createVM(name, append(opts, onNode(node))...)
	sc.patchVMNodeSelector(name, map[string]string{poolLabel: sc.pool})
	return vmi
}

// waitMigrated waits until the VMI runs on to, and checks it is the same VMI (a live
// migration, not a restart).
func (sc *scenario) waitMigrated(before *kubevirtv1.VirtualMachineInstance, to string) {
	sc.t.Helper()
	after := sc.waitVMIOn(before.Name, to)
	if after.UID != before.UID {
		sc.t.Errorf("VM %s was restarted (uid %s -> %s), not live-migrated", before.Name, before.UID, after.UID)
	}
}

// waitRestarted waits until a new VMI of the VM runs on to (the old one was shut down).
func (sc *scenario) waitRestarted(before *kubevirtv1.VirtualMachineInstance, to string) {
	sc.t.Helper()
	if _, err := sc.env.sim.WaitForNewVMI(sc.ctx, sc.ns, before.Name, before.UID); err != nil {
		sc.t.Fatal(err)
	}
	if after := sc.waitVMIOn(before.Name, to); after.UID == before.UID {
		sc.t.Errorf("VM %s was not restarted as a new VMI", before.Name)
	}
}

// statusJSON renders a /safe-to-shutdown answer for a failure message.
func statusJSON(code int, st agent.NodeStatus) string {
	raw, _ := json.Marshal(st)
	return fmt.Sprintf("%d %s", code, raw)
}

// waitStatus waits until /safe-to-shutdown answers code and cond holds.
func (a *agentProc) waitStatus(timeout time.Duration, what string, code int, cond func(agent.NodeStatus) bool) agent.NodeStatus {
	a.sc.t.Helper()
	var st agent.NodeStatus
	a.sc.eventually(timeout, what, func() (bool, string) {
		var got int
		got, st = a.safeToShutdown("")
		return got == code && cond(st), statusJSON(got, st)
	})
	return st
}

// vmStatus returns the agent's entry for a VM, or nil.
// migratingOrNoRoom: the VM is reported migrating, or blocked only because its
// migration's target pod cannot be scheduled (a pool of one node: no room elsewhere).
func migratingOrNoRoom(v *agent.VMStatus) bool {
	return v != nil && (v.State == agent.StateMigrating ||
		v.State == agent.StateBlocked && v.Migration != nil && strings.Contains(v.Detail, "its target pod cannot be scheduled"))
}

func vmStatus(st agent.NodeStatus, ns, name string) *agent.VMStatus {
	for i := range st.VMs {
		if st.VMs[i].Namespace == ns && st.VMs[i].Name == name {
			return &st.VMs[i]
		}
	}
	return nil
}

// setClusterEvictionStrategy sets the KubeVirt CR's spec.configuration.evictionStrategy
// for the test and puts the previous value back after it. It returns the API
// server's error, if it refuses the value. For a value KubeVirt knows it waits until
// virt-api defaults new VMIs to it (virt-api reads the CR through an informer), and
// after the test until virt-api is back to the previous one.
func (sc *scenario) setClusterEvictionStrategy(s kubevirtv1.EvictionStrategy) error {
	sc.t.Helper()
	sc.changeClusterConfig("setting the KubeVirt CR's evictionStrategy")
	var previous *kubevirtv1.EvictionStrategy
	err := sc.env.cluster.UpdateKubeVirtConfiguration(sc.ctx, func(c *kubevirtv1.KubeVirtConfiguration) {
		previous = c.EvictionStrategy
		c.EvictionStrategy = ptr.To(s)
	})
	if err != nil {
		return err
	}
	sc.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := sc.env.cluster.UpdateKubeVirtConfiguration(ctx, func(c *kubevirtv1.KubeVirtConfiguration) {
			c.EvictionStrategy = previous
		}); err != nil {
			sc.t.Errorf("restoring the cluster's evictionStrategy: %v", err)
			return
		}
		want := kubevirtv1.EvictionStrategyNone // KubeVirt's default
		if previous != nil {
			want = *previous
		}
		if err := sc.waitDefaultEvictionStrategy(ctx, want); err != nil {
			sc.t.Errorf("restoring the cluster's evictionStrategy: %v", err)
		}
	})
	switch s {
	case kubevirtv1.EvictionStrategyNone, kubevirtv1.EvictionStrategyLiveMigrate,
		kubevirtv1.EvictionStrategyLiveMigrateIfPossible, kubevirtv1.EvictionStrategyExternal:
		if err := sc.waitDefaultEvictionStrategy(sc.ctx, s); err != nil {
			sc.t.Fatal(err)
		}
	}
	return nil
}

// waitDefaultEvictionStrategy waits until virt-api's VMI mutator gives a new VMI
// without an evictionStrategy of its own the strategy s, asking with dry-run
// creations (the webhooks run, nothing is stored).
func (sc *scenario) waitDefaultEvictionStrategy(ctx context.Context, s kubevirtv1.EvictionStrategy) error {
	var last string
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		got := &kubevirtv1.VirtualMachineInstance{}
		err := sc.env.cluster.KubeVirt.Post().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).
			Param("dryRun", metav1.DryRunAll).Body(sim.NewVMI(sc.ns, "default-probe")).Do(ctx).Into(got)
		switch {
		case err != nil:
			last = err.Error()
		case got.Spec.EvictionStrategy == nil:
			last = "no evictionStrategy"
		default:
			last = string(*got.Spec.EvictionStrategy)
		}
		return last == string(s), nil
	})
	if err != nil {
		return fmt.Errorf("waiting for virt-api to give new VMIs evictionStrategy %s (last: %s): %w", s, last, err)
	}
	return nil
}

// withoutOwnEvictionStrategy removes the VMI's own spec.evictionStrategy, as a VMI
// created by a KubeVirt before the field was defaulted has none: then the cluster's
// applies. Only KubeVirt's own programs may change a VMI's spec (virt-api's VMI
// update webhook), so this acts as virt-controller.
func (sc *scenario) withoutOwnEvictionStrategy(name string) {
	sc.t.Helper()
	kv, err := sc.env.cluster.KubeVirtClientAs(cluster.VirtControllerServiceAccount)
	if err != nil {
		sc.t.Fatal(err)
	}
	err = wait.PollUntilContextTimeout(sc.ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		cur := sc.vmi(name)
		cur.Spec.EvictionStrategy = nil
		err := kv.Put().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Name(name).Body(cur).Do(ctx).Error()
		return err == nil, ignoreConflict(err)
	})
	if err != nil {
		sc.t.Fatalf("removing the evictionStrategy of VMI %s: %v", name, err)
	}
	if got := sc.vmi(name).Spec.EvictionStrategy; got != nil {
		sc.t.Fatalf("VMI %s still has evictionStrategy %s", name, *got)
	}
}

// legacyConfigMap creates the kubevirt-config ConfigMap of the seed document with
// data.migrations, and deletes it after the test.
func (sc *scenario) legacyConfigMap(migrations string) {
	sc.t.Helper()
	sc.changeClusterConfig("creating the kubevirt-config ConfigMap")
	cm := &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: nodeinfo.LegacyConfigMapName, Namespace: cluster.KubeVirtNamespace, Labels: map[string]string{"kubevirt.io": ""}},
		Data:       map[string]string{"feature-gates": "LiveMigration", "migrations": migrations},
	}
	if _, err := sc.kube().CoreV1().ConfigMaps(cm.Namespace).Create(sc.ctx, cm, metav1.CreateOptions{}); err != nil {
		sc.t.Fatalf("creating the kubevirt-config ConfigMap: %v", err)
	}
	sc.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := sc.kube().CoreV1().ConfigMaps(cm.Namespace).Delete(ctx, cm.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			sc.t.Errorf("deleting the kubevirt-config ConfigMap: %v", err)
		}
	})
}

// podGone says whether the pod (this UID) no longer exists.
func (sc *scenario) podGone(p *corev1.Pod) bool {
	sc.t.Helper()
	got, err := sc.kube().CoreV1().Pods(p.Namespace).Get(sc.ctx, p.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return true
	}
	if err != nil {
		sc.t.Fatalf("reading pod %s: %v", p.Name, err)
	}
	return got.UID != p.UID
}

// podUntouched fails the test unless the pod still exists, is not being deleted and runs.
func (sc *scenario) podUntouched(p *corev1.Pod, why string) {
	sc.t.Helper()
	got, err := sc.kube().CoreV1().Pods(p.Namespace).Get(sc.ctx, p.Name, metav1.GetOptions{})
	switch {
	case err != nil:
		sc.t.Errorf("%s: pod %s: %v", why, p.Name, err)
	case got.UID != p.UID || got.DeletionTimestamp != nil || got.Status.Phase != corev1.PodRunning:
		sc.t.Errorf("%s: pod %s was touched: uid %s (was %s), deleting %v, phase %s", why, p.Name, got.UID, p.UID, got.DeletionTimestamp != nil, got.Status.Phase)
	}
}

// The seed's second flow, "evict all VMs and pods" (--all-pods): an unmanaged pod and
// a pod with an emptyDir are evicted, a DaemonSet's pod stays, a PodDisruptionBudget
// is honoured, the VMs leave as usual, and /safe-to-shutdown counts the pods left
// until they are gone.
func TestDrainAllPods(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	always := sc.pinned("always", node, noneStrategy)

	scratch := sc.plainPod("scratch", node, func(p *corev1.Pod) {
		p.Spec.Volumes = []corev1.Volume{{Name: "scratch", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "scratch", MountPath: "/scratch"}}
	})
	held := sc.plainPod("held", node, func(p *corev1.Pod) { p.Labels = map[string]string{"app": "held"} })
	pdb, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "held"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(1)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{"app": "held"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dsLabels := map[string]string{"app": "node-daemon"}
	ds, err := sc.kube().AppsV1().DaemonSets(sc.ns).Create(sc.ctx, &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "node-daemon"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: dsLabels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: dsLabels},
				Spec: corev1.PodSpec{
					NodeSelector: map[string]string{poolLabel: sc.pool},
					Containers:   []corev1.Container{{Name: "daemon", Image: "registry.example/daemon:1"}},
				},
			},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	daemon := sc.daemonSetPod(ds, node) // made by the DaemonSet controller
	for _, p := range []*corev1.Pod{scratch, held, daemon} {
		if _, err := sc.env.sim.WaitForPod(sc.ctx, sc.ns, p.Name, "Running", func(p *corev1.Pod) bool {
			return p != nil && p.Status.Phase == corev1.PodRunning
		}); err != nil {
			t.Fatal(err)
		}
	}

	a := sc.startAgent(node, "--all-pods", "--pod-eviction-retry=1s")
	sc.taint(node, nodeinfo.DefaultDrainTaintKey)

	sc.waitMigrated(migrating, other)
	sc.waitRestarted(always, other)
	sc.eventually(time.Minute, "the emptyDir pod to be evicted", func() (bool, string) { return sc.podGone(scratch), "" })
	// The budget holds the last pod: the node is not safe while it is there.
	a.waitStatus(time.Minute, "only the budget-held pod left", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Draining && len(st.VMs) == 0 && st.PodsLeft == 1
	})
	sc.podUntouched(held, "the PodDisruptionBudget allows no disruption")
	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, pdb.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// The pod's eviction backs off (1 s doubling, at most a minute apart).
	st := a.waitSafe(2 * time.Minute)
	if st.PodsLeft != 0 || len(st.VMs) != 0 {
		t.Errorf("safe with %d pods and %d VMs left", st.PodsLeft, len(st.VMs))
	}
	if !sc.podGone(held) {
		t.Error("the unmanaged pod was not evicted once its budget was gone")
	}
	sc.podUntouched(daemon, "a DaemonSet's pod stays (--ignore-daemonsets)")
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "always", agent.ReasonShutdownRequested); n != 1 {
		t.Errorf("%d %s events on the None VM, want 1", n, agent.ReasonShutdownRequested)
	}
}

// The drain taint key comes from the KubeVirt CR's migrations.nodeDrainTaintKey, and a
// change of it applies without restarting the agent.
func TestDrainTaintKeyFromKubeVirtCRLive(t *testing.T) {
	sc := newClusterWideScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	always := sc.pinned("always", node, noneStrategy)
	a := sc.startAgent(node)
	if _, st := a.safeToShutdown(""); st.TaintKey != nodeinfo.DefaultDrainTaintKey {
		t.Fatalf("taint key at start %q, want the default %q", st.TaintKey, nodeinfo.DefaultDrainTaintKey)
	}

	const key = "example.com/maintenance"
	sc.setDrainTaintKey(key)
	a.waitStatus(30*time.Second, "the agent to take the new key", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.TaintKey == key && !st.Draining
	})
	sc.taint(node, key)
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(migrating, other)
	// KubeVirt's evacuation controller leaves a None VM alone: the agent shut it down.
	sc.waitRestarted(always, other)
	if ev := sc.nodeEvent(node, agent.ReasonDrainStarted); !strings.Contains(ev.Message, key) {
		t.Errorf("DrainStarted does not name the key %s: %q", key, ev.Message)
	}
}

// The seed document's kubevirt-config ConfigMap (data.migrations: nodeDrainTaintKey),
// which KubeVirt itself no longer reads: the agent's eviction is what moves the VM.
func TestDrainTaintKeyFromLegacyConfigMap(t *testing.T) {
	const key = "mytaint/drain"
	sc := newClusterWideScenario(t, 2)
	sc.legacyConfigMap("nodeDrainTaintKey: " + key)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	a := sc.startAgent(node)
	a.waitStatus(30*time.Second, "the agent to take the ConfigMap's key", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.TaintKey == key && st.ConfigError == ""
	})

	sc.taint(node, key)
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(migrating, other)
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "migrating", agent.ReasonMigrationRequested); n != 1 {
		t.Errorf("%d %s events, want 1: the agent's eviction moved the VM", n, agent.ReasonMigrationRequested)
	}
}

// Re-enabling the node after a drain, as the seed document says (kubectl taint ... -,
// kubectl uncordon): the agent stops draining, forgets its drain record, and a new VM
// runs on the node again.
func TestDrainReenableNode(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migrating := sc.pinned("migrating", node, liveMigrate)
	a := sc.startAgent(node)

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	sc.cordon(node, true) // kubectl drain cordons
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(migrating, other)
	if _, ok := sc.node(node).Annotations[agent.AnnotationDrain]; !ok {
		t.Fatalf("no drain record %s on the drained node", agent.AnnotationDrain)
	}

	sc.untaint(node, nodeinfo.DefaultDrainTaintKey)
	sc.cordon(node, false)
	a.waitStatus(30*time.Second, "the agent to report the node not draining", http.StatusOK, func(st agent.NodeStatus) bool {
		return !st.Draining
	})
	sc.eventually(30*time.Second, "the drain record to be removed", func() (bool, string) {
		raw, ok := sc.node(node).Annotations[agent.AnnotationDrain]
		return !ok, raw
	})
	again := sc.createVM("again", onNode(node))
	if again.Status.NodeName != node {
		t.Fatalf("the new VM runs on %s, want %s", again.Status.NodeName, node)
	}
	st := a.waitStatus(30*time.Second, "the new VM to be listed, not drained", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return vmStatus(st, sc.ns, "again") != nil
	})
	if v := vmStatus(st, sc.ns, "again"); st.Draining || v.State != agent.StateRunning {
		t.Errorf("the new VM: draining %v, state %s", st.Draining, v.State)
	}
	n := sc.node(node)
	if n.Spec.Unschedulable || hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("the node is not re-enabled: unschedulable %v, taints %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
}

func hasTaintKey(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
}

// LiveMigrateIfPossible: a migratable VM is live-migrated (same VMI, other node), one
// that is not (a bridge on the pod network) is shut down and, runStrategy Always,
// restarted elsewhere as a new VMI. The key is the agent's own, so both moves are
// the agent's doing.
func TestDrainLiveMigrateIfPossible(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	migratable := sc.pinned("migratable", node, ifPossible)
	bridged := sc.pinned("bridged", node, ifPossible, notMigratable)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)
	st := a.waitStatus(30*time.Second, "both VMs listed", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return len(st.VMs) == 2 })
	if v := vmStatus(st, sc.ns, "bridged"); v == nil || v.Action != agent.ActionShutdown {
		t.Errorf("the non-migratable VM's predicted action: %+v, want %s", v, agent.ActionShutdown)
	}

	sc.taint(node, agentOnlyKey)
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(migratable, other)
	sc.waitRestarted(bridged, other)
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "migratable", agent.ReasonMigrationRequested); n != 1 {
		t.Errorf("%d %s events on the migratable VM, want 1", n, agent.ReasonMigrationRequested)
	}
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "bridged", agent.ReasonShutdownRequested); n != 1 {
		t.Errorf("%d %s events on the non-migratable VM, want 1", n, agent.ReasonShutdownRequested)
	}
}

// External: the agent requests the eviction, KubeVirt marks the VMI
// (status.evacuationNodeName) and nothing else happens until the external controller
// acts; the node is not safe meanwhile.
func TestDrainExternal(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	vmi := sc.createVMI("capk", external, onNode(node))
	// Its slow migration lets the agent look at the node a few times meanwhile.
	slow := sc.pinned("slow", node, liveMigrate, sim.WithMigrationDuration(3*time.Second))
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "capk", "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == node
	}); err != nil {
		t.Fatal(err)
	}
	sc.waitMigrated(slow, other)
	st := a.waitStatus(30*time.Second, "only the VM waiting for the external controller", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "capk")
		return len(st.VMs) == 1 && v != nil && v.State == agent.StateWaitingExternal
	})
	if v := vmStatus(st, sc.ns, "capk"); v.Strategy != string(kubevirtv1.EvictionStrategyExternal) {
		t.Errorf("strategy %q, want External", v.Strategy)
	}
	// Requested once, not again at each look while the VM waits.
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "capk", agent.ReasonExternalRequested); n != 1 {
		t.Errorf("%d %s events, want 1", n, agent.ReasonExternalRequested)
	}
	after := sc.vmi("capk")
	if after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the External VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
	sc.podUntouched(sc.launcherPod(vmi, node), "External: nothing but the external controller moves the VM")

	// The external controller tears the VM down.
	if err := sc.env.cluster.KubeVirt.Delete().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Name("capk").Do(sc.ctx).Error(); err != nil {
		t.Fatal(err)
	}
	a.waitSafe(time.Minute)
}

// The KubeVirt CR's spec.configuration.evictionStrategy applies to a VMI that has
// none of its own: LiveMigrate there, so the VM is migrated, not shut down.
// (virt-api writes the cluster's value into every new VMI; a VMI without one was
// made by a KubeVirt before the field was defaulted.)
func TestDrainClusterEvictionStrategy(t *testing.T) {
	sc := newClusterWideScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	plain := sc.pinned("plain", node)
	sc.withoutOwnEvictionStrategy("plain")
	if err := sc.setClusterEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate); err != nil {
		t.Fatal(err)
	}
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)
	a.waitStatus(30*time.Second, "the cluster's strategy to apply", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "plain")
		return v != nil && v.Strategy == string(kubevirtv1.EvictionStrategyLiveMigrate) && v.Action == agent.ActionMigrate
	})

	sc.taint(node, agentOnlyKey)
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(plain, other)
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "plain", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on a VM the cluster says to migrate", n, agent.ReasonShutdownRequested)
	}
}
