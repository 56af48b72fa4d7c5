package e2e

// --all-pods never spins (issue 9): evictions refused with an error other than 429 are
// retried with a backoff and reported once; KubeVirt's hotplug attachment pods stay
// while their VM is on the node; /safe-to-shutdown counts the other pods before a drain.

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"testing"
	"time"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
)

// maxPodEvictionsIn30s bounds the eviction requests of a refused pod over 30 s with
// --pod-eviction-retry=1s (1 s doubling: at 0, 1, 3, 7, 15 s, and the resync's lag).
const maxPodEvictionsIn30s = 7

// On a node with a VM that cannot leave (so the drain goes on), --all-pods meets: a pod
// under two PodDisruptionBudgets (the Eviction API answers 500), a pod whose eviction an
// admission policy denies, a free pod, and a KubeVirt hotplug attachment pod owned by
// the VM's virt-launcher pod. Before the drain /safe-to-shutdown already counts the three
// evictable pods. During it the free pod is evicted; each refused pod is asked at most
// maxPodEvictionsIn30s times in 30 s (the API server's audit log) and has one
// EvictionRefused event; the hotplug pod is never asked. Once the budget and the policy
// are gone, both pods are evicted.
func TestDrainAllPodsNeverSpins(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	vm := sc.pinned("stuck", node, liveMigrate, notMigratable)
	launcher := sc.launcherPod(vm, node)
	// An attachment pod as KubeVirt labels it, owned by the VM's virt-launcher pod. The
	// reference is not a controller reference: KubeVirt's VMI controller deletes the
	// attachment pods a launcher controls that serve no hotplug volume of the VMI (this
	// VMI has none), and the agent's rule reads the owning pod, not the controller flag.
	hotplug := sc.plainPod("hp-"+vm.Name, node, func(p *corev1.Pod) {
		p.Labels = map[string]string{kubevirtv1.AppLabel: "hotplug-disk"}
		p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Pod", Name: launcher.Name, UID: launcher.UID}}
	})
	twoBudgets := sc.plainPod("two-budgets", node, func(p *corev1.Pod) { p.Labels = map[string]string{"a": "1", "b": "1"} })
	for _, key := range []string{"a", "b"} {
		if _, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
			ObjectMeta: metav1.ObjectMeta{Name: "budget-" + key},
			Spec: policyv1.PodDisruptionBudgetSpec{
				MaxUnavailable: ptr.To(intstr.FromInt32(1)),
				Selector:       &metav1.LabelSelector{MatchLabels: map[string]string{key: "1"}},
			},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	denied := sc.plainPod("denied", node)
	sc.denyEvictionOf(denied.Name)
	free := sc.plainPod("free", node)

	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey, "--all-pods", "--pod-eviction-retry=1s")
	a.waitStatus(30*time.Second, "the 3 evictable pods counted before any drain", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return !st.Draining && st.PodsLeft == 3
	})

	start := time.Now()
	sc.taint(node, agentOnlyKey)
	sc.eventually(time.Minute, "the free pod evicted", func() (bool, string) {
		_, ok := sc.podPhase(sc.ns, free.Name, free.UID)
		return !ok, "still there"
	})
	sc.eventually(time.Minute, "30 s of drain to pass", func() (bool, string) {
		return time.Since(start) >= 32*time.Second, ""
	})
	counts, err := evictionsPerPod(sc.env.cluster.AuditLog, sc.ns, start, start.Add(30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("eviction requests in the drain's first 30 s: %v", sortedCounts(counts))
	for _, p := range []*corev1.Pod{twoBudgets, denied} {
		if n := counts[p.Name]; n == 0 || n > maxPodEvictionsIn30s {
			t.Errorf("pod %s: %d eviction requests in 30 s, want 1..%d", p.Name, n, maxPodEvictionsIn30s)
		}
		if n := sc.eventCount(sc.ns, "Pod", p.Name, agent.ReasonEvictionRefused); n != 1 {
			t.Errorf("pod %s: %d %s events, want 1", p.Name, n, agent.ReasonEvictionRefused)
		}
	}
	if n := counts[hotplug.Name]; n != 0 {
		t.Errorf("the hotplug pod of a VM on the node was asked to evict %d times", n)
	}
	if _, ok := sc.podPhase(sc.ns, hotplug.Name, hotplug.UID); !ok {
		t.Error("the hotplug pod of a VM on the node is gone")
	}
	a.waitStatus(10*time.Second, "the two refused pods counted", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Draining && st.PodsLeft == 2
	})
	a.checkMetrics(map[string]float64{`node_agent_pods_left{node="` + node + `"}`: 2})

	// (No disruption controller runs here: a budget left alone would refuse with 429.)
	for _, name := range []string{"budget-a", "budget-b"} {
		if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	sc.allowEvictions()
	a.waitStatus(90*time.Second, "the refused pods evicted once allowed", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.PodsLeft == 0 && len(st.VMs) == 1
	})
	a.checkMetrics(map[string]float64{`node_agent_pods_left{node="` + node + `"}`: 0})
}

