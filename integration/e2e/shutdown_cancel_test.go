package e2e

// A cancelled host shutdown always gives the node back (issue 9.2), on the real logind
// and the real API server: the cancel is recorded on the Node before anything else, a
// re-enable the API server refuses is reported and retried, no VM is evicted for the
// cancelled shutdown, and an agent killed during the cancel finishes it when it starts
// again.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/nodeinfo"
)

// refuseUncordon installs a ValidatingAdmissionPolicy that refuses, for everyone, every
// update that uncordons node, and waits until the API server enforces it (a dry-run
// uncordon is refused). It returns the function that lifts it.
func (sc *scenario) refuseUncordon(node string) (lift func()) {
	sc.t.Helper()
	name := "e2e-refuse-uncordon-" + node
	ar := sc.kube().AdmissionregistrationV1()
	policy := &admissionregistrationv1.ValidatingAdmissionPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionregistrationv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: ptr.To(admissionregistrationv1.Fail),
			MatchConstraints: &admissionregistrationv1.MatchResources{
				ResourceRules: []admissionregistrationv1.NamedRuleWithOperations{{
					RuleWithOperations: admissionregistrationv1.RuleWithOperations{
						Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Update},
						Rule:       admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"nodes"}},
					},
				}},
			},
			Validations: []admissionregistrationv1.Validation{{
				Expression: fmt.Sprintf("object.metadata.name != %q || !oldObject.spec.?unschedulable.orValue(false) || object.spec.?unschedulable.orValue(false)", node),
				Message:    "e2e: uncordoning node " + node + " is refused for now",
			}},
		},
	}
	if _, err := ar.ValidatingAdmissionPolicies().Create(sc.ctx, policy, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	binding := &admissionregistrationv1.ValidatingAdmissionPolicyBinding{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: admissionregistrationv1.ValidatingAdmissionPolicyBindingSpec{
			PolicyName:        name,
			ValidationActions: []admissionregistrationv1.ValidationAction{admissionregistrationv1.Deny},
		},
	}
	if _, err := ar.ValidatingAdmissionPolicyBindings().Create(sc.ctx, binding, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	lifted := false
	lift = func() {
		if lifted {
			return
		}
		lifted = true
		_ = ar.ValidatingAdmissionPolicyBindings().Delete(sc.ctx, name, metav1.DeleteOptions{})
		_ = ar.ValidatingAdmissionPolicies().Delete(sc.ctx, name, metav1.DeleteOptions{})
	}
	sc.t.Cleanup(lift)
	sc.eventually(time.Minute, "the API server to refuse uncordoning "+node, func() (bool, string) {
		n := sc.node(node)
		if !n.Spec.Unschedulable {
			return false, "the node is not cordoned"
		}
		n.Spec.Unschedulable = false
		_, err := sc.kube().CoreV1().Nodes().Update(sc.ctx, n, metav1.UpdateOptions{DryRun: []string{metav1.DryRunAll}})
		return apierrors.IsForbidden(err) || apierrors.IsInvalid(err), fmt.Sprintf("dry-run uncordon: %v", err)
	})
	return lift
}

// shutdownRecordOf reads the agent's shutdown record on a node.
func shutdownRecordOf(n *corev1.Node) (agent.ShutdownRecord, bool) {
	var sd agent.ShutdownRecord
	raw, ok := n.Annotations[agent.AnnotationShutdown]
	return sd, ok && json.Unmarshal([]byte(raw), &sd) == nil
}

// givenBack says whether the agent's taint, cordon and records are off the node.
func givenBack(n *corev1.Node) (bool, string) {
	_, owned := n.Annotations[agent.AnnotationOwned]
	_, recorded := n.Annotations[agent.AnnotationShutdown]
	_, draining := n.Annotations[agent.AnnotationDrain]
	return !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !n.Spec.Unschedulable && !owned && !recorded && !draining,
		fmt.Sprintf("taints %v, unschedulable %v, annotations %v", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
}

// shutdownTakesTheNode starts logind and the agent for node (its flags returned, to start
// it again), asks for a power-off and waits until the agent has recorded the shutdown on
// the node and taken it out of service.
func (sc *scenario) shutdownTakesTheNode(node string) (*logind.Env, []string, *agentProc) {
	sc.t.Helper()
	env := sc.startLogind()
	flags := []string{"--shutdown-timeout=3m", "--logind-dropin-dir=" + env.DropInDir}
	a := sc.startShutdownAgent(node, env, flags...)
	sc.waitInhibitDelayMax(env, 3*time.Minute)
	bootID := sc.node(node).Status.NodeInfo.BootID
	sc.powerOff(env)
	sc.waitOutOfService(node, bootID)
	if sd, ok := shutdownRecordOf(sc.node(node)); !ok || sd.BootID != bootID || sd.Cancelled != nil {
		sc.t.Errorf("shutdown record %q, want the pending shutdown with boot ID %s", sc.node(node).Annotations[agent.AnnotationShutdown], bootID)
	}
	return env, flags, a
}

// A host shutdown held by a VM whose eviction a PodDisruptionBudget refuses is
// cancelled (logind restarts and forgets it) while the API server refuses to uncordon
// the node. The agent records the cancel on the Node first, reports the refused
// re-enable (Warning event, metric, /readyz) and retries it with a backoff, and evicts
// nothing when the budget is lifted: the shutdown was cancelled. Killed then, and
// started again once the refusal is lifted, the agent finds the recorded cancel and
// gives the node back. Before the fix the agent's own taint kept draining the node (the
// VM was evicted within a second of the budget going) and a restarted agent never gave
// the node back.
func TestShutdownCancelRefusedReenableReportedRetriedAndFinishedAfterAKill(t *testing.T) {
	sc := newScenario(t, 2)
	node := sc.nodes[0]
	guest := sc.pinned("guest", node, noneStrategy)
	pdb, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "guest"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(1)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{kubevirtv1.CreatedByLabel: string(guest.UID)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := sc.launcherPod(guest, node)
	env, flags, a := sc.shutdownTakesTheNode(node)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "guest", agent.ReasonEvictionRefused, time.Minute)
	lift := sc.refuseUncordon(node)

	if err := env.RestartLogind(sc.ctx, false); err != nil {
		t.Fatal(err)
	}
	sc.eventually(time.Minute, "the cancel recorded on the node", func() (bool, string) {
		sd, ok := shutdownRecordOf(sc.node(node))
		return ok && sd.Cancelled != nil, sc.node(node).Annotations[agent.AnnotationShutdown]
	})
	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, pdb.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Three refusals: 1 s and 2 s of backoff after the first, while the budget no longer
	// holds the VM and the agent's resync is 1 s.
	sc.eventually(time.Minute, "three refused re-enables", func() (bool, string) {
		v, ok := a.metric("node_agent_node_update_failures_total")
		return ok && v >= 3, fmt.Sprint(v)
	})
	if v, ok := a.metric("node_agent_reenable_failing"); !ok || v != 1 {
		t.Errorf("node_agent_reenable_failing %v (%v), want 1", v, ok)
	}
	if code, body := a.get("/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "re-enable") {
		t.Errorf("/readyz while the re-enable is refused: %d %q, want 503 naming it", code, body)
	}
	if code, st := a.safeToShutdown(""); code != http.StatusServiceUnavailable || !st.Ready || st.Draining || len(st.VMs) != 1 {
		t.Errorf("/safe-to-shutdown while the re-enable is refused: %s, want the VM listed, not draining", statusJSON(code, st))
	}
	ev := sc.nodeEvent(node, agent.ReasonNodeUpdateFailed)
	if ev.Type != corev1.EventTypeWarning || !strings.Contains(ev.Message, "uncordoning node "+node+" is refused") {
		t.Errorf("%s event %s %q, want a Warning with the API server's refusal", ev.Reason, ev.Type, ev.Message)
	}
	sc.podUntouched(pod, "the shutdown was cancelled")
	if n := sc.eventCount(sc.ns, "VirtualMachineInstance", "guest", agent.ReasonShutdownRequested); n != 0 {
		t.Errorf("%d %s events on the VM of a cancelled shutdown", n, agent.ReasonShutdownRequested)
	}

	a.kill()
	lift()
	a = sc.startShutdownAgent(node, env, flags...)
	sc.eventually(time.Minute, "the restarted agent to give the node back", func() (bool, string) {
		return givenBack(sc.node(node))
	})
	if ev := sc.nodeEvent(node, agent.ReasonNodeReenabled); !strings.Contains(ev.Message, "cancelled") {
		t.Errorf("%s event %q does not say the shutdown was cancelled", ev.Reason, ev.Message)
	}
	sc.eventually(30*time.Second, "/readyz after the node was given back", func() (bool, string) {
		code, body := a.get("/readyz")
		return code == http.StatusOK, body
	})
	if v, ok := a.metric("node_agent_reenable_failing"); !ok || v != 0 {
		t.Errorf("node_agent_reenable_failing %v (%v) after the node was given back, want 0", v, ok)
	}
	sc.podUntouched(pod, "the shutdown was cancelled")
	if after := sc.vmi("guest"); after == nil || after.UID != guest.UID || after.Status.NodeName != node || after.Status.Phase != kubevirtv1.Running {
		t.Errorf("the VM of the cancelled shutdown did not stay running where it was: %s", describeVMI(after))
	}
}

// A cancel with the agent killed right after it (before it could give the node back,
// or just after: either way the node ends given back), and started again.
func TestShutdownCancelThenAgentKilledNodeGivenBack(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	sc.createVM("blocked", liveMigrate, notMigratable, onNode(node))
	env, flags, a := sc.shutdownTakesTheNode(node)
	a.waitStatus(time.Minute, "the blocked VM holding the shutdown", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Draining && st.Trigger == agent.TriggerShutdown && len(st.VMs) == 1
	})
	if err := env.RestartLogind(sc.ctx, false); err != nil {
		t.Fatal(err)
	}
	a.waitLogged("host shutdown cancelled", 1)
	a.kill()
	n := sc.node(node)
	sd, recorded := shutdownRecordOf(n)
	given, state := givenBack(n)
	t.Logf("at the kill: given back %v, cancel recorded %v (%s)", given, recorded && sd.Cancelled != nil, state)
	a = sc.startShutdownAgent(node, env, flags...)
	sc.eventually(time.Minute, "the node given back", func() (bool, string) { return givenBack(sc.node(node)) })
	a.waitStatus(30*time.Second, "the agent not draining", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return !st.Draining })
}
