package sim

import (
	"context"
	"slices"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Each node's kubelet and virt-handler get the keys of that node only: a drain
// shutting many guests down on one node does not queue ahead of a migration's
// target pod on another, as it does not in a cluster.
func TestEachNodeQueuesItsOwnPodsAndVMIs(t *testing.T) {
	s := &Sim{
		log:        logrus.New(),
		simNodes:   map[string]*simNode{},
		domains:    map[types.UID]*domain{},
		podsByNode: map[string]map[types.UID]string{},
		vmiLocks:   map[string]*sync.Mutex{},
		pods: cache.NewSharedIndexInformer(&cache.ListWatch{}, &corev1.Pod{}, 0,
			cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
		vmis: cache.NewSharedIndexInformer(&cache.ListWatch{}, &kubevirtv1.VirtualMachineInstance{}, 0,
			cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
	}
	for _, n := range []string{"source", "target"} {
		sn := &simNode{name: n, kubeletQ: newQueue("kubelet-" + n), handlerQ: newQueue("handler-" + n)}
		defer sn.stopQueues()
		s.simNodes[n] = sn
	}
	queued := func(q workqueue.TypedRateLimitingInterface[string]) []string {
		var keys []string
		for q.Len() > 0 {
			k, _ := q.Get()
			q.Done(k)
			keys = append(keys, k)
		}
		slices.Sort(keys)
		return keys
	}
	expect := func(step string) func(node, queue string, want ...string) {
		return func(node, queue string, want ...string) {
			t.Helper()
			q := s.simNodes[node].kubeletQ
			if queue == "virt-handler" {
				q = s.simNodes[node].handlerQ
			}
			if got := queued(q); !slices.Equal(got, want) {
				t.Errorf("%s: the %s of node %s has %q queued, want %q", step, queue, node, got, want)
			}
		}
	}

	vmi := &kubevirtv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "vm", UID: "vmi-uid"},
		Status:     kubevirtv1.VirtualMachineInstanceStatus{Phase: kubevirtv1.Running, NodeName: "source"},
	}
	if err := s.vmis.GetStore().Add(vmi); err != nil {
		t.Fatal(err)
	}
	launcher := func(name, node string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID(name),
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance",
					Name: vmi.Name, UID: vmi.UID, Controller: ptr.To(true)}}},
			Spec: corev1.PodSpec{NodeName: node},
		}
	}
	s.podChanged(launcher("virt-launcher-vm-src", "source"))
	s.podChanged(launcher("virt-launcher-vm-dst", "target"))
	step := expect("a migration's two pods")
	step("source", "kubelet", "ns/virt-launcher-vm-src")
	step("target", "kubelet", "ns/virt-launcher-vm-dst")
	// The source's virt-handler drives the migration: both pods' events wake it.
	step("source", "virt-handler", "ns/vm")
	step("target", "virt-handler")

	moved := vmi.DeepCopy()
	moved.Status.NodeName = "target"
	if err := s.vmis.GetStore().Update(moved); err != nil {
		t.Fatal(err)
	}
	s.enqueueVMI(moved)
	step = expect("handed over")
	step("source", "virt-handler")
	step("target", "virt-handler", "ns/vm")
	// A key the source queued before the handover is not the source's to handle.
	if err := s.syncVMI(context.Background(), "source", "ns/vm"); err != nil {
		t.Errorf("the source's virt-handler on a VMI handed over: %v", err)
	}

	s.podChanged(launcher("virt-launcher-other", "elsewhere"))
	step = expect("a pod on a node not simulated")
	step("source", "kubelet")
	step("target", "kubelet")
}
