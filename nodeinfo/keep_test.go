package nodeinfo

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	resourcehelper "k8s.io/component-helpers/resource"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// launcherPodAsKubeVirtMakesIt is a virt-launcher pod shaped as virt-controller
// renders one and the kubelet reports it: a compute container with its requests and
// much else, a restartable init container (a sidecar, whose requests the scheduler
// adds), volumes, statuses, managedFields.
func launcherPodAsKubeVirtMakesIt() *corev1.Pod {
	always := corev1.ContainerRestartPolicyAlways
	requests := func(cpu, mem string) corev1.ResourceRequirements {
		return corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem)},
			Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse(mem)},
		}
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "virt-launcher-vm1-abcde", Namespace: "ns", UID: "pod-uid", ResourceVersion: "42",
			Labels:          map[string]string{kubevirtv1.AppLabel: "virt-launcher", kubevirtv1.CreatedByLabel: "vmi-uid"},
			Annotations:     map[string]string{kubevirtv1.DomainAnnotation: "vm1"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance", Name: "vm1", UID: "vmi-uid"}},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "virt-controller", Operation: metav1.ManagedFieldsOperationUpdate}},
		},
		Spec: corev1.PodSpec{
			NodeName:     "node-a",
			NodeSelector: map[string]string{"kubevirt.io/schedulable": "true", "disk": "ssd"},
			Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
				NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"a"}}}}},
			}}},
			Tolerations: []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "vms", Effect: corev1.TaintEffectNoSchedule}},
			Overhead:    corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("200Mi")},
			Containers: []corev1.Container{{
				Name: "compute", Image: "quay.io/kubevirt/virt-launcher:v1.8.0", Command: []string{"/usr/bin/virt-launcher-monitor", "--qemu-timeout", "300s"},
				Env:          []corev1.EnvVar{{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
				VolumeMounts: []corev1.VolumeMount{{Name: "private", MountPath: "/var/run/kubevirt-private"}},
				Resources:    requests("100m", "1Gi"),
			}, {Name: "volumecontainerdisk", Image: "quay.io/containerdisks/fedora:41", Resources: requests("10m", "40M")}},
			InitContainers: []corev1.Container{
				{Name: "container-disk-binary", Image: "quay.io/kubevirt/virt-launcher:v1.8.0", Resources: requests("10m", "40M")},
				{Name: "sidecar", Image: "example/sidecar", RestartPolicy: &always, Resources: requests("50m", "64Mi")},
			},
			Volumes: []corev1.Volume{{Name: "private", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}}},
		},
		Status: corev1.PodStatus{
			Phase:             corev1.PodRunning,
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
			PodIP:             "10.0.0.7",
			ContainerStatuses: []corev1.ContainerStatus{{Name: "compute", Ready: true, Image: "quay.io/kubevirt/virt-launcher:v1.8.0"}},
		},
	}
}

