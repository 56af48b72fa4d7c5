package sim_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// One cluster and one simulator for the whole package; tests isolate themselves
// with a namespace and a pool of nodes of their own.
var env struct {
	cluster *cluster.Cluster
	sim     *sim.Sim
}

const poolLabel = "sim.node-agent.test/pool"

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	startCtx, startCancel := context.WithTimeout(ctx, 30*time.Minute)
	defer startCancel()
	c, err := cluster.Start(startCtx, cluster.Options{
		Out: os.Stderr,
		KubeVirtConfiguration: kubevirtv1.KubeVirtConfiguration{
			DeveloperConfiguration: &kubevirtv1.DeveloperConfiguration{FeatureGates: []string{"HostDevices"}},
		},
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting the cluster: %v\n", err)
		return 1
	}
	code := 1
	defer func() {
		if code != 0 {
			c.DumpLogs(os.Stderr, 4000)
		}
		c.Stop(code != 0)
	}()
	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.InfoLevel)
	if lvl, err := logrus.ParseLevel(os.Getenv("SIM_LOG_LEVEL")); err == nil {
		log.SetLevel(lvl)
	}
	s, err := sim.Start(ctx, c.RESTConfig, sim.Options{Log: log})
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting the simulators: %v\n", err)
		return 1
	}
	env.cluster, env.sim = c, s
	code = m.Run()
	return code
}

// setup makes a namespace and n nodes labelled with a pool of the test's own,
// and returns the namespace, the nodes and the VM option selecting the pool.
func setup(t *testing.T, ctx context.Context, n int, opts ...sim.NodeOption) (string, []string, sim.VMOption) {
	t.Helper()
	name := strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := env.cluster.Kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	pool := map[string]string{poolLabel: name}
	var nodes []string
	for i := range n {
		node := fmt.Sprintf("%s-%d", name, i)
		if _, err := env.sim.AddNode(ctx, node, append([]sim.NodeOption{sim.WithNodeLabels(pool)}, opts...)...); err != nil {
			t.Fatalf("adding node: %v", err)
		}
		nodes = append(nodes, node)
	}
	return name, nodes, sim.WithNodeSelector(pool)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func condition(v *kubevirtv1.VirtualMachineInstance, t kubevirtv1.VirtualMachineInstanceConditionType) *kubevirtv1.VirtualMachineInstanceCondition {
	if v == nil {
		return nil
	}
	for i := range v.Status.Conditions {
		if v.Status.Conditions[i].Type == t {
			return &v.Status.Conditions[i]
		}
	}
	return nil
}

func inPool(nodes []string, node string) bool {
	for _, n := range nodes {
		if n == node {
			return true
		}
	}
	return false
}

func TestVMRunsLiveMigratable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, nodes, pool := setup(t, ctx, 2)
	vm := sim.NewVM(ns, "vm", pool, sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate))
	if err := env.sim.Create(ctx, vm); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if !inPool(nodes, vmi.Status.NodeName) {
		t.Errorf("VMI on node %q, outside the pool %v", vmi.Status.NodeName, nodes)
	}
	if got := vmi.Labels[kubevirtv1.NodeNameLabel]; got != vmi.Status.NodeName {
		t.Errorf("label %s = %q, want %q", kubevirtv1.NodeNameLabel, got, vmi.Status.NodeName)
	}
	if c := condition(vmi, kubevirtv1.VirtualMachineInstanceIsMigratable); c == nil || c.Status != corev1.ConditionTrue {
		t.Errorf("LiveMigratable = %+v, want True", c)
	}
	if vmi.Status.SelinuxContext != "none" {
		t.Errorf("selinuxContext %q, want none", vmi.Status.SelinuxContext)
	}
	pod, err := env.sim.LauncherPod(ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if pod.Status.Phase != corev1.PodRunning || pod.Status.PodIP == "" {
		t.Errorf("virt-launcher pod phase %q IP %q, want Running with an IP", pod.Status.Phase, pod.Status.PodIP)
	}
	// virt-controller copies the pod's readiness (with its readiness gate) to the VMI.
	if _, err := env.sim.WaitForVMI(ctx, ns, "vm", "Ready", func(v *kubevirtv1.VirtualMachineInstance) bool {
		c := condition(v, kubevirtv1.VirtualMachineInstanceReady)
		return c != nil && c.Status == corev1.ConditionTrue
	}); err != nil {
		t.Error(err)
	}
	// Deleting the VM stops the guest; the finalizers go and so do VMI and pod.
	if err := env.cluster.KubeVirt.Delete().Namespace(ns).Resource(nodeinfo.ResourceVMs).Name("vm").Do(ctx).Error(); err != nil {
		t.Fatal(err)
	}
	if err := env.sim.WaitForVMIGone(ctx, ns, "vm"); err != nil {
		t.Error(err)
	}
	if _, err := env.sim.WaitForPod(ctx, ns, pod.Name, "gone", func(p *corev1.Pod) bool { return p == nil }); err != nil {
		t.Error(err)
	}
}

