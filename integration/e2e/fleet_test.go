package e2e

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/fleet"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

// fleetHost is one host of a fleet test: its node, its own logind and its agent.
type fleetHost struct {
	node  string
	env   *logind.Env
	agent *agentProc
	vms   *vmWatch
	asked time.Time // when its power-off was asked for
	boot  string    // its boot ID before the power-off
	off   bool      // its power-off went ahead (and the test rebooted it)
	flags []string  // its agent's
}

// fleetMonitor follows a fleet's nodes and VMs every 200 ms from the API server: the
// most nodes drained at once (out of service with VMs still on them), the agent's state
// annotation of each node as it changed, and whether the waiting taint was seen.
type fleetMonitor struct {
	mu          sync.Mutex
	maxDraining int
	atMax       string
	states      map[string][]string
	waitTaint   map[string]bool
	maxCordoned int // the most nodes cordoned at once (out of service, or waiting their reboot)
}

func (sc *scenario) monitorFleet(ctx context.Context, nodes []string) *fleetMonitor {
	m := &fleetMonitor{states: map[string][]string{}, waitTaint: map[string]bool{}}
	go func() {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			vmis := &kubevirtv1.VirtualMachineInstanceList{}
			if err := sc.env.cluster.KubeVirt.Get().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(vmis); err != nil {
				continue
			}
			on := map[string]int{}
			for _, v := range vmis.Items {
				if !v.IsFinal() {
					on[v.Status.NodeName]++
				}
			}
			var draining []string
			cordoned := 0
			for _, name := range nodes {
				n, err := sc.kube().CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
				if err != nil {
					continue
				}
				_, owned, _ := ownershipOf(n)
				if n.Spec.Unschedulable {
					cordoned++
				}
				if n.Spec.Unschedulable && owned && on[name] > 0 {
					draining = append(draining, fmt.Sprintf("%s (%d VMs)", name, on[name]))
				}
				m.mu.Lock()
				if s := n.Annotations[agent.AnnotationState]; s != "" {
					if h := m.states[name]; len(h) == 0 || h[len(h)-1] != s {
						m.states[name] = append(h, s)
					}
				}
				for _, t := range n.Spec.Taints {
					if t.Key == agent.TaintWaiting && t.Effect == corev1.TaintEffectPreferNoSchedule {
						m.waitTaint[name] = true
					}
				}
				m.mu.Unlock()
			}
			m.mu.Lock()
			m.maxCordoned = max(m.maxCordoned, cordoned)
			if len(draining) > m.maxDraining {
				m.maxDraining, m.atMax = len(draining), strings.Join(draining, ", ")
			}
			m.mu.Unlock()
		}
	}()
	return m
}

