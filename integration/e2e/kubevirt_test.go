package e2e

// KubeVirt's own drain behaviour, driven as a user would (no node-agent): these
// tests show that the test cluster behaves like a real KubeVirt cluster, so that the
// agent's tests mean something.

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// evictPod evicts a pod through the Eviction API once, as kubectl drain does.
func (sc *scenario) evictPod(pod *corev1.Pod) error {
	return sc.kube().CoreV1().RESTClient().Post().Namespace(pod.Namespace).Resource("pods").Name(pod.Name).
		SubResource("eviction").MaxRetries(0).
		Body(&policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace}}).
		Do(sc.ctx).Error()
}

func is429(err error) bool {
	var status apierrors.APIStatus
	return errors.As(err, &status) && status.Status().Code == http.StatusTooManyRequests
}

// An eviction of a migratable LiveMigrate VM is refused with 429, marks the VMI for
// evacuation, and KubeVirt migrates it; the old pod ends Succeeded.
func TestKubeVirtEvictionMigratesLiveMigrateVM(t *testing.T) {
	sc := newScenario(t, 2)
	vmi := sc.createVM("vm", sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate))
	source := vmi.Status.NodeName
	pod := sc.launcherPod(vmi, source)

	err := sc.evictPod(pod)
	if !is429(err) || !strings.Contains(err.Error(), "triggered evacuation") {
		t.Fatalf("evicting %s: got %v, want 429 'Eviction triggered evacuation'", pod.Name, err)
	}
	if got := sc.vmi("vm").Status.EvacuationNodeName; got != source {
		t.Errorf("status.evacuationNodeName = %q, want %q", got, source)
	}
	sc.waitVMIOffNode("vm", source)
	ms := sc.migrationsOf("vm")
	if len(ms) == 0 {
		t.Fatal("no VirtualMachineInstanceMigration was created")
	}
	if ms[0].Annotations[kubevirtv1.EvacuationMigrationAnnotation] != source {
		t.Errorf("migration %s is not KubeVirt's evacuation of %s: annotations %v", ms[0].Name, source, ms[0].Annotations)
	}
	if after := sc.vmi("vm"); after.UID != vmi.UID {
		t.Errorf("the VMI was replaced (uid %s -> %s), not migrated", vmi.UID, after.UID)
	}
	sc.eventually(time.Minute, "the old virt-launcher pod to be Succeeded", func() (bool, string) {
		phase, ok := sc.podPhase(pod.Namespace, pod.Name, pod.UID)
		return ok && phase == corev1.PodSucceeded, string(phase)
	})
}

// Evicting a None VM shuts it down: runStrategy Always restarts it elsewhere, a bare
// VMI stays gone, a VMIRS replaces its VMI elsewhere.
func TestKubeVirtEvictionShutsDownNoneVMs(t *testing.T) {
	sc := newScenario(t, 2)
	none := sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyNone)
	vm := sc.createVM("always", none, sim.WithNodeSelector(map[string]string{"kubernetes.io/hostname": sc.nodes[0]}))
	bare := sc.createVMI("bare", none, sim.WithNodeSelector(map[string]string{"kubernetes.io/hostname": sc.nodes[0]}))
	rs := sc.createVMIRS("rs", 1, none)
	node := sc.nodes[0]
	// Like kubectl drain: cordon, then evict what is on the node.
	sc.cordon(node, true)
	// The VM and the bare VMI are pinned to node 0; let the VM move when it restarts.
	sc.patchVMNodeSelector("always", map[string]string{poolLabel: sc.pool})
	rsVMI := rs[0]
	for _, v := range []*kubevirtv1.VirtualMachineInstance{vm, bare, rsVMI} {
		if v.Status.NodeName != node {
			continue
		}
		if err := sc.evictPod(sc.launcherPod(v, node)); err != nil {
			t.Fatalf("evicting the pod of %s (strategy None): %v, want it allowed", v.Name, err)
		}
	}
	if _, err := sc.env.sim.WaitForNewVMI(sc.ctx, sc.ns, "always", vm.UID); err != nil {
		t.Fatal(err)
	}
	restarted := sc.waitVMIOn("always", sc.nodes[1])
	if restarted.UID == vm.UID {
		t.Error("the runStrategy Always VM was not restarted as a new VMI")
	}
	sc.waitStoppedForGood("bare", bare)
	if rsVMI.Status.NodeName == node {
		vmis, err := sc.env.sim.WaitForVMIs(sc.ctx, sc.ns, sim.LabelVMIRS+"=rs", "replaced on the other node", func(vs []*kubevirtv1.VirtualMachineInstance) bool {
			for _, v := range vs {
				if v.UID != rsVMI.UID && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName == sc.nodes[1] {
					return true
				}
			}
			return false
		})
		if err != nil {
			t.Fatalf("the VMIRS replacement: %v (%d VMIs)", err, len(vmis))
		}
	}
}

