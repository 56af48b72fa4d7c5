package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"k8s.io/apimachinery/pkg/runtime"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// An API server that does not answer: the cache still shows the node empty, but
// that may be out of date, so after apiUnknownAfter the state is reported unknown
// (not ready, the reason said) and not safe to power off; a probe answered again
// makes it known again. A failure shorter than apiUnknownAfter changes nothing.
func TestAPIUnreachableMakesTheStateUnknown(t *testing.T) {
	f := newFixture(t, testNode())
	e, clk := f.engine, f.clock
	look := func() NodeStatus {
		t.Helper()
		if _, err := f.sync(); err != nil {
			t.Fatal(err)
		}
		st, _ := e.Status()
		return st
	}
	if st := look(); !st.Ready || !st.ReadyToPowerOff() {
		t.Fatalf("status %+v of an empty node: want ready and safe", st)
	}
	refused := errors.New("dial tcp 127.0.0.1:6443: connect: connection refused")
	e.apiProbed(refused)
	clk.Step(apiUnknownAfter - time.Second)
	e.apiProbed(refused)
	if st := look(); !st.Ready || !st.ReadyToPowerOff() {
		t.Errorf("status %+v after a failure of %s: want still ready and safe", st, apiUnknownAfter-time.Second)
	}
	clk.Step(time.Second)
	e.apiProbed(refused)
	// Reported at once, before any look (a look may be waiting on the API server).
	if st, _ := e.Status(); st.Ready || st.ReadyToPowerOff() {
		t.Errorf("status %+v right after the probe that found the API server silent for %s: want not ready, not safe", st, apiUnknownAfter)
	}
	st := look()
	if st.Ready || st.ReadyToPowerOff() || st.Safe || st.SafeBlind != "" {
		t.Errorf("status %+v with the API server silent for %s: want not ready, not safe", st, apiUnknownAfter)
	}
	if !strings.Contains(st.Reason, "API server has not answered") || !strings.Contains(st.Reason, "connection refused") ||
		!strings.Contains(st.Reason, "unknown") {
		t.Errorf("reason %q: want it to say the API server does not answer, why, and that the state is unknown", st.Reason)
	}
	e.apiProbed(nil)
	if st := look(); !st.Ready || !st.ReadyToPowerOff() {
		t.Errorf("status %+v once the API server answers again: want ready and safe", st)
	}
}

// A look at the node that began while the API server still counted as answering and
// that ends after it has stopped (the look's own reads waited meanwhile: here the list
// of a waiting migration's target pods) does not publish what it read as known: the
// node stays not ready, not safe.
func TestAPIUnknownDuringALookIsNotOverwritten(t *testing.T) {
	f, _ := evacuatingVM(t)
	f.migrations = map[string][]kubevirtv1.VirtualMachineInstanceMigration{"ns/vm": {testMigration("kubevirt-evacuation-x", kubevirtv1.MigrationScheduling, t0)}}
	e, clk := f.engine, f.clock
	refused := errors.New("context deadline exceeded")
	e.apiProbed(refused)
	clk.Step(apiUnknownAfter - time.Second) // failing, not yet for apiUnknownAfter
	var once sync.Once
	f.kube.PrependReactor("list", "pods", func(k8stesting.Action) (bool, runtime.Object, error) {
		once.Do(func() { // the look's read waits while the probes go on failing
			clk.Step(2 * time.Second)
			e.apiProbed(refused)
		})
		return false, nil, nil
	})
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	st, _ := e.Status()
	if st.Ready || st.ReadyToPowerOff() || !strings.Contains(st.Reason, "API server has not answered") {
		t.Errorf("status %+v after a look during which the API server stopped answering: want not ready, not safe, the reason", st)
	}
}

// Idle, the agent does not probe the API server, and no timer of the probes runs (an
// idle agent costs nothing); a host shutdown starts the probes every apiProbeInterval,
// and once it is cancelled they stop, with their timer. In a synctest bubble: time
// there advances only when every goroutine of the bubble is blocked, so the counts are
// exact.
func TestAPIProbesOnlyWhileBusy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var probes atomic.Int64
		clk := &probeTickers{WithTicker: clock.RealClock{}}
		e := New(fakeView{}, Clients{}, record.NewFakeRecorder(64), nil, Options{NodeName: thisNode, Clock: clk,
			ProbeAPI: func(context.Context) error { probes.Add(1); return nil }})
		defer e.queue.ShutDown()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go e.runAPIProbe(ctx)

		e.wakeAPIProbe() // what every look at an idle node does
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if n, running := probes.Load(), clk.running(); n != 0 || running != 0 {
			t.Fatalf("%d probes and %d probe timers running in 10 idle minutes: want none", n, running)
		}

		now := time.Now()
		e.ShutdownStarted(now, now.Add(time.Minute))
		time.Sleep(10*apiProbeInterval + apiProbeInterval/2)
		synctest.Wait()
		if n := probes.Load(); n != 10 {
			t.Fatalf("%d probes in %s of a host shutdown: want 10, one every %s", n, 10*apiProbeInterval+apiProbeInterval/2, apiProbeInterval)
		}

		e.ShutdownCancelled()
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		if n, running := probes.Load(), clk.running(); n != 10 || running != 0 {
			t.Fatalf("%d probes and %d probe timers running after the shutdown was cancelled: want the 10 before it, none running", n, running)
		}
	})
}

// probeTickers counts the tickers of the probes' period that run (the work queue has
// tickers of its own, of another period).
type probeTickers struct {
	clock.WithTicker
	n atomic.Int64
}

func (c *probeTickers) NewTicker(d time.Duration) clock.Ticker {
	tk := c.WithTicker.NewTicker(d)
	if d != apiProbeInterval {
		return tk
	}
	c.n.Add(1)
	return &countedTicker{Ticker: tk, n: &c.n}
}

func (c *probeTickers) running() int64 { return c.n.Load() }

type countedTicker struct {
	clock.Ticker
	n    *atomic.Int64
	once sync.Once
}

func (t *countedTicker) Stop() { t.once.Do(func() { t.n.Add(-1) }); t.Ticker.Stop() }