// A fleet reboot with --max-concurrent-drains=1: four hosts, each with its own logind
// and agent, three of them with two LiveMigrate VMs. The empty host is powered off
// first (it drains nothing and goes at once); while it is down, the other three are
// told to power off in the same moment. Their VMs fit nowhere (the empty host is out of
// service, the others are about to go), so the first in line waits for room, saying
// why; when the empty host is back (the test reboots each host once logind powers it
// off: a new boot ID, a fresh logind and agent), one host drains at a time onto the
// hosts already rebooted, while the others wait with their shutdowns held, the agent's
// PreferNoSchedule taint on them and a DrainWaiting event. Checked: never more than one
// host drained at once; every host powered off with no VM on it, after its last VM
// left; every VM still running, the same VMI (live-migrated, never shut down); the
// nodes given back; the queue's Leases left with no holder.
func TestFleetRebootOneHostAtATime(t *testing.T) {
	sc := newScenario(t, 4)
	spare := sc.nodes[3]
	hosts := map[string]*fleetHost{}
	var vms []*kubevirtv1.VirtualMachineInstance
	for i, node := range sc.nodes {
		if node != spare {
			for j := range 2 {
				vms = append(vms, sc.pinned(fmt.Sprintf("vm-%d-%d", i, j), node, liveMigrate, sim.WithMigrationDuration(2*time.Second)))
			}
		}
		hosts[node] = sc.startFleetHost(node, 6*time.Minute, "--max-concurrent-drains=1", "--max-turn-wait=3m")
	}
	ctx, stop := context.WithCancel(sc.ctx)
	defer stop()
	mon := sc.monitorFleet(ctx, sc.nodes)

	// poweredOff checks a host whose power-off went ahead: after its last VM left, and
	// just after the agent released its lock; then reboots it.
	poweredOff := func(h *fleetHost) {
		t.Helper()
		sc.waitReleasedWhenEmpty(h.env, h.agent, h.vms, h.asked, time.Minute)
		t.Logf("%s powered off %s after it was asked to", h.node, time.Since(h.asked).Round(time.Second))
		sc.reboot(h)
	}

	s := hosts[spare]
	s.asked = sc.powerOff(s.env)
	sc.waitOutOfService(spare, s.boot)
	sc.powerOffAll([]*fleetHost{hosts[sc.nodes[0]], hosts[sc.nodes[1]], hosts[sc.nodes[2]]})
	// The three wait: no room while the empty host is out of service.
	for _, node := range sc.nodes[:3] {
		st := hosts[node].agent.waitStatus(time.Minute, "waiting for its turn", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
			return st.Turn != nil && st.Turn.Waiting
		})
		if st.Draining || len(st.VMs) != 2 {
			t.Errorf("%s waiting its turn: draining %v with %d VMs, want not draining, its 2 VMs on it", node, st.Draining, len(st.VMs))
		}
	}
	sc.eventually(time.Minute, "the host first in line to say that its VMs fit nowhere", func() (bool, string) {
		var seen []string
		for _, node := range sc.nodes[:3] {
			_, st := hosts[node].agent.safeToShutdown("")
			if st.Turn != nil && st.Turn.Position == 1 && strings.Contains(st.Turn.Reason, "fits on none of the") {
				return true, ""
			}
			seen = append(seen, fmt.Sprintf("%s: %s", node, st.Turn))
		}
		return false, strings.Join(seen, "; ")
	})
	poweredOff(s) // back: room for the others

	for len(offHosts(hosts)) < len(hosts) {
		poweredOff(sc.nextPoweredOff(hosts, 5*time.Minute))
	}
	stop()

	mon.mu.Lock()
	defer mon.mu.Unlock()
	t.Logf("most hosts drained at once: %d (%s)", mon.maxDraining, mon.atMax)
	if mon.maxDraining > 1 {
		t.Errorf("%d hosts drained at once (%s), want at most 1 (--max-concurrent-drains=1)", mon.maxDraining, mon.atMax)
	}
	waited := 0
	for _, node := range sc.nodes[:3] {
		t.Logf("%s states: %s", node, strings.Join(mon.states[node], " | "))
		if sc.eventCount(metav1.NamespaceDefault, "Node", node, agent.ReasonDrainWaiting) > 0 && mon.waitTaint[node] {
			waited++
		}
	}
	if waited < 2 {
		t.Errorf("%d hosts waited their turn with a %s event and the %s taint, want at least the two behind the first", waited, agent.ReasonDrainWaiting, agent.TaintWaiting)
	}
	migrations := 0
	for _, before := range vms {
		after := sc.vmi(before.Name)
		if after == nil || after.UID != before.UID || after.Status.Phase != kubevirtv1.Running {
			t.Errorf("VM %s: %s, want the same VMI running (live-migrated, never shut down)", before.Name, describeVMI(after))
		}
		ms := sc.migrationsOf(before.Name)
		migrations += len(ms)
		if len(ms) > 1 {
			var hops []string
			for _, m := range ms {
				target := ""
				if m.Status.MigrationState != nil {
					target = m.Status.MigrationState.SourceNode + " -> " + m.Status.MigrationState.TargetNode
				}
				hops = append(hops, fmt.Sprintf("%s %s %s", m.Name, m.Status.Phase, target))
			}
			t.Logf("VM %s migrated %d times: %s", before.Name, len(ms), strings.Join(hops, "; "))
		}
	}
	t.Logf("%d migrations for %d VMs", migrations, len(vms))
	for _, node := range sc.nodes {
		sc.waitGivenBackAfterReboot(node)
	}
	leases, err := sc.kube().CoordinationV1().Leases(sc.ns).List(sc.ctx, metav1.ListOptions{LabelSelector: fleet.LabelTurn})
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range leases.Items {
		if h := ptrString(l.Spec.HolderIdentity); l.Labels[fleet.LabelTurn] == "ticket" || h != "" {
			t.Errorf("lease %s (%s) still held by %q after every host rebooted", l.Name, l.Labels[fleet.LabelTurn], h)
		}
	}
}

