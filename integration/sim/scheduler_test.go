package sim

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func testNode(name string, labels map[string]string, taints ...corev1.Taint) *corev1.Node {
	l := map[string]string{corev1.LabelHostname: name, kubevirtv1.NodeSchedulable: "true"}
	for k, v := range labels {
		l[k] = v
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l},
		Spec:       corev1.NodeSpec{Taints: taints},
		Status: corev1.NodeStatus{Allocatable: corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("2"),
			corev1.ResourceMemory: resource.MustParse("1Gi"),
			corev1.ResourcePods:   resource.MustParse("10"),
		}},
	}
}

func testPod(uid string, labels map[string]string, mutate ...func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: uid, Namespace: "ns", UID: types.UID(uid), Labels: labels},
		Spec: corev1.PodSpec{
			NodeSelector: map[string]string{kubevirtv1.NodeSchedulable: "true"},
			Containers: []corev1.Container{{Name: "compute", Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("256Mi")},
			}}},
		},
	}
	for _, m := range mutate {
		m(p)
	}
	return p
}

// TestFits checks the scheduler's filters without a cluster.
func TestFits(t *testing.T) {
	s := &Sim{}
	plain := testNode("plain", nil)
	cordoned := testNode("cordoned", nil)
	cordoned.Spec.Unschedulable = true
	tainted := testNode("tainted", nil, corev1.Taint{Key: "kubevirt.io/drain", Effect: corev1.TaintEffectNoSchedule})
	preferNo := testNode("prefer", nil, corev1.Taint{Key: "x", Effect: corev1.TaintEffectPreferNoSchedule})
	gpu := testNode("gpu", map[string]string{"pool": "gpu"})

	source := testPod("source", map[string]string{kubevirtv1.CreatedByLabel: "vmi-uid"})
	antiAffinity := func(p *corev1.Pod) {
		p.Spec.Affinity = &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
			RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
				LabelSelector: &metav1.LabelSelector{MatchLabels: map[string]string{kubevirtv1.CreatedByLabel: "vmi-uid"}},
				TopologyKey:   corev1.LabelHostname,
			}},
		}}
	}
	nodeAffinity := func(op corev1.NodeSelectorOperator, values ...string) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{
				RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{
					MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "pool", Operator: op, Values: values}},
				}}},
			}}
		}
	}
	placed := []placedPod{{pod: source, node: plain}}

	for _, c := range []struct {
		name string
		pod  *corev1.Pod
		node *corev1.Node
		want string // substring of the reason; "" fits
	}{
		{"plain", testPod("a", nil), plain, ""},
		{"cordoned", testPod("a", nil), cordoned, "unschedulable"},
		{"cordon tolerated", testPod("a", nil, func(p *corev1.Pod) {
			p.Spec.Tolerations = []corev1.Toleration{{Key: taintNodeUnschedulable, Operator: corev1.TolerationOpExists}}
		}), cordoned, ""},
		{"taint", testPod("a", nil), tainted, "untolerated taint"},
		{"taint tolerated", testPod("a", nil, func(p *corev1.Pod) {
			p.Spec.Tolerations = []corev1.Toleration{{Key: "kubevirt.io/drain", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}
		}), tainted, ""},
		{"prefer no schedule", testPod("a", nil), preferNo, ""},
		{"selector", testPod("a", nil, func(p *corev1.Pod) { p.Spec.NodeSelector["pool"] = "gpu" }), plain, "node affinity/selector"},
		{"selector match", testPod("a", nil, func(p *corev1.Pod) { p.Spec.NodeSelector["pool"] = "gpu" }), gpu, ""},
		{"affinity In", testPod("a", nil, nodeAffinity(corev1.NodeSelectorOpIn, "gpu")), gpu, ""},
		{"affinity In miss", testPod("a", nil, nodeAffinity(corev1.NodeSelectorOpIn, "gpu")), plain, "node affinity"},
		{"affinity NotIn", testPod("a", nil, nodeAffinity(corev1.NodeSelectorOpNotIn, "gpu")), gpu, "node affinity"},
		{"affinity Exists", testPod("a", nil, nodeAffinity(corev1.NodeSelectorOpExists)), gpu, ""},
		{"affinity Exists miss", testPod("a", nil, nodeAffinity(corev1.NodeSelectorOpExists)), plain, "node affinity"},
		{"anti-affinity", testPod("target", map[string]string{kubevirtv1.CreatedByLabel: "vmi-uid"}, antiAffinity), plain, "anti-affinity"},
		{"anti-affinity elsewhere", testPod("target", map[string]string{kubevirtv1.CreatedByLabel: "vmi-uid"}, antiAffinity), gpu, ""},
		{"memory", testPod("a", nil, func(p *corev1.Pod) {
			p.Spec.Containers[0].Resources.Requests[corev1.ResourceMemory] = resource.MustParse("900Mi")
		}), plain, "Insufficient memory"},
		{"device", testPod("a", nil, func(p *corev1.Pod) {
			p.Spec.Containers[0].Resources.Requests[ResourceKVM] = resource.MustParse("1")
		}), plain, "Insufficient " + string(ResourceKVM)},
	} {
		got := s.fits(c.pod, c.node, placed)
		if (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("%s: fits = %q, want %q", c.name, got, c.want)
		}
	}
}