func TestNotLiveMigratable(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	const gpu = "example.com/fake-gpu"
	ns, _, pool := setup(t, ctx, 1, sim.WithAllocatable(corev1.ResourceList{gpu: resource.MustParse("4")}))
	for name, c := range map[string]struct {
		opt    sim.VMOption
		reason string
	}{
		"hostdev": {sim.WithHostDevice("gpu1", gpu), kubevirtv1.VirtualMachineInstanceReasonHostDeviceNotMigratable},
		"bridge":  {sim.WithBridgeInterface(), kubevirtv1.VirtualMachineInstanceReasonInterfaceNotMigratable},
	} {
		if err := env.sim.Create(ctx, sim.NewVMI(ns, name, pool, c.opt,
			sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate))); err != nil {
			t.Fatal(err)
		}
		vmi, err := env.sim.WaitForVMIRunning(ctx, ns, name)
		if err != nil {
			t.Fatal(err)
		}
		cond := condition(vmi, kubevirtv1.VirtualMachineInstanceIsMigratable)
		if cond == nil || cond.Status != corev1.ConditionFalse || cond.Reason != c.reason {
			t.Errorf("%s: LiveMigratable = %+v, want False/%s", name, cond, c.reason)
		}
		// virt-api refuses to evict a LiveMigrate VMI that cannot migrate.
		pod, err := env.sim.LauncherPod(ns, name)
		if err != nil {
			t.Fatal(err)
		}
		ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: pod.Name}}
		if err := env.cluster.Kube.CoreV1().Pods(ns).EvictV1(ctx, ev); !apierrors.IsTooManyRequests(err) ||
			!strings.Contains(err.Error(), "not live-migratable") {
			t.Errorf("%s: eviction answered %v, want 429 not live-migratable", name, err)
		}
	}
}

// TestUnschedulableUntilNodeAppears: a pod no node fits stays Pending with
// PodScheduled=False/Unschedulable and is scheduled once a fitting node comes.
func TestUnschedulableUntilNodeAppears(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 1)
	zone := map[string]string{"sim.node-agent.test/zone": ns + "-b"}
	if err := env.sim.Create(ctx, sim.NewVMI(ns, "vmi", pool, sim.WithNodeSelector(zone))); err != nil {
		t.Fatal(err)
	}
	if _, err := env.sim.WaitForVMI(ctx, ns, "vmi", "unschedulable", func(v *kubevirtv1.VirtualMachineInstance) bool {
		c := condition(v, kubevirtv1.VirtualMachineInstanceConditionType(corev1.PodScheduled))
		return c != nil && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable
	}); err != nil {
		t.Fatal(err)
	}
	node := ns + "-b"
	if _, err := env.sim.AddNode(ctx, node, sim.WithNodeLabels(map[string]string{poolLabel: ns}), sim.WithNodeLabels(zone)); err != nil {
		t.Fatal(err)
	}
	if _, err := env.sim.WaitForVMIOnNode(ctx, ns, "vmi", node); err != nil {
		t.Fatal(err)
	}
}

