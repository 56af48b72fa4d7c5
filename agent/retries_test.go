package agent

import (
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// A refused VM is not asked again before its backoff, however often it is looked at
// (every informer event is a look); the backoff doubles up to its bound; a VM that
// left is forgotten.
func TestRetriesBackOffPerVM(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC))
	r := newRetries(2*time.Second, 8*time.Second, clk)
	refusedOnce := outcome{StatePending, "eviction refused: budget"}

	attempts := map[string]int{}
	look := func(key string) {
		if _, waiting := r.waiting(key); !waiting {
			attempts[key]++
			r.refused(key, refusedOnce)
		}
	}
	// Looked at every 100 ms for 30 s (events and resyncs), refused every time.
	for i := 0; i < 300; i++ {
		look("ns/a")
		if i < 10 {
			look("ns/b")
		}
		clk.Step(100 * time.Millisecond)
	}
	// Attempts at 0, 2, 6, 14, 22, 30 s (2, 4, 8, 8 ... s apart): 5 in the 30 s.
	if got := attempts["ns/a"]; got != 5 {
		t.Errorf("ns/a was asked %d times in 30 s, want 5 (2 s doubling to 8 s)", got)
	}
	look("ns/a") // due at 30 s: asked, refused again
	if o, ok := r.waiting("ns/a"); !ok || o.state != StatePending || o.detail == refusedOnce.detail {
		t.Errorf("waiting = %+v, %v; want the last outcome with when the next attempt is due", o, ok)
	}
	r.keep(map[string]bool{"ns/a": true})
	if _, ok := r.waiting("ns/b"); ok {
		t.Error("a VM that left is still backing off")
	}
	r.mu.Lock()
	n := len(r.last)
	r.mu.Unlock()
	if n != 1 {
		t.Errorf("%d VMs remembered, want 1", n)
	}
	r.done("ns/a")
	if _, ok := r.waiting("ns/a"); ok {
		t.Error("a VM whose request went through is still backing off")
	}
}
