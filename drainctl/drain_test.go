package drainctl

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestSetAndRemoveDrain(t *testing.T) {
	const key = "kubevirt.io/drain"
	other := corev1.Taint{Key: "example.com/gpu", Value: "a100", Effect: corev1.TaintEffectNoSchedule}
	drainTaint := corev1.Taint{Key: key, Value: DrainTaintValue, Effect: corev1.TaintEffectNoSchedule}
	node := func(unschedulable bool, taints ...corev1.Taint) *corev1.Node {
		n := &corev1.Node{}
		n.Spec.Unschedulable, n.Spec.Taints = unschedulable, taints
		return n
	}
	tests := []struct {
		name        string
		set         bool
		node        *corev1.Node
		wantTaints  []corev1.Taint
		wantChanged bool
	}{
		{name: "set on a node in service", set: true, node: node(false, other), wantTaints: []corev1.Taint{other, drainTaint}, wantChanged: true},
		{name: "set replaces the key's other taints", set: true, node: node(true, corev1.Taint{Key: key, Value: "shutdown", Effect: corev1.TaintEffectNoExecute}, other),
			wantTaints: []corev1.Taint{other, drainTaint}, wantChanged: true},
		{name: "set on a drained node writes nothing", set: true, node: node(true, other, drainTaint), wantTaints: []corev1.Taint{other, drainTaint}},
		{name: "set cordons a tainted node", set: true, node: node(false, drainTaint), wantTaints: []corev1.Taint{drainTaint}, wantChanged: true},
		{name: "remove takes the key's taints and the cordon", node: node(true, drainTaint, other, corev1.Taint{Key: key, Effect: corev1.TaintEffectNoExecute}),
			wantTaints: []corev1.Taint{other}, wantChanged: true},
		{name: "remove from a node in service writes nothing", node: node(false, other), wantTaints: []corev1.Taint{other}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var changed bool
			if tt.set {
				changed = setDrain(tt.node, key)
			} else {
				changed = removeDrain(tt.node, key)
			}
			if changed != tt.wantChanged {
				t.Errorf("changed %v, want %v", changed, tt.wantChanged)
			}
			if !reflect.DeepEqual(tt.node.Spec.Taints, tt.wantTaints) {
				t.Errorf("taints %v, want %v", tt.node.Spec.Taints, tt.wantTaints)
			}
			if tt.node.Spec.Unschedulable != tt.set {
				t.Errorf("unschedulable %v, want %v", tt.node.Spec.Unschedulable, tt.set)
			}
		})
	}
}