func TestMigration(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 2)
	if err := env.sim.Create(ctx, sim.NewVM(ns, "vm", pool)); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	source := vmi.Status.NodeName
	sourcePod, err := env.sim.LauncherPod(ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	mig := sim.NewMigration(ns, "mig", "vm")
	if err := env.sim.Create(ctx, mig); err != nil {
		t.Fatal(err)
	}
	m, err := env.sim.WaitForMigrationPhase(ctx, ns, "mig", kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed)
	if err != nil {
		t.Fatal(err)
	}
	if m.Status.Phase != kubevirtv1.MigrationSucceeded {
		t.Fatalf("migration %s, want Succeeded: %+v", m.Status.Phase, m.Status.MigrationState)
	}
	vmi, err = env.sim.WaitForVMI(ctx, ns, "vm", "moved off "+source, func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.NodeName != source && v.Status.MigrationState != nil && v.Status.MigrationState.Completed &&
			v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] == ""
	})
	if err != nil {
		t.Fatal(err)
	}
	if vmi.Labels[kubevirtv1.NodeNameLabel] != vmi.Status.NodeName || vmi.Status.Phase != kubevirtv1.Running {
		t.Errorf("after migration: phase %s node %s label %s", vmi.Status.Phase, vmi.Status.NodeName, vmi.Labels[kubevirtv1.NodeNameLabel])
	}
	if _, err := env.sim.WaitForPod(ctx, ns, sourcePod.Name, "Succeeded", func(p *corev1.Pod) bool {
		return p != nil && p.Status.Phase == corev1.PodSucceeded
	}); err != nil {
		t.Error(err)
	}
	// And back: the anti-affinity keeps the target off the current node.
	if err := env.sim.Create(ctx, sim.NewMigration(ns, "back", "vm")); err != nil {
		t.Fatal(err)
	}
	if m, err := env.sim.WaitForMigrationPhase(ctx, ns, "back", kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed); err != nil {
		t.Fatal(err)
	} else if m.Status.Phase != kubevirtv1.MigrationSucceeded {
		t.Fatalf("migration back %s, want Succeeded", m.Status.Phase)
	}
	if _, err := env.sim.WaitForVMIOnNode(ctx, ns, "vm", source); err != nil {
		t.Error(err)
	}
}

func TestMigrationFailure(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 2)
	if err := env.sim.Create(ctx, sim.NewVMI(ns, "vmi", pool, sim.WithMigrationFailures(1))); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vmi")
	if err != nil {
		t.Fatal(err)
	}
	source := vmi.Status.NodeName
	if err := env.sim.Create(ctx, sim.NewMigration(ns, "fails", "vmi")); err != nil {
		t.Fatal(err)
	}
	m, err := env.sim.WaitForMigrationPhase(ctx, ns, "fails", kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed)
	if err != nil {
		t.Fatal(err)
	}
	if m.Status.Phase != kubevirtv1.MigrationFailed {
		t.Fatalf("first migration %s, want Failed", m.Status.Phase)
	}
	vmi, err = env.sim.WaitForVMI(ctx, ns, "vmi", "failed migration cleaned up", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] == "" &&
			v.Status.MigrationState != nil && v.Status.MigrationState.Failed
	})
	if err != nil {
		t.Fatal(err)
	}
	if vmi.Status.NodeName != source || vmi.Status.Phase != kubevirtv1.Running ||
		vmi.Status.MigrationState == nil || !vmi.Status.MigrationState.Failed || vmi.Status.MigrationState.FailureReason == "" {
		t.Errorf("after the failure: phase %s node %s (source %s) state %+v", vmi.Status.Phase, vmi.Status.NodeName, source, vmi.Status.MigrationState)
	}
	// The second attempt succeeds.
	if err := env.sim.Create(ctx, sim.NewMigration(ns, "works", "vmi")); err != nil {
		t.Fatal(err)
	}
	if m, err := env.sim.WaitForMigrationPhase(ctx, ns, "works", kubevirtv1.MigrationSucceeded, kubevirtv1.MigrationFailed); err != nil {
		t.Fatal(err)
	} else if m.Status.Phase != kubevirtv1.MigrationSucceeded {
		t.Fatalf("second migration %s, want Succeeded", m.Status.Phase)
	}
}

