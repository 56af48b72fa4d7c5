package sim

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Informer routing: which pod and VMI events wake the kubelet and virt-handler.

// podChanged routes a pod event to the kubelet of its node and to virt-handler.
func (s *Sim) podChanged(obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key, err := cache.MetaNamespaceKeyFunc(pod)
	if err != nil {
		return
	}
	if pod.Spec.NodeName != "" {
		s.mu.Lock()
		if s.simNodes[pod.Spec.NodeName] != nil {
			m := s.podsByNode[pod.Spec.NodeName]
			if m == nil {
				m = map[types.UID]string{}
				s.podsByNode[pod.Spec.NodeName] = m
			}
			m[pod.UID] = key
			s.kubeletQ.Add(key)
		}
		s.mu.Unlock()
	}
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == kubevirtv1.VirtualMachineInstanceGroupVersionKind.Kind {
		s.handlerQ.Add(pod.Namespace + "/" + ref.Name)
	}
}

func (s *Sim) podDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.mu.Lock()
	if rt := s.runtimes[pod.UID]; rt != nil {
		if sn := s.simNodes[rt.node]; sn != nil {
			delete(sn.usedIPs, rt.ip)
		}
		delete(s.runtimes, pod.UID)
	}
	if m := s.podsByNode[pod.Spec.NodeName]; m != nil {
		delete(m, pod.UID)
	}
	s.mu.Unlock()
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == kubevirtv1.VirtualMachineInstanceGroupVersionKind.Kind {
		s.handlerQ.Add(pod.Namespace + "/" + ref.Name)
	}
}

func (s *Sim) enqueueVMI(obj any) {
	if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
		s.handlerQ.Add(key)
	}
}

func (s *Sim) vmiDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	vmi, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return
	}
	s.mu.Lock()
	d := s.domains[vmi.UID]
	delete(s.domains, vmi.UID)
	delete(s.attempts, vmi.UID)
	delete(s.warned, vmi.UID)
	for uid, run := range s.migrations {
		if run.vmiUID == vmi.UID {
			delete(s.migrations, uid)
		}
	}
	s.mu.Unlock()
	if d != nil {
		// The VMI is gone while its guest ran: the launcher has nothing left to run.
		s.launcherExited(d.podUID, 0, "Completed")
	}
}

func podTerminal(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
}
