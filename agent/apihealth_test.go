package agent

import (
	"errors"
	"strings"
	"testing"
	"time"
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