func TestLauncherPodDeletedVMRestartsElsewhere(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 2)
	if err := env.sim.Create(ctx, sim.NewVM(ns, "vm", pool)); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	first := vmi.Status.NodeName
	cordon(t, ctx, first)
	pod, err := env.sim.LauncherPod(ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := env.cluster.Kube.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	next, err := env.sim.WaitForNewVMI(ctx, ns, "vm", vmi.UID)
	if err != nil {
		t.Fatal(err)
	}
	if next.Status.NodeName == first {
		t.Errorf("new VMI on the cordoned node %s", first)
	}
	if _, err := env.sim.WaitForPod(ctx, ns, pod.Name, "gone", func(p *corev1.Pod) bool { return p == nil }); err != nil {
		t.Error(err)
	}
}

func TestEvictionAndReboot(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, nodes, pool := setup(t, ctx, 2)

	// A bare VMI without eviction strategy: the eviction is allowed, the guest
	// shuts down, the VMI ends Succeeded and stays so.
	if err := env.sim.Create(ctx, sim.NewVMI(ns, "bare", pool, sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyNone))); err != nil {
		t.Fatal(err)
	}
	bare, err := env.sim.WaitForVMIRunning(ctx, ns, "bare")
	if err != nil {
		t.Fatal(err)
	}
	pod, err := env.sim.LauncherPod(ns, "bare")
	if err != nil {
		t.Fatal(err)
	}
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: pod.Name}}
	if err := env.cluster.Kube.CoreV1().Pods(ns).EvictV1(ctx, ev); err != nil {
		t.Fatalf("evicting %s: %v", pod.Name, err)
	}
	if _, err := env.sim.WaitForVMIPhase(ctx, ns, "bare", kubevirtv1.Succeeded); err != nil {
		t.Fatal(err)
	}
	if _, err := env.sim.WaitForPod(ctx, ns, pod.Name, "gone", func(p *corev1.Pod) bool { return p == nil }); err != nil {
		t.Error(err)
	}

	// A VMIRS replaces a VMI whose pod is deleted.
	if err := env.sim.Create(ctx, sim.NewVMIRS(ns, "rs", 1, pool)); err != nil {
		t.Fatal(err)
	}
	rsVMI := waitReplicaRunning(t, ctx, ns, "rs", "")
	rsPod, err := env.sim.LauncherPod(ns, rsVMI.Name)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.cluster.Kube.CoreV1().Pods(ns).Delete(ctx, rsPod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitReplicaRunning(t, ctx, ns, "rs", rsVMI.UID)

	// A reboot kills the guest: the VM (runStrategy Always) gets a new VMI.
	if err := env.sim.Create(ctx, sim.NewVM(ns, "vm", pool)); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	node, err := env.cluster.Kube.CoreV1().Nodes().Get(ctx, vmi.Status.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	oldBoot := node.Status.NodeInfo.BootID
	if err := env.sim.Reboot(ctx, vmi.Status.NodeName); err != nil {
		t.Fatal(err)
	}
	if _, err := env.sim.WaitForNewVMI(ctx, ns, "vm", vmi.UID); err != nil {
		t.Fatal(err)
	}
	node, err = env.cluster.Kube.CoreV1().Nodes().Get(ctx, vmi.Status.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if node.Status.NodeInfo.BootID == oldBoot {
		t.Error("the boot ID did not change")
	}

	// The bare VMI was not brought back.
	var got kubevirtv1.VirtualMachineInstance
	if err := env.cluster.KubeVirt.Get().Namespace(ns).Resource(nodeinfo.ResourceVMIs).Name("bare").Do(ctx).Into(&got); err != nil {
		t.Fatal(err)
	}
	if got.UID != bare.UID || got.Status.Phase != kubevirtv1.Succeeded {
		t.Errorf("bare VMI: uid %s phase %s, want the old one Succeeded", got.UID, got.Status.Phase)
	}
	_ = nodes
}

// waitReplicaRunning waits for a Running VMI of the VMIRS other than notUID.
func waitReplicaRunning(t *testing.T, ctx context.Context, ns, rs string, notUID types.UID) *kubevirtv1.VirtualMachineInstance {
	t.Helper()
	var found *kubevirtv1.VirtualMachineInstance
	_, err := env.sim.WaitForVMIs(ctx, ns, sim.LabelVMIRS+"="+rs, "a new Running replica", func(vmis []*kubevirtv1.VirtualMachineInstance) bool {
		for _, v := range vmis {
			if v.UID != notUID && v.Status.Phase == kubevirtv1.Running {
				found = v
				return true
			}
		}
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

func cordon(t *testing.T, ctx context.Context, node string) {
	t.Helper()
	patch := []byte(`{"spec":{"unschedulable":true}}`)
	if _, err := env.cluster.Kube.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatalf("cordoning %s: %v", node, err)
	}
}

// TestEvictionEvacuates drives KubeVirt's real drain path: the eviction of a
// LiveMigrate VM's pod is refused by virt-api, which marks the VMI for
// evacuation; virt-controller's evacuation and migration controllers migrate it,
// and the simulated handlers carry the migration out.
func TestEvictionEvacuates(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 2)
	vm := sim.NewVM(ns, "vm", pool, sim.WithEvictionStrategy(kubevirtv1.EvictionStrategyLiveMigrate))
	if err := env.sim.Create(ctx, vm); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	source := vmi.Status.NodeName
	cordon(t, ctx, source)
	pod, err := env.sim.LauncherPod(ns, "vm")
	if err != nil {
		t.Fatal(err)
	}
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: pod.Name}}
	err = env.cluster.Kube.CoreV1().Pods(ns).EvictV1(ctx, ev)
	if !apierrors.IsTooManyRequests(err) {
		t.Fatalf("evicting %s: %v, want 429 (evacuation triggered)", pod.Name, err)
	}
	vmi, err = env.sim.WaitForVMI(ctx, ns, "vm", "evacuated", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName != source &&
			v.Status.EvacuationNodeName == "" && v.Status.MigrationState != nil && v.Status.MigrationState.Completed
	})
	if err != nil {
		t.Fatal(err)
	}
	if vmi.Status.MigrationState.SourceNode != source {
		t.Errorf("migration source %q, want %q", vmi.Status.MigrationState.SourceNode, source)
	}
	if _, err := env.sim.WaitForPod(ctx, ns, pod.Name, "Succeeded", func(p *corev1.Pod) bool {
		return p != nil && p.Status.Phase == corev1.PodSucceeded
	}); err != nil {
		t.Error(err)
	}
}

