package fleet

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func testNode(name, cpu, mem string, edit ...func(*corev1.Node)) corev1.Node {
	n := corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"pool": "a"}}}
	n.Status.Allocatable = corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem), corev1.ResourcePods: resource.MustParse("110")}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	for _, e := range edit {
		e(&n)
	}
	return n
}

func testPod(name, node, cpu, mem string, launcher bool) corev1.Pod {
	p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name}}
	if launcher {
		p.Labels = map[string]string{launcherLabel: "virt-launcher"}
	}
	p.Spec.NodeName = node
	p.Spec.Containers = []corev1.Container{{Name: "c", Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse(mem)}}}}
	return p
}

// The capacity check counts requests against allocatable as the scheduler does, node by
// node (not in sum), leaves out the nodes that are about to go and those that cannot
// take the pod (cordoned, not Ready, an untolerated NoSchedule taint, a node selector
// it does not match), and counts the VMs still on the nodes draining.
func TestFit(t *testing.T) {
	mine := func(mems ...string) []*corev1.Pod {
		var out []*corev1.Pod
		for i, m := range mems {
			p := testPod("vm"+string(rune('a'+i)), "self", "1", m, true)
			out = append(out, &p)
		}
		return out
	}
	self := testNode("self", "32", "128Gi")
	cordoned := func(n *corev1.Node) { n.Spec.Unschedulable = true }
	tests := []struct {
		name     string
		mine     []*corev1.Pod
		draining []string
		ahead    []string // waiting ahead of it
		behind   []string // waiting behind it
		shutting []string // nodes shutting down (rebooting, out of the queue)
		nodes    []corev1.Node
		pods     []corev1.Pod
		want     string // a part of the reason; "" fits
	}{
		{name: "room on one node", mine: mine("4Gi", "4Gi"), nodes: []corev1.Node{self, testNode("b", "8", "8Gi")}},
		{name: "the sum fits but no node takes the largest", mine: mine("6Gi", "6Gi"), shutting: []string{"r"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi"), testNode("c", "8", "4Gi"), testNode("r", "8", "8Gi", cordoned)}, want: "fits on none of the 2 nodes"},
		{name: "pods already there count", mine: mine("4Gi"), shutting: []string{"r"}, nodes: []corev1.Node{self, testNode("b", "8", "8Gi"), testNode("r", "8", "8Gi", cordoned)},
			pods: []corev1.Pod{testPod("busy", "b", "1", "6Gi", false)}, want: "ns/vma"},
		{name: "no room, and no node away whose return would make it: go", mine: mine("4Gi"), nodes: []corev1.Node{self, testNode("b", "8", "8Gi")},
			pods: []corev1.Pod{testPod("busy", "b", "1", "6Gi", false)}},
		{name: "a node away that the VM could not use makes no room", mine: func() []*corev1.Pod {
			p := mine("4Gi")
			p[0].Spec.NodeSelector = map[string]string{"pool": "a"}
			return p
		}(), shutting: []string{"r"}, nodes: []corev1.Node{self, testNode("r", "8", "8Gi", func(n *corev1.Node) { n.Labels["pool"] = "other" })}},
		{name: "a finished pod does not count (left out by the list)", mine: mine("4Gi"), nodes: []corev1.Node{self, testNode("b", "8", "8Gi")}},
		{name: "no room but on the nodes waiting behind it, and none away: go", mine: mine("4Gi"), behind: []string{"b"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi")}},
		{name: "no room but on the nodes waiting behind it, and a node away: wait for it", mine: mine("4Gi"), behind: []string{"b"}, shutting: []string{"r"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi"), testNode("r", "8", "8Gi", cordoned)}, want: "fits on none of the 0 nodes"},
		{name: "the nodes waiting ahead of it are about to go", mine: mine("4Gi"), ahead: []string{"b"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi")}, want: "none of the 0 nodes"},
		{name: "the VMs of the draining nodes need room too", mine: mine("4Gi"), draining: []string{"d"},
			nodes: []corev1.Node{self, testNode("d", "8", "8Gi"), testNode("b", "8", "6Gi")},
			pods:  []corev1.Pod{testPod("theirs", "d", "1", "4Gi", true)}, want: "fits on none of the 1 nodes"},
		{name: "a cordoned node takes nothing", mine: mine("1Gi"), shutting: []string{"b"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi", func(n *corev1.Node) { n.Spec.Unschedulable = true })}, want: "none of the 0"},
		{name: "a node not Ready takes nothing", mine: mine("1Gi"), shutting: []string{"b"},
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi", func(n *corev1.Node) { n.Status.Conditions[0].Status = corev1.ConditionFalse })}, want: "none of the 0"},
		{name: "an untolerated NoSchedule taint", mine: mine("1Gi"), ahead: []string{"w"},
			nodes: []corev1.Node{self, testNode("w", "8", "8Gi"), testNode("b", "8", "8Gi", func(n *corev1.Node) {
				n.Spec.Taints = []corev1.Taint{{Key: "k", Effect: corev1.TaintEffectNoSchedule}}
			})}, want: "none of the 1"},
		{name: "PreferNoSchedule does not keep a VM out", mine: mine("1Gi"),
			nodes: []corev1.Node{self, testNode("b", "8", "8Gi", func(n *corev1.Node) {
				n.Spec.Taints = []corev1.Taint{{Key: "k", Effect: corev1.TaintEffectPreferNoSchedule}}
			})}},
		{name: "a node selector the node does not match", mine: func() []*corev1.Pod {
			p := mine("1Gi")
			p[0].Spec.NodeSelector = map[string]string{"pool": "b"}
			return p
		}(), shutting: []string{"r"}, nodes: []corev1.Node{self, testNode("b", "8", "8Gi"), testNode("r", "8", "8Gi", cordoned, func(n *corev1.Node) { n.Labels["pool"] = "b" })}, want: "none of the 1"},
		{name: "nothing to place", nodes: []corev1.Node{self}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			shutting := func(n *corev1.Node) bool {
				for _, s := range tt.shutting {
					if n.Name == s {
						return true
					}
				}
				return false
			}
			c := newCluster()
			for i := range tt.nodes {
				c.addNode(&tt.nodes[i], shutting)
			}
			moving := map[string]bool{}
			for _, n := range tt.draining {
				moving[n] = true
			}
			for i := range tt.pods {
				c.addPod(&tt.pods[i], moving)
			}
			got := fit("self", tt.mine, tt.draining, tt.ahead, tt.behind, c)
			if (tt.want == "") != (got == "") || !strings.Contains(got, tt.want) {
				t.Errorf("fit: %q, want %q", got, tt.want)
			}
		})
	}
}
