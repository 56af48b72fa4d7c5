package e2e

import (
	"fmt"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
)

// The deployed DaemonSet gets its pods from the real DaemonSet controller, one on each
// node, and a change of its pod template (as `kubectl rollout restart` makes) rolls
// them as its updateStrategy says: every pod replaced by one of the new revision, one
// node at a time (maxUnavailable 1), so that some node always has a ready agent.
func TestDeployDaemonSetRollingUpdate(t *testing.T) {
	sc := newClusterWideScenario(t, 2)
	sc.applyManifests()
	ds, err := sc.kube().AppsV1().DaemonSets(deployNamespace).Get(sc.ctx, "node-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	old := map[string]types.UID{}
	for _, n := range sc.nodes {
		old[n] = sc.daemonSetPod(ds, n).UID
	}
	sc.waitRolledOut(2)

	pods, err := sc.kube().CoreV1().Pods(deployNamespace).List(sc.ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	w, err := sc.kube().CoreV1().Pods(deployNamespace).Watch(sc.ctx, metav1.ListOptions{ResourceVersion: pods.ResourceVersion})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	restart := fmt.Sprintf(`{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":%q}}}}}`, time.Now().Format(time.RFC3339))
	if _, err := sc.kube().AppsV1().DaemonSets(deployNamespace).Patch(sc.ctx, "node-agent", types.StrategicMergePatchType, []byte(restart), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}

	// Follow the pods until each node has a ready pod other than its old one; count the
	// nodes with a ready agent at every step.
	ours := map[string]bool{}
	for _, n := range sc.nodes {
		ours[n] = true
	}
	state := map[types.UID]*corev1.Pod{}
	for i := range pods.Items {
		if ours[pods.Items[i].Spec.NodeName] {
			state[pods.Items[i].UID] = &pods.Items[i]
		}
	}
	readyOn := func() (nodes map[string]bool, replaced int) {
		nodes = map[string]bool{}
		for _, p := range state {
			if p.DeletionTimestamp == nil && podReady(p) {
				nodes[p.Spec.NodeName] = true
				if p.UID != old[p.Spec.NodeName] {
					replaced++
				}
			}
		}
		return nodes, replaced
	}
	fewest := len(sc.nodes)
	deadline := time.After(2 * time.Minute)
	for done := false; !done; {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("the pod watch ended during the rollout")
			}
			p, isPod := ev.Object.(*corev1.Pod)
			if !isPod || !ours[p.Spec.NodeName] {
				continue
			}
			if ev.Type == watch.Deleted {
				delete(state, p.UID)
			} else {
				state[p.UID] = p
			}
			nodes, replaced := readyOn()
			fewest = min(fewest, len(nodes))
			done = replaced == len(sc.nodes)
		case <-deadline:
			nodes, replaced := readyOn()
			t.Fatalf("the rollout did not replace the pods in 2 minutes: %d of %d replaced, ready on %v", replaced, len(sc.nodes), nodes)
		}
	}
	t.Logf("during the rollout at least %d of %d nodes had a ready agent", fewest, len(sc.nodes))
	if fewest < len(sc.nodes)-1 {
		t.Errorf("during the rollout only %d of %d nodes had a ready agent; maxUnavailable 1 allows one node without", fewest, len(sc.nodes))
	}
	sc.waitRolledOut(2)
}

// waitRolledOut waits until the DaemonSet controller reports want pods scheduled, all of
// the current revision and available.
func (sc *scenario) waitRolledOut(want int32) {
	sc.t.Helper()
	sc.eventually(2*time.Minute, "the DaemonSet rolled out", func() (bool, string) {
		ds, err := sc.kube().AppsV1().DaemonSets(deployNamespace).Get(sc.ctx, "node-agent", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		st := ds.Status
		return ds.Generation == st.ObservedGeneration && st.DesiredNumberScheduled == want &&
			st.UpdatedNumberScheduled == want && st.NumberAvailable == want, describeDaemonSet(ds)
	})
}

func describeDaemonSet(ds *appsv1.DaemonSet) string {
	st := ds.Status
	return fmt.Sprintf("generation %d observed %d, desired %d, updated %d, available %d",
		ds.Generation, st.ObservedGeneration, st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberAvailable)
}
