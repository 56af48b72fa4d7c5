package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/node-agent/node-agent/fleet"
	"github.com/node-agent/node-agent/nodeinfo"
)

// stubTurns is the cluster's queue as the engine sees it (fleet.Turns on the real API
// server in integration/e2e/fleet_test.go): it grants the turn when told, or fails.
type stubTurns struct {
	mu       sync.Mutex
	granted  bool
	err      error
	takes    int
	releases int
	holds    bool
	// first: the node is first in line, and the turn is given when fits says its VMs fit.
	first bool
}

func (s *stubTurns) Take(ctx context.Context, _ time.Time, fits fleet.FitsFunc) (fleet.Turn, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.takes++
	if s.err != nil {
		return fleet.Turn{}, "", s.err
	}
	if s.first && (fits == nil || s.granted) { // keepTurn renews it
		return fleet.Turn{Granted: true, Slot: fleet.SlotName(0), Draining: []string{thisNode}, Slots: 1}, "", nil
	}
	if s.first {
		s.holds = true
		why, err := fits(ctx, nil, nil, []string{"node-b"})
		if err != nil || why != "" {
			return fleet.Turn{Position: 1, Waiting: 2, Slots: 1}, why, err
		}
		s.granted = true
		return fleet.Turn{Granted: true, Slot: fleet.SlotName(0), Draining: []string{thisNode}, Slots: 1}, "", nil
	}
	if s.granted {
		s.holds = true
		return fleet.Turn{Granted: true, Slot: fleet.SlotName(0), Draining: []string{thisNode}, Slots: 1}, "", nil
	}
	s.holds = true
	return fleet.Turn{Position: 2, Waiting: 2, Draining: []string{"node-b"}, Slots: 1}, "", nil
}

func (s *stubTurns) Release(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.releases++
	s.holds = false
	return nil
}

func (s *stubTurns) Holds() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.holds
}

func (s *stubTurns) AddChangeHandler(func()) {}

func (s *stubTurns) set(granted bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.granted, s.err = granted, err
}

func turnFixture(t *testing.T) (*fixture, *stubTurns) {
	t.Helper()
	vmi, pod := noneVM("vm")
	f := newFixture(t, testNode(), vmi, pod)
	turns := &stubTurns{}
	f.engine.opts.Turns, f.engine.opts.MaxConcurrentDrains = turns, 1
	return f, turns
}

func (f *fixture) mustSync() {
	f.t.Helper()
	if _, err := f.sync(); err != nil {
		f.t.Fatal(err)
	}
}

