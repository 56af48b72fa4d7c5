package agent

import (
	"context"
	"fmt"
	"time"
)

// The API server's reachability during a drain or a host shutdown. The informers keep
// what they last saw when the API server goes away (a reflector whose watch is refused
// retries quietly, with nothing to tell), so a cache that no longer changes looks the
// same as a node where nothing happens: while a drain or a host shutdown is under way
// the engine probes the API server, and when it has not answered for apiUnknownAfter
// the node's state is reported as unknown: not ready, with the reason, and not safe to
// power off (a held shutdown stays held until the node is seen safe or the deadline).
const (
	apiProbeInterval = 2 * time.Second
	apiProbeTimeout  = 3 * time.Second
	apiUnknownAfter  = 5 * time.Second
)

// APIProbe asks the API server whether it serves (NewAgent's reads the agent's Node).
type APIProbe func(context.Context) error

// apiHealth is what the probes found; the engine's mu guards it.
type apiHealth struct {
	failingSince time.Time // first failed probe since the last good one; zero when none
	lastErr      error
	// unknown: the last probe found the state unknown, and it was reported so.
	unknown bool
}

// runAPIProbe probes the API server every apiProbeInterval while a drain or a host
// shutdown is under way, until ctx ends; a change between known and unknown asks for a
// look at the node. Idle, it waits for wakeAPIProbe: no timer runs.
func (e *Engine) runAPIProbe(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-e.probeWake:
		}
		e.probeWhileBusy(ctx)
	}
}

// wakeAPIProbe starts the probes if a drain or a host shutdown is under way (after
// each look at the node, and when a host shutdown starts).
func (e *Engine) wakeAPIProbe() {
	if !e.busy() {
		return
	}
	select {
	case e.probeWake <- struct{}{}:
	default: // already woken
	}
}

// busy: a drain or a host shutdown is under way. Called after every sync: it reads the
// two fields under mu, not a copy of the status.
func (e *Engine) busy() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.status.Draining || e.intent.pending
}

// probeWhileBusy probes every apiProbeInterval until neither a drain nor a host
// shutdown is under way; then what the probes found is forgotten.
func (e *Engine) probeWhileBusy(ctx context.Context) {
	tick := e.opts.Clock.NewTicker(apiProbeInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C():
		}
		if !e.busy() {
			e.apiProbed(nil)
			return
		}
		pctx, cancel := context.WithTimeout(ctx, apiProbeTimeout)
		err := e.opts.ProbeAPI(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		e.apiProbed(err)
	}
}

// apiProbed records a probe's answer (nil: the API server serves). When the state
// turns unknown it is reported at once, not at the engine's next look: that look may
// itself be waiting on the API server (a write to an API server whose etcd does not
// answer waits for its timeout).
func (e *Engine) apiProbed(err error) {
	now := e.opts.Clock.Now()
	e.mu.Lock()
	was := e.api.unknown
	if err == nil {
		e.api = apiHealth{}
	} else {
		if e.api.failingSince.IsZero() {
			e.api.failingSince = now
		}
		e.api.lastErr = err
	}
	why := e.apiUnknownLocked(now)
	e.api.unknown = why != ""
	e.mu.Unlock()
	switch {
	case !was && why != "":
		e.log.WithError(err).Error("the API server does not answer: the state of the node's VMs is unknown until it does")
		e.notSynced(why, false)
		e.Enqueue()
	case was && why == "":
		e.log.Info("the API server answers again")
		e.Enqueue()
	}
}

// apiUnknown says why the node's state is unknown (the API server has not answered
// for apiUnknownAfter); empty when it is known.
func (e *Engine) apiUnknown() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.apiUnknownLocked(e.opts.Clock.Now())
}

func (e *Engine) apiUnknownLocked(now time.Time) string {
	if e.api.failingSince.IsZero() || now.Sub(e.api.failingSince) < apiUnknownAfter {
		return ""
	}
	return fmt.Sprintf("the API server has not answered since %s (%v): the state of the node's VMs is unknown",
		e.api.failingSince.UTC().Format(time.RFC3339), e.api.lastErr)
}