func sortedCounts(m map[string]int) []string {
	var out []string
	for k, v := range m {
		out = append(out, fmt.Sprintf("%s=%d", k, v))
	}
	sort.Strings(out)
	return out
}

// denyEvictionOf makes a ValidatingAdmissionPolicy deny the eviction of the pod named
// pod in the scenario's namespace, and waits until it is in force.
func (sc *scenario) denyEvictionOf(pod string) {
	sc.t.Helper()
	name := "deny-eviction-" + sc.ns
	adm := sc.kube().AdmissionregistrationV1()
	if _, err := adm.ValidatingAdmissionPolicies().Create(sc.ctx, &admissionv1.ValidatingAdmissionPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: ptr.To(admissionv1.Fail),
			MatchConstraints: &admissionv1.MatchResources{ResourceRules: []admissionv1.NamedRuleWithOperations{{
				RuleWithOperations: admissionv1.RuleWithOperations{
					Operations: []admissionv1.OperationType{admissionv1.Create},
					Rule:       admissionv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods/eviction"}},
				},
			}}},
			Validations: []admissionv1.Validation{{
				Expression: fmt.Sprintf("object.metadata.name != %q", pod),
				Message:    "evictions of " + pod + " are not allowed here",
			}},
		},
	}, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	if _, err := adm.ValidatingAdmissionPolicyBindings().Create(sc.ctx, &admissionv1.ValidatingAdmissionPolicyBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionv1.ValidatingAdmissionPolicyBindingSpec{
			PolicyName:        name,
			ValidationActions: []admissionv1.ValidationAction{admissionv1.Deny},
			MatchResources: &admissionv1.MatchResources{NamespaceSelector: &metav1.LabelSelector{
				MatchLabels: map[string]string{corev1.LabelMetadataName: sc.ns},
			}},
		},
	}, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	sc.t.Cleanup(sc.allowEvictions)
	sc.eventually(30*time.Second, "the admission policy in force", func() (bool, string) {
		err := sc.kube().PolicyV1().Evictions(sc.ns).Evict(sc.ctx, &policyv1.Eviction{
			ObjectMeta:    metav1.ObjectMeta{Name: pod, Namespace: sc.ns},
			DeleteOptions: &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}},
		})
		return err != nil, fmt.Sprint(err)
	})
}

// allowEvictions deletes the policy of denyEvictionOf.
func (sc *scenario) allowEvictions() {
	name := "deny-eviction-" + sc.ns
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	adm := sc.kube().AdmissionregistrationV1()
	_ = adm.ValidatingAdmissionPolicyBindings().Delete(ctx, name, metav1.DeleteOptions{})
	_ = adm.ValidatingAdmissionPolicies().Delete(ctx, name, metav1.DeleteOptions{})
}
