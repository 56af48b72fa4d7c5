package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
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
func TestHoldWhileShuttingDown(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC))
	e := New(fakeView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode, Clock: clk})

	// Not shutting down: returns at once.
	e.HoldWhileShuttingDown(context.Background())

	e.mu.Lock()
	e.intent = shutdownIntent{pending: true, deadline: clk.Now().Add(time.Minute)}
	e.mu.Unlock()
	e.setStatus(func(s *NodeStatus) {
		*s = NodeStatus{Ready: true, Draining: true, Trigger: TriggerShutdown, VMs: []VMStatus{{Name: "vm", State: StateMigrating}}}
	})
	for _, tc := range []struct {
		name    string
		release func()
	}{
		{"the node becomes safe", func() {
			e.setStatus(func(s *NodeStatus) { s.VMs, s.Safe = nil, true })
		}},
		{"the deadline passes", func() {
			e.setStatus(func(s *NodeStatus) { s.VMs, s.Safe = []VMStatus{{Name: "vm", State: StateBlocked}}, false })
			clk.Step(2 * time.Minute)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "the deadline passes" {
				e.setStatus(func(s *NodeStatus) { s.Safe = false })
			}
			done := make(chan struct{})
			go func() {
				e.HoldWhileShuttingDown(context.Background())
				close(done)
			}()
			select {
			case <-done:
				t.Fatal("returned while VMs were left before the deadline")
			default:
			}
			tc.release()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("still holding")
			}
		})
	}
}