// TestMigrationAbort deletes a running migration: virt-controller asks for the
// abort through migrationState.abortRequested and the source handler aborts.
func TestMigrationAbort(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	ns, _, pool := setup(t, ctx, 2)
	if err := env.sim.Create(ctx, sim.NewVMI(ns, "vmi", pool, sim.WithMigrationDuration(time.Minute))); err != nil {
		t.Fatal(err)
	}
	vmi, err := env.sim.WaitForVMIRunning(ctx, ns, "vmi")
	if err != nil {
		t.Fatal(err)
	}
	source := vmi.Status.NodeName
	if err := env.sim.Create(ctx, sim.NewMigration(ns, "slow", "vmi")); err != nil {
		t.Fatal(err)
	}
	if _, err := env.sim.WaitForMigrationPhase(ctx, ns, "slow", kubevirtv1.MigrationRunning); err != nil {
		t.Fatal(err)
	}
	if err := env.cluster.KubeVirt.Delete().Namespace(ns).Resource(nodeinfo.ResourceMigrations).Name("slow").Do(ctx).Error(); err != nil {
		t.Fatal(err)
	}
	vmi, err = env.sim.WaitForVMI(ctx, ns, "vmi", "aborted", func(v *kubevirtv1.VirtualMachineInstance) bool {
		if v == nil {
			return false
		}
		ms := v.Status.MigrationState
		return ms != nil && ms.AbortStatus == kubevirtv1.MigrationAbortSucceeded &&
			v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] == ""
	})
	if err != nil {
		t.Fatal(err)
	}
	if vmi.Status.NodeName != source || vmi.Status.Phase != kubevirtv1.Running {
		t.Errorf("after the abort: phase %s node %s, want Running on %s", vmi.Status.Phase, vmi.Status.NodeName, source)
	}
}