// The cache keeps of a virt-launcher pod what the agent and fleet.Fits read, and the
// scheduler's sums come out the same as from the whole pod: its requests
// (resourcehelper.PodRequests, with a sidecar's), its node affinity and selector
// against a node, its tolerations. Its images, commands, environment, mounts, volumes
// and statuses are not kept.
func TestKeepPodFields(t *testing.T) {
	whole := launcherPodAsKubeVirtMakesIt()
	got, err := keepPodFields(whole.DeepCopy())
	if err != nil {
		t.Fatal(err)
	}
	kept := got.(*corev1.Pod)
	wantMeta := whole.ObjectMeta
	wantMeta.ManagedFields = nil
	if !reflect.DeepEqual(kept.ObjectMeta, wantMeta) {
		t.Errorf("metadata kept: %+v, want %+v", kept.ObjectMeta, wantMeta)
	}
	for name, pair := range map[string][2]any{
		"node name":     {kept.Spec.NodeName, whole.Spec.NodeName},
		"node selector": {kept.Spec.NodeSelector, whole.Spec.NodeSelector},
		"affinity":      {kept.Spec.Affinity, whole.Spec.Affinity},
		"tolerations":   {kept.Spec.Tolerations, whole.Spec.Tolerations},
		"phase":         {kept.Status.Phase, whole.Status.Phase},
		"conditions":    {kept.Status.Conditions, whole.Status.Conditions},
	} {
		if !reflect.DeepEqual(pair[0], pair[1]) {
			t.Errorf("%s kept: %v, want %v", name, pair[0], pair[1])
		}
	}
	opts := resourcehelper.PodResourcesOptions{}
	if got, want := resourcehelper.PodRequests(kept, opts), resourcehelper.PodRequests(whole, opts); !reflect.DeepEqual(got, want) {
		t.Errorf("requests of the kept pod %v, of the whole pod %v", got, want)
	}
	if req := resourcehelper.PodRequests(kept, opts); req.Memory().Cmp(resource.MustParse("1Gi")) <= 0 {
		t.Fatalf("requests %v: the test's pod should count its overhead and sidecar", req)
	}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b", Labels: map[string]string{"kubevirt.io/schedulable": "true", "disk": "ssd", "zone": "a"}}}
	for _, pod := range []*corev1.Pod{whole, kept} {
		if ok, err := nodeaffinity.GetRequiredNodeAffinity(pod).Match(node); err != nil || !ok {
			t.Errorf("node affinity of %s does not match the node it matches (error %v)", pod.Name, err)
		}
	}
	for _, c := range append(append([]corev1.Container{}, kept.Spec.Containers...), kept.Spec.InitContainers...) {
		if c.Image != "" || c.Command != nil || c.Env != nil || c.VolumeMounts != nil {
			t.Errorf("container %s kept %+v, want only its name, resources and restart policy", c.Name, c)
		}
	}
	if kept.Spec.Volumes != nil || kept.Status.ContainerStatuses != nil || kept.Status.PodIP != "" {
		t.Errorf("kept volumes %v, container statuses %v, pod IP %q: want none", kept.Spec.Volumes, kept.Status.ContainerStatuses, kept.Status.PodIP)
	}
	again, _ := keepPodFields(kept.DeepCopy())
	if !reflect.DeepEqual(again, kept) {
		t.Errorf("keeping the fields of a kept pod changed it: %+v", again)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/virt-launcher-vm1-abcde", Obj: whole}
	if got, err := keepPodFields(tomb); err != nil || got != tomb {
		t.Errorf("a tombstone became %v (error %v), want it unchanged", got, err)
	}
}

// The cache keeps of a VMI what the decision and the report read: metadata, eviction
// strategy, placement, phase, node, conditions, evacuation mark, migration state; not
// its domain, volumes, networks or what the guest reports.
func TestKeepVMIFields(t *testing.T) {
	live := kubevirtv1.EvictionStrategyLiveMigrateIfPossible
	whole := &kubevirtv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{Name: "vm1", Namespace: "ns", UID: "vmi-uid", ResourceVersion: "7",
			Labels:          map[string]string{NodeNameLabel: "node-a"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachine", Name: "vm1", Controller: ptr(true)}},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "virt-handler"}}},
		Spec: kubevirtv1.VirtualMachineInstanceSpec{
			EvictionStrategy: &live,
			NodeSelector:     map[string]string{"disk": "ssd"},
			Affinity:         &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{}},
			Tolerations:      []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpExists}},
			Domain:           kubevirtv1.DomainSpec{Devices: kubevirtv1.Devices{Disks: []kubevirtv1.Disk{{Name: "root"}}}},
			Volumes:          []kubevirtv1.Volume{{Name: "root"}},
			Networks:         []kubevirtv1.Network{{Name: "default"}},
		},
		Status: kubevirtv1.VirtualMachineInstanceStatus{
			Phase:              kubevirtv1.Running,
			NodeName:           "node-a",
			Conditions:         []kubevirtv1.VirtualMachineInstanceCondition{{Type: kubevirtv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionFalse, Reason: "DisksNotLiveMigratable"}},
			EvacuationNodeName: "node-a",
			MigrationState:     &kubevirtv1.VirtualMachineInstanceMigrationState{SourceNode: "node-a", TargetNode: "node-b", MigrationUID: "mig-uid"},
			Interfaces:         []kubevirtv1.VirtualMachineInstanceNetworkInterface{{Name: "default", IP: "10.0.0.7"}},
			VolumeStatus:       []kubevirtv1.VolumeStatus{{Name: "root"}},
			GuestOSInfo:        kubevirtv1.VirtualMachineInstanceGuestOSInfo{Name: "Fedora"},
		},
	}
	got, err := keepVMIFields(whole.DeepCopy())
	if err != nil {
		t.Fatal(err)
	}
	kept := got.(*kubevirtv1.VirtualMachineInstance)
	want := &kubevirtv1.VirtualMachineInstance{ObjectMeta: whole.ObjectMeta,
		Spec: kubevirtv1.VirtualMachineInstanceSpec{EvictionStrategy: whole.Spec.EvictionStrategy, NodeSelector: whole.Spec.NodeSelector,
			Affinity: whole.Spec.Affinity, Tolerations: whole.Spec.Tolerations},
		Status: kubevirtv1.VirtualMachineInstanceStatus{Phase: whole.Status.Phase, NodeName: whole.Status.NodeName, Conditions: whole.Status.Conditions,
			EvacuationNodeName: whole.Status.EvacuationNodeName, MigrationState: whole.Status.MigrationState}}
	want.ManagedFields = nil
	if !reflect.DeepEqual(kept, want) {
		t.Errorf("kept %+v\nwant %+v", kept, want)
	}
	again, _ := keepVMIFields(kept.DeepCopy())
	if !reflect.DeepEqual(again, kept) {
		t.Errorf("keeping the fields of a kept VMI changed it: %+v", again)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/vm1", Obj: whole}
	if got, err := keepVMIFields(tomb); err != nil || got != tomb {
		t.Errorf("a tombstone became %v (error %v), want it unchanged", got, err)
	}
}
