package agent

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// editNode changes the fixture's Node as someone else would (an operator, the kubelet).
func (f *fixture) editNode(mutate func(*corev1.Node)) {
	f.t.Helper()
	n := f.node()
	mutate(n)
	if _, err := f.kube.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		f.t.Fatal(err)
	}
}

func waitingTaintOwned(n *corev1.Node) (tainted, owned bool) {
	var own Ownership
	ok, _ := readAnnotation(n, AnnotationOwned, &own)
	return hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule), ok && own.Waiting
}

// A node marked as not yet reached by a rollout (its boot ID in the mark) carries the
// agent's PreferNoSchedule waiting taint, recorded as its own, with one event; a mark
// of an earlier boot means nothing; the mark removed takes the taint away; marked
// again, then rebooted, the taint goes with the reboot and does not come back for the
// stale mark. An operator's own taint of the same key stays.
func TestRolloutMarkSteersVMsAway(t *testing.T) {
	vmi, pod := noneVM("vm")
	f := newFixture(t, testNode(), vmi, pod)

	f.editNode(func(n *corev1.Node) { n.Annotations[AnnotationRolloutPending] = "an-earlier-boot" })
	f.mustSync()
	if tainted, _ := waitingTaintOwned(f.node()); tainted {
		t.Fatalf("a mark of an earlier boot: taints %v, want none", f.node().Spec.Taints)
	}

	f.editNode(func(n *corev1.Node) { n.Annotations[AnnotationRolloutPending] = bootID })
	f.mustSync()
	f.mustSync()
	n := f.node()
	if tainted, owned := waitingTaintOwned(n); !tainted || !owned {
		t.Fatalf("marked: taints %v, ownership %q: want %s:PreferNoSchedule, recorded as the agent's", n.Spec.Taints, n.Annotations[AnnotationOwned], TaintWaiting)
	}
	if n.Spec.Unschedulable || HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("marked: cordoned %v, taints %v: want the node schedulable and not drained", n.Spec.Unschedulable, n.Spec.Taints)
	}
	f.noEvictions("a rollout's mark moves no VM")
	if got := countEvents(f.events(), "Normal "+ReasonRolloutPending); got != 1 {
		t.Errorf("%d %s events over two looks, want 1", got, ReasonRolloutPending)
	}

	// The rollout called off: the mark removed, the taint goes.
	f.editNode(func(n *corev1.Node) { delete(n.Annotations, AnnotationRolloutPending) })
	f.mustSync()
	if n := f.node(); !givenBack(n) || hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
		t.Fatalf("mark removed: taints %v, annotations %v: want the waiting taint and the ownership gone", n.Spec.Taints, n.Annotations)
	}

	// Marked again, then the host reboots (a new boot ID): the taint goes with the
	// reboot, and the mark, now of an earlier boot, does not bring it back.
	f.editNode(func(n *corev1.Node) { n.Annotations[AnnotationRolloutPending] = bootID })
	f.mustSync()
	if tainted, _ := waitingTaintOwned(f.node()); !tainted {
		t.Fatalf("marked again: taints %v", f.node().Spec.Taints)
	}
	f.clock.Step(time.Minute)
	f.editNode(func(n *corev1.Node) { n.Status.NodeInfo.BootID = "boot-2" })
	f.mustSync()
	f.mustSync()
	if n := f.node(); !givenBack(n) || hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
		t.Fatalf("rebooted: taints %v, annotations %v: want the waiting taint and the ownership gone", n.Spec.Taints, n.Annotations)
	}

	// An operator's taint of the same key is not the agent's: the mark removed, it stays.
	f.editNode(func(n *corev1.Node) {
		n.Annotations[AnnotationRolloutPending] = "boot-2"
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: TaintWaiting, Effect: corev1.TaintEffectPreferNoSchedule})
	})
	f.mustSync()
	f.editNode(func(n *corev1.Node) { delete(n.Annotations, AnnotationRolloutPending) })
	f.mustSync()
	if n := f.node(); !hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
		t.Errorf("an operator's %s taint was removed: taints %v", TaintWaiting, n.Spec.Taints)
	}
}

// A host shutdown on a marked node: the taint is already there; the shutdown takes the
// node out of service and, cancelled, gives it back, after which the mark (still of
// this boot) has the agent add the waiting taint again.
func TestRolloutMarkThroughACancelledShutdown(t *testing.T) {
	vmi, pod := noneVM("vm")
	n := testNode()
	n.Annotations[AnnotationRolloutPending] = bootID
	f := newFixture(t, n, vmi, pod)
	f.mustSync()
	if tainted, _ := waitingTaintOwned(f.node()); !tainted {
		t.Fatalf("marked: taints %v", f.node().Spec.Taints)
	}
	f.engine.ShutdownStarted(t0, t0.Add(10*time.Minute))
	f.mustSync()
	if n := f.node(); !n.Spec.Unschedulable || !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Fatalf("host shutdown: cordoned %v, taints %v: want the node out of service", n.Spec.Unschedulable, n.Spec.Taints)
	}
	f.engine.ShutdownCancelled()
	f.mustSync()
	f.mustSync()
	n = f.node()
	if n.Spec.Unschedulable || HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("cancelled: cordoned %v, taints %v: want the node given back", n.Spec.Unschedulable, n.Spec.Taints)
	}
	if tainted, owned := waitingTaintOwned(n); !tainted || !owned {
		t.Errorf("cancelled, still marked: taints %v, ownership %q: want the waiting taint again, the agent's", n.Spec.Taints, n.Annotations[AnnotationOwned])
	}
}
