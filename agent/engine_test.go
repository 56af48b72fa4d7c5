package agent

import (
	"context"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"
)

// panickyView panics where a bug met on a bad object would.
type panickyView struct{ fakeView }

func (panickyView) Synced() (bool, string) { panic("a bad object") }

func TestSyncPanicIsAnErrorNotACrash(t *testing.T) {
	log := logrus.New()
	log.SetOutput(&strings.Builder{})
	e := New(panickyView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode, Log: log})
	requeue, err := e.syncSafely(context.Background())
	if err == nil || !strings.Contains(err.Error(), "a bad object") {
		t.Fatalf("syncSafely = %v, %v; want the panic as an error", requeue, err)
	}
}

// On SIGTERM during a host shutdown, the agent holds until the node is safe or the
// deadline: the kubelet's graceful shutdown then waits on it before the VMs' bucket.
// The test runs in a synctest bubble: synctest.Wait returns once the hold is blocked
// (or has returned), so "still holding" is checked, not raced.
func TestHoldWhileShuttingDown(t *testing.T) {
	for _, tc := range []struct {
		name    string
		release func(e *Engine, clk *clocktesting.FakeClock)
	}{
		{"the node becomes safe", func(e *Engine, _ *clocktesting.FakeClock) {
			e.setStatus(func(s *NodeStatus) { s.VMs, s.Safe = nil, true })
		}},
		{"the deadline passes", func(_ *Engine, clk *clocktesting.FakeClock) {
			clk.Step(2 * time.Minute)
		}},
		{"the shutdown is cancelled", func(e *Engine, _ *clocktesting.FakeClock) {
			e.mu.Lock()
			e.intent = shutdownIntent{cancelled: true}
			e.mu.Unlock()
			e.statusChanged()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				clk := clocktesting.NewFakeClock(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
				e := New(fakeView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode, Clock: clk})
				defer e.queue.ShutDown()

				// Not shutting down: returns at once.
				e.HoldWhileShuttingDown(context.Background())

				e.mu.Lock()
				e.intent = shutdownIntent{pending: true, deadline: clk.Now().Add(time.Minute)}
				e.mu.Unlock()
				e.setStatus(func(s *NodeStatus) {
					*s = NodeStatus{Ready: true, Draining: true, Trigger: TriggerShutdown, VMs: []VMStatus{{Name: "vm", State: StateMigrating}}}
				})
				done := make(chan struct{})
				go func() {
					e.HoldWhileShuttingDown(context.Background())
					close(done)
				}()
				synctest.Wait()
				select {
				case <-done:
					t.Fatal("returned while VMs were left before the deadline")
				default:
				}
				// A status change that leaves VMs does not end it either.
				e.setStatus(func(s *NodeStatus) { s.VMs = []VMStatus{{Name: "vm", State: StateBlocked}} })
				synctest.Wait()
				select {
				case <-done:
					t.Fatal("returned on a status change with VMs left")
				default:
				}
				tc.release(e, clk)
				synctest.Wait()
				select {
				case <-done:
				default:
					t.Fatal("still holding")
				}
			})
		})
	}
}

// blindView cannot read the VMIs (RBAC, no CRD); its virt-launcher pods are listed.
type blindView struct {
	fakeView
	pods []*corev1.Pod
}

func (blindView) Synced() (bool, string) {
	return false, `waiting for the first list of [vmis: virtualmachineinstances.kubevirt.io is forbidden]`
}
func (v blindView) LauncherPods() []*corev1.Pod { return v.pods }

// An engine that cannot read the VMIs: safe to power off when it proved that no
// virt-launcher pod runs on the node; else not, and a host shutdown held so gets a
// Warning event saying why.
func TestNotSyncedIsSafeOnlyWithoutLauncherPods(t *testing.T) {
	log := logrus.New()
	log.SetOutput(&strings.Builder{})
	rec := record.NewFakeRecorder(16)
	e := New(blindView{}, Clients{}, rec, nil, Options{NodeName: thisNode, Log: log})
	e.ShutdownStarted(time.Now(), time.Now().Add(time.Minute))
	if _, err := e.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st, _ := e.Status(); st.Ready || !st.ReadyToPowerOff() || !strings.Contains(st.SafeBlind, "no virt-launcher pod") {
		t.Errorf("status %+v with no virt-launcher pod: want not ready but safe to power off", st)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	e = New(blindView{pods: []*corev1.Pod{{}}}, Clients{}, rec, nil, Options{NodeName: thisNode, Log: log, Clock: clk})
	e.ShutdownStarted(clk.Now(), clk.Now().Add(time.Minute))
	if _, err := e.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-rec.Events:
		t.Errorf("an event %q at the first look: the first list takes moments", ev)
	default:
	}
	clk.Step(blindGrace)
	if _, err := e.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st, _ := e.Status(); st.ReadyToPowerOff() || !strings.Contains(st.Reason, "forbidden") {
		t.Errorf("status %+v with a virt-launcher pod: want not safe, the reason said", st)
	}
	select {
	case ev := <-rec.Events:
		if !strings.Contains(ev, "Warning "+ReasonShutdownHeldBlind) || !strings.Contains(ev, "forbidden") {
			t.Errorf("event %q, want a Warning %s with the reason", ev, ReasonShutdownHeldBlind)
		}
	default:
		t.Errorf("no %s event", ReasonShutdownHeldBlind)
	}
	if _, err := e.sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-rec.Events:
		t.Errorf("a second event for the same reason: %q", ev)
	default:
	}
}
