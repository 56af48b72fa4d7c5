package systemd

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	testclock "k8s.io/utils/clock/testing"
)

// FuzzHolderShutdownQuery feeds the lock holder's GET /v1/shutdown any raw query (the
// drain engine sends ?generation=N&wait=D; anything on the node's localhost can send
// more). Properties: a wait is accepted only when time.ParseDuration reads it as 0 to
// 10m, a generation only when it is an unsigned decimal; otherwise 400 naming the bad
// parameter; else 200 with the holder's state as JSON, its generation the holder's.
// Never a panic, never another code, never a wait past a gone client.
func FuzzHolderShutdownQuery(f *testing.F) {
	for _, q := range []string{
		"", "wait=30s", "wait=10m", "wait=10m0.000000001s", "wait=-1s", "wait=banana", "wait=", "generation=",
		"generation=1", "generation=-1", "generation=18446744073709551615", "generation=18446744073709551616",
		"generation=0x10", "generation=1&wait=1s", "generation=%zz&wait=1s", "wait=1s&wait=1h", "GENERATION=1",
		"generation=+1", "generation= 1", "wait=9223372036854775807ns", "x;generation=1",
	} {
		f.Add(q, false)
		f.Add(q, true)
	}
	log := logrus.New()
	log.SetLevel(logrus.PanicLevel)
	clk := testclock.NewFakeClock(time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC))
	// The handler reads only the state and the clock: a Guard that is never run (no
	// bus), no engine.
	noBus := func(context.Context) (bus, error) { return nil, errors.New("no bus in a fuzz test") }
	h := NewHolder(newGuard(Options{Clock: clk, Log: log}, noBus), nil, HolderOptions{Clock: clk, Log: log})
	handler := h.Handler()
	own, _ := h.State()
	f.Fuzz(func(t *testing.T, rawQuery string, sameGeneration bool) {
		if sameGeneration && !strings.Contains(rawQuery, "generation") {
			// Ask about the holder's own generation: a valid wait must then wait,
			// and a client that is gone must end it.
			rawQuery = "generation=" + strconv.FormatUint(own.Generation, 10) + "&" + rawQuery
		}
		req := httptest.NewRequest(http.MethodGet, "/v1/shutdown", nil)
		req.URL.RawQuery = rawQuery
		q := req.URL.Query()
		wantCode, wantWhy := http.StatusOK, ""
		if raw := q.Get("wait"); raw != "" {
			if d, err := time.ParseDuration(raw); err != nil || d < 0 || d > 10*time.Minute {
				wantCode, wantWhy = http.StatusBadRequest, "invalid wait"
			}
		}
		if raw := q.Get("generation"); wantCode == http.StatusOK && raw != "" {
			if _, err := strconv.ParseUint(raw, 10, 64); err != nil {
				wantCode, wantWhy = http.StatusBadRequest, "invalid generation"
			}
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // the client is gone: a wait must not outlive it
		rec := httptest.NewRecorder()
		done := make(chan struct{})
		go func() {
			defer close(done)
			handler.ServeHTTP(rec, req.WithContext(ctx))
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("query %q: still waiting 10 s after the client left", rawQuery)
		}
		if rec.Code != wantCode {
			t.Fatalf("query %q: status %d, want %d; body %s", rawQuery, rec.Code, wantCode, rec.Body)
		}
		if wantCode == http.StatusBadRequest {
			if !strings.Contains(rec.Body.String(), wantWhy) {
				t.Fatalf("query %q: 400 without %q: %s", rawQuery, wantWhy, rec.Body)
			}
			return
		}
		var st ShutdownState
		if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
			t.Fatalf("query %q: body is not the state: %v\n%s", rawQuery, err, rec.Body)
		}
		if st.Generation != own.Generation {
			t.Fatalf("query %q: generation %d, want the holder's %d", rawQuery, st.Generation, own.Generation)
		}
	})
}
