package sim

import (
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Informer routing: which pod and VMI events wake which node's kubelet and
// virt-handler.

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
			s.toKubeletLocked(pod.Spec.NodeName, key, 0)
		}
		s.mu.Unlock()
	}
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == kubevirtv1.VirtualMachineInstanceGroupVersionKind.Kind {
		s.toHandlerKey(pod.Namespace+"/"+ref.Name, 0)
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
		s.toHandlerKey(pod.Namespace+"/"+ref.Name, 0)
	}
}

func (s *Sim) enqueueVMI(obj any) {
	vmi, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return
	}
	if key, err := cache.MetaNamespaceKeyFunc(vmi); err == nil {
		s.toHandler(vmi, key, 0)
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

// toKubeletLocked queues a pod's key for the kubelet of node, after a delay if
// after > 0 (AddAfter adds at once otherwise); nothing if node is not simulated. The
// caller holds s.mu.
func (s *Sim) toKubeletLocked(node, key string, after time.Duration) {
	if sn := s.simNodes[node]; sn != nil {
		sn.kubeletQ.AddAfter(key, after)
	}
}

func (s *Sim) toKubelet(node, key string, after time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.toKubeletLocked(node, key, after)
}

// toHandler queues a VMI's key for the virt-handler of its node (vmiNode), after a
// delay if after > 0; nothing if it has none here.
func (s *Sim) toHandler(vmi *kubevirtv1.VirtualMachineInstance, key string, after time.Duration) {
	node := s.vmiNode(vmi)
	s.mu.Lock()
	defer s.mu.Unlock()
	if sn := s.simNodes[node]; sn != nil {
		sn.handlerQ.AddAfter(key, after)
	}
}

// toHandlerKey is toHandler for the VMI of key, read from the informer's cache.
func (s *Sim) toHandlerKey(key string, after time.Duration) {
	if obj, exists, err := s.vmis.GetStore().GetByKey(key); err == nil && exists {
		s.toHandler(obj.(*kubevirtv1.VirtualMachineInstance), key, after)
	}
}

// vmiNode names the simulated node whose virt-handler handles the VMI: the node it
// runs on (status.nodeName: the source until a migration hands it over, which then
// drives the migration); for a VMI without one (it ended before it had a node),
// the node of its guest, else of one of its pods. "" when that node is not
// simulated.
func (s *Sim) vmiNode(vmi *kubevirtv1.VirtualMachineInstance) string {
	if n := vmi.Status.NodeName; n != "" {
		if s.managed(n) == nil {
			return ""
		}
		return n
	}
	s.mu.Lock()
	d := s.domains[vmi.UID]
	s.mu.Unlock()
	if d != nil && s.managed(d.node) != nil {
		return d.node
	}
	for _, pod := range s.vmiPods(vmi) {
		if s.managed(pod.Spec.NodeName) != nil {
			return pod.Spec.NodeName
		}
	}
	return ""
}