func (sc *scenario) patchVMNodeSelector(name string, sel map[string]string) {
	sc.t.Helper()
	sc.setTemplateNodeSelector(nodeinfo.ResourceVMs, name, sel)
}

// The seed document's legacy path: the drain taint makes KubeVirt migrate the node's
// LiveMigrate VMs, on the default key and on a custom nodeDrainTaintKey.
func TestKubeVirtDrainTaintMigrates(t *testing.T) {
	t.Parallel() // its subtests run one after another (newClusterWideScenario in a subtest)
	for _, key := range []string{nodeinfo.DefaultDrainTaintKey, "example.com/custom-drain"} {
		t.Run(strings.ReplaceAll(key, "/", "_"), func(t *testing.T) {
			sc := newClusterWideScenario(t, 2)
			if key != nodeinfo.DefaultDrainTaintKey {
				sc.setDrainTaintKey(key)
			}
			vmi := sc.createVM("vm", sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate))
			source := vmi.Status.NodeName
			sc.taint(source, key)
			moved := sc.waitVMIOffNode("vm", source)
			if moved.UID != vmi.UID {
				t.Errorf("the VMI was replaced, not migrated")
			}
		})
	}
}

// setDrainTaintKey sets the KubeVirt CR's nodeDrainTaintKey for the test, and puts
// the previous value back after it.
func (sc *scenario) setDrainTaintKey(key string) {
	sc.t.Helper()
	var previous *string
	sc.changeKubeVirtConfig("setting the KubeVirt CR's nodeDrainTaintKey", func(c *kubevirtv1.KubeVirtConfiguration) {
		if c.MigrationConfiguration == nil {
			c.MigrationConfiguration = &kubevirtv1.MigrationConfiguration{}
		}
		previous = c.MigrationConfiguration.NodeDrainTaintKey
		c.MigrationConfiguration.NodeDrainTaintKey = ptr.To(key)
	}, func(c *kubevirtv1.KubeVirtConfiguration) {
		c.MigrationConfiguration.NodeDrainTaintKey = previous
	})
}

// changeKubeVirtConfig changes the KubeVirt CR's configuration with set for the test
// (what says how, in errors), and with undo after it.
func (sc *scenario) changeKubeVirtConfig(what string, set, undo func(*kubevirtv1.KubeVirtConfiguration)) {
	sc.t.Helper()
	sc.changeClusterConfig(what)
	if err := sc.env.cluster.UpdateKubeVirtConfiguration(sc.ctx, set); err != nil {
		sc.t.Fatalf("%s: %v", what, err)
	}
	sc.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := sc.env.cluster.UpdateKubeVirtConfiguration(ctx, undo); err != nil {
			sc.t.Errorf("undoing %s: %v", what, err)
		}
	})
}

// With five LiveMigrate VMs on one node, KubeVirt runs at most
// parallelOutboundMigrationsPerNode (2) at a time, and retries a failed migration.
func TestKubeVirtMigrationLimitsAndRetry(t *testing.T) {
	sc := newScenario(t, 1)
	source := sc.nodes[0]
	opts := []sim.VMOption{sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate), sim.WithMigrationDuration(3 * time.Second)}
	for i, name := range []string{"vm0", "vm1", "vm2", "vm3", "vm4"} {
		o := opts
		if i == 0 {
			o = append(o, sim.WithMigrationFailures(1))
		}
		sc.createVM(name, o...)
	}
	sc.addNode()

	// Count the migrations running at once, from a watch of their phases.
	w, err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceMigrations).
		Param("watch", "true").Watch(sc.ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var mu sync.Mutex
	active := map[string]bool{}
	maxActive, failed := 0, 0
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			m, ok := ev.Object.(*kubevirtv1.VirtualMachineInstanceMigration)
			if !ok || ev.Type == watch.Error {
				continue
			}
			mu.Lock()
			switch m.Status.Phase {
			case kubevirtv1.MigrationScheduling, kubevirtv1.MigrationScheduled, kubevirtv1.MigrationPreparingTarget,
				kubevirtv1.MigrationTargetReady, kubevirtv1.MigrationRunning:
				active[m.Name] = true
			case kubevirtv1.MigrationFailed:
				if active[m.Name] {
					failed++
				}
				delete(active, m.Name)
			default:
				delete(active, m.Name)
			}
			if len(active) > maxActive {
				maxActive = len(active)
			}
			mu.Unlock()
		}
	}()

	sc.taint(source, nodeinfo.DefaultDrainTaintKey)
	for _, name := range []string{"vm0", "vm1", "vm2", "vm3", "vm4"} {
		sc.waitVMIOffNode(name, source)
	}
	w.Stop()
	<-done
	mu.Lock()
	defer mu.Unlock()
	if maxActive > 2 {
		t.Errorf("%d migrations ran at once from one node, want at most parallelOutboundMigrationsPerNode=2", maxActive)
	}
	if maxActive < 2 {
		t.Errorf("at most %d migration ran at once: the limit was not reached, the test shows nothing", maxActive)
	}
	if failed < 1 {
		t.Errorf("the injected migration failure was not seen")
	}
	if n := len(sc.migrationsOf("vm0")); n < 2 {
		t.Errorf("vm0 has %d migrations, want a failed one and its retry", n)
	}
}

