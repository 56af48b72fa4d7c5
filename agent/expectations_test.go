package agent

import (
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func TestExpectations(t *testing.T) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	withPod := func(uid types.UID) *vm {
		return &vm{key: "ns/vm", vmi: newVMI("vm", thisNode, "Running"), pods: []*corev1.Pod{{ObjectMeta: metav1.ObjectMeta{Name: "virt-launcher-vm", UID: uid}, Spec: corev1.PodSpec{NodeName: thisNode}}}}
	}
	var x expectations
	if _, ok := x.awaiting(withPod("a"), now); ok {
		t.Fatal("awaiting before any action")
	}
	x.expect(withPod("a"), outcome{StateShuttingDown, "evicted"}, now)
	if o, ok := x.awaiting(withPod("a"), now.Add(time.Second)); !ok || o.state != StateShuttingDown {
		t.Errorf("the action is not awaited: %v %v", o, ok)
	}
	if _, ok := x.awaiting(withPod("b"), now.Add(time.Second)); ok {
		t.Error("a new pod of the VM is taken as acted on")
	}
	x.expect(withPod("a"), outcome{StateMigrating, "evacuation requested"}, now)
	if _, ok := x.awaiting(withPod("a"), now.Add(expectationTTL+time.Second)); ok {
		t.Error("an action the cache never showed is awaited forever")
	}
	x.expect(withPod("a"), outcome{StateMigrating, "evacuation requested"}, now)
	x.seen("ns/vm")
	if _, ok := x.awaiting(withPod("a"), now); ok {
		t.Error("awaited after the cache showed it")
	}
}