// startFleetHost starts a host of a fleet test: its own logind, its agent with flags
// (and its logind drop-in folder, so that InhibitDelayMaxSec is raised to hold), and
// the VMs watch. The VMs are put on it before.
func (sc *scenario) startFleetHost(node string, hold time.Duration, flags ...string) *fleetHost {
	sc.t.Helper()
	h := &fleetHost{node: node, env: sc.startLogind()}
	h.flags = append([]string{"--logind-dropin-dir=" + h.env.DropInDir, "--shutdown-timeout=" + hold.String()}, flags...)
	h.agent = sc.startShutdownAgent(node, h.env, h.flags...)
	sc.waitInhibitDelayMax(h.env, hold)
	h.vms = sc.watchVMs(node)
	h.boot = sc.node(node).Status.NodeInfo.BootID
	return h
}

// powerOffAll asks the logind of every host for a power-off, all at once.
func (sc *scenario) powerOffAll(hosts []*fleetHost) {
	var wg sync.WaitGroup
	for _, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.asked = time.Now()
			if err := h.env.PowerOff(sc.ctx); err != nil {
				sc.t.Errorf("logind PowerOff on %s: %v", h.node, err)
			}
		}()
	}
	wg.Wait()
}

// nextPoweredOff waits until logind powers off one of the hosts not rebooted yet.
func (sc *scenario) nextPoweredOff(hosts map[string]*fleetHost, timeout time.Duration) *fleetHost {
	sc.t.Helper()
	var next *fleetHost
	sc.eventually(timeout, "a host's power-off to go ahead", func() (bool, string) {
		for _, node := range sc.nodes {
			h := hosts[node]
			if h == nil || h.off {
				continue
			}
			if _, ok, err := h.env.StartUnitAt(sc.ctx, powerOffUnit, h.asked); err == nil && ok {
				next = h
				return true, ""
			}
		}
		return false, fmt.Sprintf("powered off: %v", offHosts(hosts))
	})
	return next
}

// reboot brings a host that powered off back: a new boot ID (its VMs' pods gone, as
// after a real reboot), a fresh logind and a fresh agent, which gives the node back.
func (sc *scenario) reboot(h *fleetHost) {
	sc.t.Helper()
	h.agent.kill()
	if err := sc.env.sim.Reboot(sc.ctx, h.node); err != nil {
		sc.t.Fatal(err)
	}
	if err := h.env.RestartLogind(sc.ctx, false); err != nil {
		sc.t.Fatal(err)
	}
	h.agent = sc.startShutdownAgent(h.node, h.env, h.flags...)
	h.off = true
}

func offHosts(hosts map[string]*fleetHost) []string {
	var out []string
	for n, h := range hosts {
		if h.off {
			out = append(out, n)
		}
	}
	return out
}

func ptrString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// waitGivenBackAfterReboot waits until the agent of a rebooted node removed what it
// had added (its taints, its cordon, its records).
func (sc *scenario) waitGivenBackAfterReboot(node string) {
	sc.t.Helper()
	sc.eventually(time.Minute, "node "+node+" given back after its reboot", func() (bool, string) {
		n := sc.node(node)
		_, owned := n.Annotations[agent.AnnotationOwned]
		_, recorded := n.Annotations[agent.AnnotationShutdown]
		return !n.Spec.Unschedulable && !owned && !recorded && !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey) && !hasTaintKey(n, agent.TaintWaiting),
			fmt.Sprintf("unschedulable %v, taints %v, annotations %v", n.Spec.Unschedulable, n.Spec.Taints, n.Annotations)
	})
}

