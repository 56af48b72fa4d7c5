package systemd

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/utils/clock"
)

// EngineClient is the lock holder's view of the drain engine, over its HTTP API on localhost.
type EngineClient struct {
	base   string
	client *http.Client
}

var (
	_ SafeChecker  = (*EngineClient)(nil)
	_ NodeReporter = (*EngineClient)(nil)
)

// NewEngineClient returns a client of the engine at engineURL (e.g. http://127.0.0.1:8095).
func NewEngineClient(engineURL string) *EngineClient {
	return &EngineClient{base: strings.TrimRight(engineURL, "/"), client: &http.Client{}}
}

// NodeVMs reads GET /safe-to-shutdown (the engine's status) for the VMs left and the taint key.
func (c *EngineClient) NodeVMs(ctx context.Context) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/safe-to-shutdown", nil)
	if err != nil {
		return 0, "", fmt.Errorf("asking the drain engine: %w", err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return 0, "", fmt.Errorf("asking the drain engine: %w", err)
	}
	defer resp.Body.Close()
	var st struct {
		Ready    bool              `json:"ready"`
		Reason   string            `json:"reason"`
		TaintKey string            `json:"taintKey"`
		VMs      []json.RawMessage `json:"vms"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return 0, "", fmt.Errorf("asking the drain engine: GET /safe-to-shutdown answered %s: %w", resp.Status, err)
	}
	if !st.Ready {
		return 0, "", fmt.Errorf("the drain engine is not ready: %s", st.Reason)
	}
	return len(st.VMs), st.TaintKey, nil
}

// WaitSafe asks GET <engine>/safe-to-shutdown?wait=D: 200 when the node is safe, 503 when not
// yet.
func (c *EngineClient) WaitSafe(ctx context.Context, wait time.Duration) (bool, error) {
	client, base := c.client, c.base
	{
		ctx, cancel := context.WithTimeout(ctx, wait+5*time.Second)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/safe-to-shutdown?wait="+url.QueryEscape(wait.String()), nil)
		if err != nil {
			return false, fmt.Errorf("asking the drain engine: %w", err)
		}
		resp, err := client.Do(req)
		if err != nil {
			return false, fmt.Errorf("asking the drain engine: %w", err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		switch resp.StatusCode {
		case http.StatusOK:
			return true, nil
		case http.StatusServiceUnavailable:
			return false, nil
		}
		return false, fmt.Errorf("asking the drain engine: GET /safe-to-shutdown answered %s", resp.Status)
	}
}

// HolderClient follows a lock holder's state (GET /v1/shutdown, long-polled) for the drain
// engine. While the holder does not answer, the state says so: not reachable, not connected, and
// a shutdown known to be under way is reported as not held.
type HolderClient struct {
	base   string
	client *http.Client
	clock  clock.Clock
	log    logrus.FieldLogger
	wait   time.Duration
	retry  time.Duration

	mu      sync.Mutex
	state   ShutdownState
	changed chan struct{}
}

// NewHolderClient returns a client of the holder at holderURL (e.g. http://127.0.0.1:8096).
func NewHolderClient(holderURL string, clk clock.Clock, log logrus.FieldLogger) *HolderClient {
	if clk == nil {
		clk = clock.RealClock{}
	}
	if log == nil {
		log = logrus.New()
	}
	return &HolderClient{base: strings.TrimRight(holderURL, "/"), client: &http.Client{}, clock: clk, log: log,
		wait: 30 * time.Second, retry: 500 * time.Millisecond, changed: make(chan struct{}),
		state: ShutdownState{Degraded: "lock holder not reached yet"}}
}

// State returns the last known state and a channel closed when it changes.
func (c *HolderClient) State() (ShutdownState, <-chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state, c.changed
}

func (c *HolderClient) set(st ShutdownState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st == c.state {
		return
	}
	c.state = st
	close(c.changed)
	c.changed = make(chan struct{})
}

// Run follows the holder until ctx ends.
func (c *HolderClient) Run(ctx context.Context) {
	var gen uint64
	lastErr := ""
	for ctx.Err() == nil {
		st, err := c.get(ctx, gen)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if err.Error() != lastErr {
				c.log.WithError(err).Warn("the shutdown lock holder does not answer")
				lastErr = err.Error()
			}
			gen = 0
			c.mu.Lock()
			prev := c.state
			c.mu.Unlock()
			down := prev
			down.Reachable, down.Connected, down.LockHeld, down.Held = false, false, false, false
			down.Degraded = "the shutdown lock holder does not answer: " + err.Error()
			if prev.ShuttingDown && !(prev.Released && prev.ReleaseOutcome != OutcomeUnheld) {
				down.NotHeld = "the shutdown lock holder does not answer: its lock may be gone"
			}
			c.set(down)
			select {
			case <-ctx.Done():
				return
			case <-c.clock.After(c.retry):
			}
			continue
		}
		if lastErr != "" {
			c.log.Info("the shutdown lock holder answers again")
			lastErr = ""
		}
		st.Reachable = true
		gen = st.Generation
		c.set(st)
	}
}

func (c *HolderClient) get(ctx context.Context, gen uint64) (ShutdownState, error) {
	var st ShutdownState
	q := ""
	timeout := 5 * time.Second
	if gen != 0 {
		q = fmt.Sprintf("?generation=%d&wait=%s", gen, c.wait)
		timeout += c.wait
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/v1/shutdown"+q, nil)
	if err != nil {
		return st, fmt.Errorf("GET %s/v1/shutdown: %w", c.base, err)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return st, fmt.Errorf("GET %s/v1/shutdown: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return st, fmt.Errorf("GET %s/v1/shutdown: %s", c.base, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, fmt.Errorf("GET %s/v1/shutdown: %w", c.base, err)
	}
	return st, nil
}
