package agent

import (
	"sync"
	"time"

	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/utils/clock"
)

// Default per-VM backoff of refused evictions: 2 s, doubling, at most 1 min.
const (
	defaultEvictionBackoff    = 2 * time.Second
	defaultEvictionBackoffMax = time.Minute
)

// retries backs off, per VM, the requests that were refused (a PodDisruptionBudget's
// 429, KubeVirt's 429, any other error), with client-go's exponential backoff on the
// engine's clock. While a VM waits, informer events do not bring its requests back:
// the drain reports what the last attempt left it as. Memory only: a restarted agent
// tries once at once, then backs off again.
type retries struct {
	backoff *flowcontrol.Backoff
	clock   clock.Clock

	mu   sync.Mutex
	last map[string]lastAttempt
}

// lastAttempt is what the last attempt left a VM as, and when the next one is due.
type lastAttempt struct {
	o   outcome
	due time.Time
}

func newRetries(initial, max time.Duration, clk clock.Clock) *retries {
	b := flowcontrol.NewBackOff(initial, max)
	b.Clock = clk
	return &retries{backoff: b, clock: clk, last: map[string]lastAttempt{}}
}

// refused records a refusal of the VM's request now: the next attempt waits.
func (r *retries) refused(key string, o outcome) {
	now := r.clock.Now()
	r.backoff.Next(key, now)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.last[key] = lastAttempt{o: o, due: now.Add(r.backoff.Get(key))}
}

// waiting says whether the VM is backing off; then it returns what the last attempt
// left it as, saying when the next one is due.
func (r *retries) waiting(key string) (outcome, bool) {
	now := r.clock.Now()
	if !r.backoff.IsInBackOffSinceUpdate(key, now) {
		return outcome{}, false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	last, ok := r.last[key]
	if !ok {
		return outcome{}, false
	}
	o := last.o
	o.detail += "; next attempt in " + last.due.Sub(now).Round(time.Second).String()
	return o, true
}

// done forgets the VM's backoff: its request went through.
func (r *retries) done(key string) {
	r.backoff.DeleteEntry(key)
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.last, key)
}

// keep forgets the VMs that are no longer on the node.
func (r *retries) keep(present map[string]bool) {
	r.mu.Lock()
	var gone []string
	for key := range r.last {
		if !present[key] {
			gone = append(gone, key)
		}
	}
	r.mu.Unlock()
	for _, key := range gone {
		r.done(key)
	}
}

// reset forgets every backoff (a new drain).
func (r *retries) reset() {
	r.mu.Lock()
	keys := make([]string, 0, len(r.last))
	for key := range r.last {
		keys = append(keys, key)
	}
	r.mu.Unlock()
	for _, key := range keys {
		r.done(key)
	}
}
