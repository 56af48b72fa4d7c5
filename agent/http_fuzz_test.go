package agent

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/tools/record"
)

// FuzzSafeToShutdownQuery feeds /safe-to-shutdown any raw query string (the holder,
// drainctl and operators' scripts send ?wait=DURATION). Properties: parseWait accepts
// only a duration from 0 to MaxWait (the documented bound), exactly what
// time.ParseDuration reads, and says why otherwise; the handler answers 400 with that
// reason for a bad wait, else 200 when safe and 503 when not, with the status as JSON;
// never a panic, never another code.
func FuzzSafeToShutdownQuery(f *testing.F) {
	for _, q := range []string{
		"", "wait=", "wait=0s", "wait=30s", "wait=5m", "wait=1h", "wait=1h0m0.000000001s", "wait=3601s",
		"wait=-1s", "wait=-0s", "wait=10", "wait=banana", "wait=1e3s", "wait=.5s", "wait=1h%20", "wait=%zz",
		"wait=9223372036854775807ns", "wait=9223372036854775808ns", "wait=2562047h", "wait=1s&wait=2h",
		"wait=2h&wait=1s", "WAIT=2h", "wait=1%C2%B5s", "wait=1us", "x=1;wait=1s", "wait=+1s", "wait=0x10s",
	} {
		f.Add(q, true)
	}
	// Built once: an engine per input would spend the fuzzing time on set-up.
	safeEngine, notSafe := fuzzEngine(f, safeStatus), fuzzEngine(f, leftStatus)
	f.Fuzz(func(t *testing.T, rawQuery string, safe bool) {
		req := httptest.NewRequest(http.MethodGet, "/safe-to-shutdown", nil)
		req.URL.RawQuery = rawQuery
		raw := req.URL.Query().Get("wait")
		wait, err := parseWait(raw)
		parsed, perr := time.ParseDuration(raw)
		switch {
		case err != nil:
			if wait != 0 || !strings.Contains(err.Error(), "invalid wait") || !strings.Contains(err.Error(), MaxWait.String()) {
				t.Fatalf("wait %q: %v, %v", raw, wait, err)
			}
			if raw == "" || (perr == nil && parsed >= 0 && parsed <= MaxWait) {
				t.Fatalf("wait %q (%v) refused: %v", raw, parsed, err)
			}
		case raw == "":
			if wait != 0 {
				t.Fatalf("no wait read as %v", wait)
			}
		default:
			if perr != nil || wait != parsed || wait < 0 || wait > MaxWait {
				t.Fatalf("wait %q accepted as %v (ParseDuration %v, %v), bound %v", raw, wait, parsed, perr, MaxWait)
			}
		}

		e, want := notSafe, http.StatusServiceUnavailable
		if safe {
			e, want = safeEngine, http.StatusOK
		}
		if err != nil {
			want = http.StatusBadRequest
		}
		// A request whose client is gone: a valid wait on a node not safe answers at once.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		rec := httptest.NewRecorder()
		e.Handler().ServeHTTP(rec, req.WithContext(ctx))
		if rec.Code != want {
			t.Fatalf("query %q (safe %v): status %d, want %d; body %s", rawQuery, safe, rec.Code, want, rec.Body)
		}
		if want == http.StatusBadRequest {
			if !strings.Contains(rec.Body.String(), "invalid wait") {
				t.Fatalf("query %q: 400 without the reason: %s", rawQuery, rec.Body)
			}
			return
		}
		var st NodeStatus
		if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil {
			t.Fatalf("query %q: body is not the status: %v\n%s", rawQuery, err, rec.Body)
		}
	})
}

func fuzzEngine(f *testing.F, status func(*NodeStatus)) *Engine {
	e := New(fakeView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode})
	f.Cleanup(e.queue.ShutDown)
	e.setStatus(status)
	return e
}
