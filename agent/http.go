package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ReadinessCheck reports a reason the agent is not fully able to do its job, or "".
type ReadinessCheck func() string

// MaxWait bounds ?wait= on /safe-to-shutdown.
const MaxWait = time.Hour

// Handler serves /safe-to-shutdown, /healthz, /readyz and /metrics.
func (e *Engine) Handler(checks ...ReadinessCheck) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /safe-to-shutdown", e.serveSafeToShutdown)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st, _ := e.Status()
		if !st.Ready {
			http.Error(w, "not ready: "+st.Reason, http.StatusServiceUnavailable)
			return
		}
		if why := e.ShutdownNotHeld(); why != "" {
			http.Error(w, "not ready: host shutdown under way and not held: "+why, http.StatusServiceUnavailable)
			return
		}
		if st.NodeError != "" {
			http.Error(w, "not ready: "+st.NodeError, http.StatusServiceUnavailable)
			return
		}
		for _, check := range checks {
			if reason := check(); reason != "" {
				http.Error(w, "not ready: "+reason, http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(e.metrics.Registry, promhttp.HandlerOpts{Registry: e.metrics.Registry}))
	return mux
}

// parseWait reads ?wait= of /safe-to-shutdown: empty is no wait, else a duration
// from 0 to MaxWait.
func parseWait(raw string) (time.Duration, error) {
	if raw == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(raw)
	if err != nil || d < 0 || d > MaxWait {
		return 0, fmt.Errorf("invalid wait %q: want a duration such as 30s or 5m, at most %s", raw, MaxWait)
	}
	return d, nil
}

// serveSafeToShutdown answers 200 when the node is safe to power off, else 503, with
// the status as JSON. ?wait=DURATION holds the answer until it is 200 or time is up.
func (e *Engine) serveSafeToShutdown(w http.ResponseWriter, r *http.Request) {
	wait, err := parseWait(r.URL.Query().Get("wait"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	st, changed := e.Status()
	for !st.ReadyToPowerOff() && wait > 0 {
		select {
		case <-changed:
			st, changed = e.Status()
			continue
		case <-ctx.Done():
		}
		break
	}
	w.Header().Set("Content-Type", "application/json")
	if st.ReadyToPowerOff() {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(st)
}
