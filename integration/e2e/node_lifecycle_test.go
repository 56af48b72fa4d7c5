package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// A node whose kubelet stops posting (its Lease and its status) turns NotReady as on a
// real cluster: kube-controller-manager's node lifecycle controller sets its Ready
// condition Unknown, taints it node.kubernetes.io/unreachable (NoSchedule and
// NoExecute) and marks its pods not ready, while a node whose kubelet keeps renewing
// its Lease stays Ready and untainted. When the kubelet posts again, the node is Ready
// and the taints are lifted.
func TestNodeNotReadyWhenItsKubeletStops(t *testing.T) {
	sc := newScenario(t, 2)
	dead, alive := sc.nodes[0], sc.nodes[1]
	app := sc.plainPod("app", dead)
	if _, err := sc.env.sim.WaitForPod(sc.ctx, sc.ns, app.Name, "Ready", podReady); err != nil {
		t.Fatal(err)
	}
	if err := sc.env.sim.StopKubelet(dead); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_ = sc.env.sim.StartKubelet(ctx, dead)
	})
	stopped := time.Now()
	sc.eventually(2*time.Minute, "the node lifecycle controller to mark "+dead+" unreachable", func() (bool, string) {
		n := sc.node(dead)
		ready := nodeCondition(n, corev1.NodeReady)
		return ready == corev1.ConditionUnknown && hasTaint(n, corev1.TaintNodeUnreachable, corev1.TaintEffectNoSchedule) &&
				hasTaint(n, corev1.TaintNodeUnreachable, corev1.TaintEffectNoExecute),
			fmt.Sprintf("Ready %s, taints %v", ready, n.Spec.Taints)
	})
	t.Logf("%s unreachable %s after its kubelet stopped", dead, time.Since(stopped).Round(100*time.Millisecond))
	if n := sc.node(alive); nodeCondition(n, corev1.NodeReady) != corev1.ConditionTrue || len(n.Spec.Taints) != 0 {
		t.Errorf("%s, whose kubelet runs, is not Ready and untainted: Ready %s, taints %v",
			alive, nodeCondition(n, corev1.NodeReady), n.Spec.Taints)
	}
	lease, err := sc.kube().CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(sc.ctx, alive, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the Lease of %s: %v", alive, err)
	}
	if lease.Spec.RenewTime == nil || !lease.Spec.RenewTime.After(stopped) {
		t.Errorf("the Lease of %s, whose kubelet runs, was not renewed since the other kubelet stopped: renewed %v", alive, lease.Spec.RenewTime)
	}
	if _, err := sc.env.sim.WaitForPod(sc.ctx, sc.ns, app.Name, "not ready", func(p *corev1.Pod) bool {
		return p != nil && !podReady(p)
	}); err != nil {
		t.Errorf("the pod on the unreachable node: %v", err)
	}

	if err := sc.env.sim.StartKubelet(sc.ctx, dead); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, dead+" Ready and untainted again", func() (bool, string) {
		n := sc.node(dead)
		ready := nodeCondition(n, corev1.NodeReady)
		return ready == corev1.ConditionTrue && len(n.Spec.Taints) == 0, fmt.Sprintf("Ready %s, taints %v", ready, n.Spec.Taints)
	})
}

func podReady(p *corev1.Pod) bool {
	if p == nil {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func nodeCondition(n *corev1.Node, t corev1.NodeConditionType) corev1.ConditionStatus {
	for _, c := range n.Status.Conditions {
		if c.Type == t {
			return c.Status
		}
	}
	return ""
}

func hasTaint(n *corev1.Node, key string, effect corev1.TaintEffect) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key && t.Effect == effect {
			return true
		}
	}
	return false
}

// A deleted namespace really empties, as on a real cluster: kube-controller-manager's
// namespace controller deletes what is in it (a running VMI and its virt-launcher pod,
// through KubeVirt and the simulated kubelet; a plain pod) and then the namespace. (A
// VM of runStrategy Always would make virt-controller try to start it again in the
// terminating namespace and log each refusal as an error, as it does on a real cluster.)
func TestNamespaceDeletedEmptiesIt(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	sc.createVMI("vm", noneStrategy, onNode(node))
	sc.plainPod("app", node)
	if err := sc.kube().CoreV1().Namespaces().Delete(sc.ctx, sc.ns, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(3*time.Minute, "namespace "+sc.ns+" to be gone", func() (bool, string) {
		ns, err := sc.kube().CoreV1().Namespaces().Get(sc.ctx, sc.ns, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, ""
		}
		if err != nil {
			return false, err.Error()
		}
		pods, _ := sc.kube().CoreV1().Pods(sc.ns).List(sc.ctx, metav1.ListOptions{})
		return false, fmt.Sprintf("phase %s, %d pods, conditions %v", ns.Status.Phase, len(pods.Items), ns.Status.Conditions)
	})
	if v := sc.vmi("vm"); v != nil {
		t.Errorf("VMI vm is still there: phase %s", v.Status.Phase)
	}
}