// A LiveMigrate VM that cannot migrate is never evicted: 429 "not live-migratable".
func TestKubeVirtEvictionRefusesNonMigratableLiveMigrateVM(t *testing.T) {
	sc := newScenario(t, 2)
	vmi := sc.createVM("vm", sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate), sim.WithBridgeInterface())
	if migratableCondition(vmi) != corev1.ConditionFalse {
		t.Fatalf("the VMI with a bridge interface on the pod network is not reported non-migratable: %+v", vmi.Status.Conditions)
	}
	pod := sc.launcherPod(vmi, vmi.Status.NodeName)
	err := sc.evictPod(pod)
	if !is429(err) || !strings.Contains(err.Error(), "not live-migratable") {
		t.Fatalf("evicting %s: got %v, want 429 'not live-migratable'", pod.Name, err)
	}
	after := sc.vmi("vm")
	if after.Status.EvacuationNodeName != "" || after.Status.Phase != kubevirtv1.Running {
		t.Errorf("the VMI changed: evacuationNodeName %q phase %s", after.Status.EvacuationNodeName, after.Status.Phase)
	}
	if p, err := sc.kube().CoreV1().Pods(pod.Namespace).Get(sc.ctx, pod.Name, metav1.GetOptions{}); err != nil || p.DeletionTimestamp != nil {
		t.Errorf("the virt-launcher pod was deleted: %v", err)
	}
}

// virt-api's webhooks work as KubeVirt's install registers them: a VMI created
// without an evictionStrategy gets the cluster's (the VMI mutator writes it into
// the spec) and runs; a VMI with an invalid spec is refused by the VMI validator.
func TestKubeVirtWebhooksDefaultAndValidate(t *testing.T) {
	sc := newClusterWideScenario(t, 1)
	if err := sc.setClusterEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible); err != nil {
		t.Fatal(err)
	}
	vmi := sc.createVMI("plain")
	if got := vmi.Spec.EvictionStrategy; got == nil || *got != kubevirtv1.EvictionStrategyLiveMigrateIfPossible {
		t.Errorf("spec.evictionStrategy of a VMI created without one = %v, want the cluster's %s", got, kubevirtv1.EvictionStrategyLiveMigrateIfPossible)
	}
	if !slices.Contains(vmi.Finalizers, kubevirtv1.VirtualMachineInstanceFinalizer) {
		t.Errorf("the VMI has no %s finalizer (the mutator's): %v", kubevirtv1.VirtualMachineInstanceFinalizer, vmi.Finalizers)
	}

	bad := sim.NewVMI(sc.ns, "bad", sc.vmOpts([]sim.VMOption{sim.WithEvictionStrategy("MoveItSomehow")})...)
	err := sc.env.sim.Create(sc.ctx, bad)
	if !apierrors.IsInvalid(err) && !apierrors.IsBadRequest(err) || !strings.Contains(err.Error(), "evictionStrategy") ||
		!strings.Contains(err.Error(), "virtualmachineinstances-create-validator.kubevirt.io") {
		t.Errorf("creating a VMI with evictionStrategy MoveItSomehow: got %v, want a refusal by the VMI validator naming evictionStrategy", err)
	}
	if v := sc.vmi("bad"); v != nil {
		t.Errorf("the invalid VMI was stored: %s", describeVMI(v))
	}
}

func migratableCondition(vmi *kubevirtv1.VirtualMachineInstance) corev1.ConditionStatus {
	for _, c := range vmi.Status.Conditions {
		if c.Type == kubevirtv1.VirtualMachineInstanceIsMigratable {
			return c.Status
		}
	}
	return ""
}