// A host shutdown whose turn has not come: the node is neither cordoned nor tainted for
// the drain, carries the agent's PreferNoSchedule taint (recorded as its own), no VM is
// acted on, the status and one DrainWaiting event say where it stands, and the metric
// is 1. When the turn comes, the node is taken out of service and drained; once safe,
// the turn is given back. A cancel then removes the waiting taint with the rest.
func TestShutdownWaitsForItsTurn(t *testing.T) {
	f, turns := turnFixture(t)
	f.engine.ShutdownStarted(t0, t0.Add(10*time.Minute))
	f.mustSync()
	f.mustSync()
	n := f.node()
	if n.Spec.Unschedulable || HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("waiting its turn, the node is cordoned %v, taints %v: want neither", n.Spec.Unschedulable, n.Spec.Taints)
	}
	if !hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule) {
		t.Errorf("taints %v, want %s:PreferNoSchedule", n.Spec.Taints, TaintWaiting)
	}
	var own Ownership
	if ok, _ := readAnnotation(n, AnnotationOwned, &own); !ok || !own.Waiting {
		t.Errorf("ownership %q, want the waiting taint recorded as the agent's", n.Annotations[AnnotationOwned])
	}
	f.noEvictions("no VM is acted on before the node's turn")
	st, _ := f.engine.Status()
	if st.Turn == nil || !st.Turn.Waiting || st.Turn.Position != 2 || st.Draining || st.Safe || len(st.VMs) != 1 {
		t.Errorf("status %+v turn %+v, want waiting 2nd, not draining, not safe, its VM listed", st, st.Turn)
	}
	if want := "host shutdown, waiting for its turn to drain: 2 of 2 waiting, draining: node-b (1 at a time): 1 VM on the node"; st.Summary() != want {
		t.Errorf("summary %q, want %q", st.Summary(), want)
	}
	if got := testutil.ToFloat64(f.engine.metrics.TurnWaiting); got != 1 {
		t.Errorf("node_agent_drain_turn_waiting %v, want 1", got)
	}
	if n := countEvents(f.events(), "Normal "+ReasonDrainWaiting); n != 1 {
		t.Errorf("%d %s events over two looks, want 1", n, ReasonDrainWaiting)
	}

	turns.set(true, nil)
	f.mustSync()
	n = f.node()
	if !n.Spec.Unschedulable || !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("its turn: cordoned %v, taints %v: want the node out of service", n.Spec.Unschedulable, n.Spec.Taints)
	}
	f.mustSync()
	f.mu.Lock()
	sent := len(f.evictions)
	f.mu.Unlock()
	if sent == 0 {
		t.Errorf("its turn: no eviction of the None VM")
	}
	if got := testutil.ToFloat64(f.engine.metrics.TurnWaiting); got != 0 {
		t.Errorf("node_agent_drain_turn_waiting %v during its drain, want 0", got)
	}

	// The VM leaves: safe, the turn is given back.
	for _, store := range []interface{ List() []any }{f.vmis, f.pods} {
		for _, o := range store.List() {
			var err error
			switch o := o.(type) {
			case *corev1.Pod:
				err = f.pods.Delete(o)
			default:
				err = f.vmis.Delete(o)
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	f.mustSync()
	if turns.releases == 0 {
		t.Errorf("safe: the turn was not given back")
	}
	f.engine.ShutdownCancelled()
	f.mustSync()
	if n := f.node(); hasTaint(n, TaintWaiting, corev1.TaintEffectPreferNoSchedule) || !givenBack(n) {
		t.Errorf("after the cancel: taints %v, unschedulable %v, annotations %v: want everything of the agent's gone", n.Spec.Taints, n.Spec.Unschedulable, n.Annotations)
	}
}

// A node first in line whose VMs do not fit reads the cluster again (fleet.Fits lists
// every node and pod of it) only once capacityRecheck has passed, however often it is
// looked at (every change of the queue's Leases wakes it); once they fit, its turn is
// taken.
func TestTurnCapacityCheckedAtMostOncePerRecheck(t *testing.T) {
	f, turns := turnFixture(t)
	turns.first = true
	asked, room := 0, false
	f.engine.fits = func(_ context.Context, _ kubernetes.Interface, node string, mine []*corev1.Pod, _, _, behind []string, _ func(*corev1.Node) bool) (string, error) {
		asked++
		if node != thisNode || len(mine) != 0 || len(behind) != 1 {
			t.Errorf("fits asked for node %s, %d pods to place, behind %v: want %s, 0 (a None VM of a bare VMI needs no room), [node-b]", node, len(mine), behind, thisNode)
		}
		if room {
			return "", nil
		}
		return "no room", nil
	}
	f.engine.ShutdownStarted(t0, t0.Add(30*time.Minute))
	for range 5 {
		f.mustSync()
	}
	if asked != 1 {
		t.Fatalf("the capacity check ran %d times in five looks within %s, want 1", asked, capacityRecheck)
	}
	if st, _ := f.engine.Status(); st.Turn == nil || !st.Turn.Waiting || st.Turn.Reason != "no room" {
		t.Errorf("turn %+v, want waiting, its reason the check's", st.Turn)
	}
	room = true
	f.clock.Step(capacityRecheck - time.Second)
	f.mustSync()
	if asked != 1 || f.node().Spec.Unschedulable {
		t.Fatalf("a second before %s: the check ran %d times (want 1), cordoned %v (want not)", capacityRecheck, asked, f.node().Spec.Unschedulable)
	}
	f.clock.Step(time.Second)
	f.mustSync()
	if asked != 2 {
		t.Errorf("after %s the check ran %d times, want 2", capacityRecheck, asked)
	}
	if n := f.node(); !n.Spec.Unschedulable || !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("its VMs fit: cordoned %v, taints %v: want the node out of service", n.Spec.Unschedulable, n.Spec.Taints)
	}
}

// A capacity check that cannot read the cluster (here RBAC) is said as such, not as
// the queue's failure, while the node waits, and in the event when, queueFailureGrace
// later, it drains out of turn.
func TestTurnCapacityCheckFailureSaysSo(t *testing.T) {
	f, turns := turnFixture(t)
	turns.first = true
	f.engine.fits = func(context.Context, kubernetes.Interface, string, []*corev1.Pod, []string, []string, []string, func(*corev1.Node) bool) (string, error) {
		return "", errors.New(`listing the pods for the capacity check: pods is forbidden`)
	}
	f.engine.ShutdownStarted(t0, t0.Add(30*time.Minute))
	f.mustSync()
	want := "the capacity check cannot read the cluster: listing the pods for the capacity check: pods is forbidden"
	if st, _ := f.engine.Status(); st.Turn == nil || !st.Turn.Waiting || st.Turn.Reason != want {
		t.Errorf("turn %+v, want waiting with the reason %q", st.Turn, want)
	}
	f.clock.Step(queueFailureGrace)
	f.mustSync()
	if n := f.node(); !n.Spec.Unschedulable {
		t.Errorf("%s after the check first failed: not out of service, want it drained out of turn", queueFailureGrace)
	}
	found := false
	for _, e := range f.events() {
		found = found || (strings.HasPrefix(e, "Warning "+ReasonDrainOutOfTurn) && strings.Contains(e, want))
	}
	if !found {
		t.Errorf("events %q: want a %s warning naming %q", f.events(), ReasonDrainOutOfTurn, want)
	}
}

// A node whose turn does not come within MaxTurnWait or half its shutdown's hold, or
// whose queue cannot be used for queueFailureGrace, drains out of turn, with one
// Warning DrainOutOfTurn event.
func TestShutdownDrainsOutOfTurn(t *testing.T) {
	for _, tc := range []struct {
		name  string
		err   error
		hold  time.Duration // the shutdown's deadline, from its start
		after time.Duration
	}{
		{"no turn within --max-turn-wait", nil, 30 * time.Minute, DefaultMaxTurnWait},
		{"no turn within half the hold", nil, 2 * time.Minute, time.Minute},
		{"the queue cannot be used", errors.New(`leases is forbidden`), 10 * time.Minute, queueFailureGrace},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, turns := turnFixture(t)
			turns.set(false, tc.err)
			f.engine.ShutdownStarted(t0, t0.Add(tc.hold))
			f.mustSync()
			f.clock.Step(tc.after - time.Second)
			f.mustSync()
			if f.node().Spec.Unschedulable {
				t.Fatalf("out of service a second before %s", tc.after)
			}
			f.clock.Step(time.Second)
			f.mustSync()
			f.mustSync()
			if n := f.node(); !n.Spec.Unschedulable || !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
				t.Errorf("after %s: cordoned %v, taints %v: want the node drained out of turn", tc.after, n.Spec.Unschedulable, n.Spec.Taints)
			}
			if n := countEvents(f.events(), "Warning "+ReasonDrainOutOfTurn); n != 1 {
				t.Errorf("%d %s events, want 1", n, ReasonDrainOutOfTurn)
			}
			if st, _ := f.engine.Status(); st.Turn == nil || !st.Turn.OutOfTurn {
				t.Errorf("turn %+v, want out of turn", st.Turn)
			}
		})
	}
}

func countEvents(events []string, prefix string) int {
	n := 0
	for _, e := range events {
		if len(e) >= len(prefix) && e[:len(prefix)] == prefix {
			n++
		}
	}
	return n
}
