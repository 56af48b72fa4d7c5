package nodeinfo

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// What the View's caches keep of an object: what the agent and the drain command read
// of it, not the whole object (the use client-go documents for a transform). Each
// function is an informer's transform: it sees a decoded object before the cache does
// and returns a new, smaller one (the decoded object, and the list it came in, are
// left to the collector). A virt-launcher pod is mostly its containers' images,
// commands, environment, mounts and probes, its volumes and the containers' statuses;
// a VMI its domain, disks, networks and the guest's interfaces and volumes as
// reported: none of that is read. Code that reads another field of a cached pod or
// VMI adds it here (TestKeptFieldsAreWhatTheAgentReads lists them).

// keepPodFields keeps of a virt-launcher pod its metadata (without managedFields),
// where it runs and where it could run again (node name, node selector, affinity,
// tolerations: fleet.Fits places it), what it requests as the scheduler counts it
// (resourcehelper.PodRequests: each container's and init container's resources and
// restart policy, the pod's overhead and pod-level resources), and its phase and
// conditions.
func keepPodFields(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return stripManagedFields(obj)
	}
	kept := &corev1.Pod{
		TypeMeta:   pod.TypeMeta,
		ObjectMeta: pod.ObjectMeta,
		Spec: corev1.PodSpec{
			NodeName:       pod.Spec.NodeName,
			NodeSelector:   pod.Spec.NodeSelector,
			Affinity:       pod.Spec.Affinity,
			Tolerations:    pod.Spec.Tolerations,
			Overhead:       pod.Spec.Overhead,
			Resources:      pod.Spec.Resources,
			Containers:     requestsOnly(pod.Spec.Containers),
			InitContainers: requestsOnly(pod.Spec.InitContainers),
		},
		Status: corev1.PodStatus{
			Phase:      pod.Status.Phase,
			Conditions: pod.Status.Conditions,
		},
	}
	kept.ManagedFields = nil
	return kept, nil
}

// requestsOnly keeps of containers their names, resources and restart policies (a
// restartable init container's requests count as a sidecar's).
func requestsOnly(containers []corev1.Container) []corev1.Container {
	if len(containers) == 0 {
		return nil
	}
	out := make([]corev1.Container, len(containers))
	for i, c := range containers {
		out[i] = corev1.Container{Name: c.Name, Resources: c.Resources, RestartPolicy: c.RestartPolicy}
	}
	return out
}

// keepVMIFields keeps of a VMI its metadata (without managedFields), its eviction
// strategy and placement (node selector, affinity, tolerations: its next
// virt-launcher pod's), and of its status the phase, node, conditions (LiveMigratable),
// evacuation mark and migration state.
func keepVMIFields(obj any) (any, error) {
	vmi, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return stripManagedFields(obj)
	}
	kept := &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   vmi.TypeMeta,
		ObjectMeta: vmi.ObjectMeta,
		Spec: kubevirtv1.VirtualMachineInstanceSpec{
			EvictionStrategy: vmi.Spec.EvictionStrategy,
			NodeSelector:     vmi.Spec.NodeSelector,
			Affinity:         vmi.Spec.Affinity,
			Tolerations:      vmi.Spec.Tolerations,
		},
		Status: kubevirtv1.VirtualMachineInstanceStatus{
			Phase:              vmi.Status.Phase,
			NodeName:           vmi.Status.NodeName,
			Conditions:         vmi.Status.Conditions,
			EvacuationNodeName: vmi.Status.EvacuationNodeName,
			MigrationState:     vmi.Status.MigrationState,
		},
	}
	kept.ManagedFields = nil
	return kept, nil
}

// stripManagedFields drops an object's managedFields before the cache keeps it: the
// agent reads none of them, and on a VMI they are a large part of the object (every
// KubeVirt component that writes it owns some of its fields).
func stripManagedFields(obj any) (any, error) {
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}
