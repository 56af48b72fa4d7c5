package e2e

// Refused evictions back off per VM (issue 9): counted in the API server's audit log.

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
)

// maxRefusedPerMinute is the bound a user checks: a VM whose eviction is refused is asked
// again with a backoff (2 s, doubling), so at most 6 times in the drain's first minute
// (at 0, 2, 6, 14, 30 s, and the resync's lag), not once per event or resync.
const maxRefusedPerMinute = 6

// A busy drain of 20 VMs: 10 LiveMigrate VMs migrate (KubeVirt runs two at a time per
// node, each VMI changing status many times), while a PodDisruptionBudget refuses the
// eviction of the 10 None VMs. Over the drain's first minute, the API server's audit log
// shows each refused VM's pod asked at most maxRefusedPerMinute times; each refused VM
// has one EvictionRefused event; once the budget is deleted, the drain completes.
func TestDrainRefusedEvictionsBackOff(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	var live, held []string
	for i := 0; i < 10; i++ {
		live = append(live, fmt.Sprintf("live%d", i))
		sc.pinned(live[i], node, liveMigrate, sim.WithMigrationDuration(3*time.Second))
		held = append(held, fmt.Sprintf("held%d", i))
		sc.pinned(held[i], node, noneStrategy, sim.WithLabels(map[string]string{"budget": "held"}))
	}
	if _, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "held"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(10)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{"budget": "held", kubevirtv1.AppLabel: "virt-launcher"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// (No disruption controller runs here: the budget's status is never computed, and
	// the API server refuses every eviction it covers with 429, as a budget at its
	// minimum does.)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	start := time.Now()
	sc.taint(node, agentOnlyKey)
	for _, name := range live {
		sc.waitVMIOffNode(name, node)
	}
	busy := time.Since(start)
	sc.eventually(2*time.Minute, "a minute of drain to pass", func() (bool, string) {
		return time.Since(start) >= time.Minute+5*time.Second, ""
	})
	a.waitStatus(10*time.Second, "the held VMs reported refused", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		for _, name := range held {
			v := vmStatus(st, sc.ns, name)
			if v == nil || v.State != agent.StatePending || !strings.Contains(v.Detail, "eviction refused") {
				return false
			}
		}
		return len(st.VMs) == len(held)
	})

	counts, err := evictionsPerPod(sc.env.cluster.AuditLog, sc.ns, start, start.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	var perVM []int
	for _, name := range held {
		n := counts[sc.launcherPod(sc.vmi(name), node).Name]
		perVM = append(perVM, n)
		if n == 0 || n > maxRefusedPerMinute {
			t.Errorf("VM %s: %d eviction requests in the drain's first minute, want 1..%d", name, n, maxRefusedPerMinute)
		}
		if got := sc.eventCount(sc.ns, "VirtualMachineInstance", name, agent.ReasonEvictionRefused); got != 1 {
			t.Errorf("VM %s: %d %s events, want 1", name, got, agent.ReasonEvictionRefused)
		}
	}
	sort.Ints(perVM)
	t.Logf("eviction requests per refused VM in the first minute (the %d migrations took %s): %v", len(live), busy.Round(time.Second), perVM)

	if err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Delete(sc.ctx, "held", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	lifted := time.Now()
	a.waitSafe(2 * time.Minute)
	t.Logf("drain completed %s after the budget was deleted", time.Since(lifted).Round(time.Second))
	for _, name := range live {
		if v := sc.vmi(name); v == nil || v.Status.NodeName != other {
			t.Errorf("LiveMigrate VM %s not on %s", name, other)
		}
	}
}

// evictionsPerPod counts, from the API server's audit log, the eviction requests
// (pods/eviction, dry-run or not) per pod of namespace made between from and to.
func evictionsPerPod(path, namespace string, from, to time.Time) (map[string]int, error) {
	evs, err := readAudit(path, func(ev auditEvent) bool {
		ref := ev.ObjectRef
		return ref != nil && ref.Resource == "pods" && ref.Subresource == "eviction" && ref.Namespace == namespace &&
			!ev.Stamp.Before(from) && ev.Stamp.Before(to)
	})
	counts := map[string]int{}
	for _, ev := range evs {
		counts[ev.ObjectRef.Name]++
	}
	return counts, err
}