// The slot of a host whose agent is gone (the host crashed, lost power) is free once
// its Lease expires, never before: two hosts told to power off one after the other,
// the first holding the slot and draining a VM whose migration takes a minute, the
// second waiting; the first's agent is killed mid-drain (its lock goes with it, as the
// host's would) and never comes back. The second takes the slot no sooner than the
// first's last renewal plus the Lease's 30 s, then drains, and powers off after its
// last VM left.
func TestFleetSlotOfAGoneAgentExpires(t *testing.T) {
	sc := newScenario(t, 3)
	first, second := sc.nodes[0], sc.nodes[1] // the third, with no agent, has room
	sc.pinned("slow", first, liveMigrate, sim.WithMigrationDuration(time.Minute))
	sc.pinned("vm", second, liveMigrate, sim.WithMigrationDuration(2*time.Second))
	hosts := map[string]*fleetHost{}
	for _, node := range []string{first, second} {
		hosts[node] = sc.startFleetHost(node, 6*time.Minute, "--max-concurrent-drains=1", "--max-turn-wait=3m")
	}
	a, b := hosts[first], hosts[second]
	a.asked = sc.powerOff(a.env)
	a.agent.waitStatus(time.Minute, "its turn, the slow VM migrating", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "slow")
		return st.Turn != nil && !st.Turn.Waiting && v != nil && v.State == agent.StateMigrating
	})
	b.asked = sc.powerOff(b.env)
	b.agent.waitStatus(time.Minute, "waiting for its turn behind "+first, http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Turn != nil && st.Turn.Waiting && slices.Contains(st.Turn.Draining, first)
	})

	slot := fleet.SlotName(0)
	before, err := sc.kube().CoordinationV1().Leases(sc.ns).Get(sc.ctx, slot, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a.agent.kill()
	after := b.agent.waitStatus(2*time.Minute, "its turn once the gone agent's slot expired", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return st.Turn != nil && !st.Turn.Waiting
	})
	l, err := sc.kube().CoordinationV1().Leases(sc.ns).Get(sc.ctx, slot, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// The first's last renewal as the Lease showed it just before the kill, or a later
	// one (it renews every 10 s): the second's take must come after it plus 30 s in any case.
	lastRenew := before.Spec.RenewTime.Time
	expiry := lastRenew.Add(fleet.DefaultLeaseDuration)
	t.Logf("slot %s: %s's last renewal seen %s, taken by %s at %s (%s later)", slot, first, lastRenew.Format(time.StampMilli),
		ptrString(l.Spec.HolderIdentity), l.Spec.AcquireTime.Format(time.StampMilli), l.Spec.AcquireTime.Sub(lastRenew).Round(time.Millisecond))
	if ptrString(l.Spec.HolderIdentity) != second || after.Turn.Slot != slot {
		t.Errorf("slot %s held by %q (turn %+v), want %s", slot, ptrString(l.Spec.HolderIdentity), after.Turn, second)
	}
	if l.Spec.AcquireTime.Time.Before(expiry) {
		t.Errorf("%s took the slot at %s, before %s's Lease expired at %s", second, l.Spec.AcquireTime.Format(time.StampMilli), first, expiry.Format(time.StampMilli))
	}
	sc.waitReleasedWhenEmpty(b.env, b.agent, b.vms, b.asked, 2*time.Minute)
}

// A rollout's mark on the real cluster, placement by the real scheduler: node B, marked
// as not yet reached by a rollout (the annotation names its boot ID), gets its agent's
// PreferNoSchedule waiting taint and a RolloutPending event; node A's drain then moves
// every VM to C (already done), none to B. B's reboot (a new boot ID) takes the taint
// away with the rest of what its agent added.
func TestRolloutMarkSteersMigrationsToNodesDone(t *testing.T) {
	sc := newScenario(t, 3)
	a, b, c := sc.nodes[0], sc.nodes[1], sc.nodes[2]
	var vms []*kubevirtv1.VirtualMachineInstance
	for i := range 3 {
		vms = append(vms, sc.pinned(fmt.Sprintf("vm%d", i), a, liveMigrate, sim.WithMigrationDuration(2*time.Second)))
	}
	agentA := sc.startAgent(a)
	sc.startAgent(b)
	sc.startAgent(c)

	boot := sc.node(b).Status.NodeInfo.BootID
	sc.patchNode(b, func(n *corev1.Node) {
		if n.Annotations == nil {
			n.Annotations = map[string]string{}
		}
		n.Annotations[agent.AnnotationRolloutPending] = boot
	})
	sc.eventually(time.Minute, "node B to carry the agent's waiting taint, recorded as its own", func() (bool, string) {
		n := sc.node(b)
		own, owned, _ := ownershipOf(n)
		return hasTaintKey(n, agent.TaintWaiting) && owned && own.Waiting && !n.Spec.Unschedulable, fmt.Sprintf("taints %v, annotations %v", n.Spec.Taints, n.Annotations)
	})
	sc.waitEvent(metav1.NamespaceDefault, "Node", b, agent.ReasonRolloutPending, time.Minute)
	for _, n := range []string{a, c} {
		if hasTaintKey(sc.node(n), agent.TaintWaiting) {
			t.Errorf("node %s, not marked, carries the waiting taint", n)
		}
	}

	sc.taint(a, nodeinfo.DefaultDrainTaintKey)
	for _, vm := range vms {
		sc.waitMigrated(vm, c)
	}
	agentA.waitSafe(2 * time.Minute)
	for _, vm := range vms {
		for _, m := range sc.migrationsOf(vm.Name) {
			if m.Status.MigrationState != nil && m.Status.MigrationState.TargetNode == b {
				t.Errorf("VM %s was migrated to the marked node B (migration %s)", vm.Name, m.Name)
			}
		}
	}

	if err := sc.env.sim.Reboot(sc.ctx, b); err != nil {
		t.Fatal(err)
	}
	sc.waitGivenBackAfterReboot(b)
	if n := sc.node(b); n.Annotations[agent.AnnotationRolloutPending] != boot {
		t.Errorf("the rollout's mark on B: %q, want it left as the operator wrote it (%q)", n.Annotations[agent.AnnotationRolloutPending], boot)
	}
}

// The capacity check reads the cluster's pods a page at a time (fleet.PageSize) and
// counts every page: on the real API server, a node with more pods than one page holds
// has room for a VM only if the last pod is left out. Two simulated nodes of the
// test's own pool: one with PageSize+1 pods of 100Mi and 3Gi over them, one away (its
// return would make room). A VM of 3Gi fits; one of 3Gi+50Mi fits only if a page
// was not counted, and waits.
func TestCapacityCheckCountsEveryPage(t *testing.T) {
	sc := newScenario(t, 0)
	const each = 100 << 20
	pods := fleet.PageSize + 1
	mem := func(b int64) resource.Quantity { return *resource.NewQuantity(b, resource.BinarySI) }
	full := sc.addNode(sim.WithAllocatable(corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("1000"), corev1.ResourceMemory: mem(int64(pods)*each + 3<<30), corev1.ResourcePods: resource.MustParse("1000")}))
	away := sc.addNode()
	var wg sync.WaitGroup
	work := make(chan int)
	errs := make(chan error, pods)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: sc.ns, Name: fmt.Sprintf("filler-%04d", i)}, Spec: corev1.PodSpec{
					NodeName: full,
					Containers: []corev1.Container{{Name: "c", Image: "filler", Resources: corev1.ResourceRequirements{
						Requests: corev1.ResourceList{corev1.ResourceMemory: mem(each)}}}}}}
				if _, err := sc.kube().CoreV1().Pods(sc.ns).Create(sc.ctx, p, metav1.CreateOptions{}); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := range pods {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("creating the pods that fill %s: %v", full, err)
	}
	t.Cleanup(func() {
		zero := int64(0)
		_ = sc.kube().CoreV1().Pods(sc.ns).DeleteCollection(context.Background(), metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
	})
	vm := func(b int64) []*corev1.Pod {
		return []*corev1.Pod{{ObjectMeta: metav1.ObjectMeta{Namespace: sc.ns, Name: "vm"}, Spec: corev1.PodSpec{
			NodeSelector: map[string]string{poolLabel: sc.pool},
			Containers:   []corev1.Container{{Name: "compute", Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceMemory: mem(b)}}}}}}}
	}
	fits := func(b int64) string {
		why, err := fleet.Fits(sc.ctx, sc.kube(), "elsewhere", vm(b), nil, []string{away}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		return why
	}
	if why := fits(3 << 30); why != "" {
		t.Errorf("a VM of 3Gi beside %d pods of 100Mi on a node of %d×100Mi+3Gi: %q, want it fits", pods, pods, why)
	}
	if why := fits(3<<30 + 50<<20); !strings.Contains(why, "fits on none of the") {
		t.Errorf("a VM of 3Gi+50Mi there: %q, want it does not fit (every page of pods counted) and waits for %s", why, away)
	}
}
