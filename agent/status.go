package agent

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// VMStatus is one VM on the node, as /safe-to-shutdown and `node-agent status` show it.
type VMStatus struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Strategy is the effective eviction strategy.
	Strategy string `json:"strategy"`
	// Action is what a drain does (or did) to it.
	Action Action  `json:"action"`
	State  VMState `json:"state"`
	// Detail says more: the migration's name, phase and target, why it is blocked or pending.
	Detail string `json:"detail,omitempty"`
	// Migration is the migration a migrating VM is in, once the agent found it.
	Migration *MigrationStatus `json:"migration,omitempty"`
	Since     time.Time        `json:"since"`
}

// NodeStatus is the node's drain status.
type NodeStatus struct {
	Node string `json:"node"`
	// Ready is false until the agent has read everything it watches.
	Ready bool `json:"ready"`
	// Reason says why the agent is not ready.
	Reason   string `json:"reason,omitempty"`
	Draining bool   `json:"draining"`
	// Trigger is what started the drain: "taint" or "shutdown".
	Trigger string `json:"trigger,omitempty"`
	// TaintKey is the drain taint key in force.
	TaintKey string `json:"taintKey"`
	// Safe is true when no VM (and with --all-pods, no evictable pod) is left.
	Safe bool       `json:"safe"`
	VMs  []VMStatus `json:"vms"`
	// PodsLeft counts the other pods still to evict (with --all-pods).
	PodsLeft int `json:"podsLeft,omitempty"`
	// ConfigError is the configuration problem in force, if any.
	ConfigError string `json:"configError,omitempty"`
	// NodeError says which write of the Node keeps failing (giving the node back after
	// a cancelled shutdown or a reboot, taking it out of service): retried with a
	// backoff, and a readiness reason meanwhile.
	NodeError string `json:"nodeError,omitempty"`
	// SafeBlind says why the node is safe although the agent is not ready (it cannot read
	// everything, such as the VMIs): it proved that no virt-launcher pod runs on the node.
	SafeBlind string `json:"safeBlind,omitempty"`
	// PriorityLevel is the API Priority and Fairness level the API server puts the
	// agent's requests in, when known: in nodeinfo.OwnPriorityLevel the agent acts on
	// every VM at once, elsewhere on 16 at a time.
	PriorityLevel string `json:"apiPriorityLevel,omitempty"`
	// Turn is where the node stands in the cluster's queue of host-shutdown drains
	// (with --max-concurrent-drains), while a host shutdown is pending.
	Turn *TurnStatus `json:"turn,omitempty"`
}

// ReadyToPowerOff is what /safe-to-shutdown answers 200 for: the agent sees everything
// and no VM is left, or it proved that no virt-launcher pod runs on the node.
func (s NodeStatus) ReadyToPowerOff() bool { return s.Safe && (s.Ready || s.SafeBlind != "") }

// Counts summarises the VMs by state.
func (s NodeStatus) Counts() map[VMState]int {
	c := map[VMState]int{}
	for _, v := range s.VMs {
		c[v.State]++
	}
	return c
}

// Summary is the state at a glance, as the node annotation shows it.
func (s NodeStatus) Summary() string {
	if s.Turn != nil && s.Turn.Waiting {
		return fmt.Sprintf("host shutdown, %s: %s on the node", s.Turn, plural(len(s.VMs), "VM"))
	}
	if !s.Draining {
		return fmt.Sprintf("idle: %s on the node", plural(len(s.VMs), "VM"))
	}
	if s.Safe {
		return "drained: no VM left, safe to power off"
	}
	var parts []string
	for _, st := range []VMState{StatePending, StateMigrating, StateShuttingDown, StateWaitingExternal, StateBlocked, StateIncoming, StateStarting} {
		if n := s.Counts()[st]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, st))
		}
	}
	if s.PodsLeft > 0 {
		parts = append(parts, fmt.Sprintf("%d other pods", s.PodsLeft))
	}
	return fmt.Sprintf("draining (%s): %s left (%s)", s.Trigger, plural(len(s.VMs), "VM"), strings.Join(parts, ", "))
}

// phase is the summary's kind, without its counts.
func (s NodeStatus) phase() string {
	switch {
	case s.Turn != nil && s.Turn.Waiting:
		return "turn"
	case !s.Draining:
		return "idle"
	case s.Safe:
		return "drained"
	}
	return "draining (" + s.Trigger + ")"
}

type reportOption func(*NodeStatus)

func withPods(n int) reportOption { return func(s *NodeStatus) { s.PodsLeft = n } }

// report publishes the status from what is on the node, keeps the node annotation in
// step, and says whether the node is safe to power off. trigger is empty when the
// node is not being drained.
func (e *Engine) report(ctx context.Context, node *corev1.Node, cfg nodeinfo.Config, trigger string, vms []*vm, outcomes map[string]outcome, opts ...reportOption) bool {
	now := e.opts.Clock.Now().UTC()
	st := NodeStatus{Node: node.Name, Ready: true, Draining: trigger != "", Trigger: trigger, TaintKey: cfg.DrainTaintKey, VMs: []VMStatus{}, Turn: e.turnStatus()}
	for _, o := range opts {
		o(&st)
	}
	// The migrating VMs, in the order of track: each one and its index in st.VMs.
	var which []*vm
	var at []int
	var track []tracked
	for _, v := range vms {
		d := decide(v, cfg)
		state, detail := observe(v, d, node.Name, st.Draining)
		if o := outcomes[v.key]; o.state != "" && (state == StatePending || state == StateBlocked) {
			state, detail = o.state, o.detail
		}
		ns, name, _ := strings.Cut(v.key, "/")
		st.VMs = append(st.VMs, VMStatus{Namespace: ns, Name: name, Strategy: string(d.Strategy), Action: d.Action, State: state, Detail: detail})
		if state == StateMigrating {
			which, at = append(which, v), append(at, len(st.VMs)-1)
			track = append(track, tracked{key: v.key, vmi: v.vmi, log: e.vmLog(v)})
		}
	}
	for j, d := range e.migrations.describeAll(ctx, track) {
		v, vs := which[j], &st.VMs[at[j]]
		vs.SetMigration(d.migration)
		blocked := ""
		if d.why.unschedulable != "" {
			vs.SetTargetUnschedulable(d.why.unschedulable)
			blocked = "TargetUnschedulable"
		} else if d.why.stalled != "" {
			vs.SetStalled(d.why.stalled)
			blocked = "Stalled/" + d.migration.Phase
		}
		if blocked != "" {
			e.warnOnce(v, ReasonBlocked+"/"+blocked+"/"+d.migration.Name, func() {
				e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonBlocked, "%s cannot leave the node: %s", describe(v), vs.Detail)
				e.vmLog(v).WithField("reason", vs.Detail).Warn("the VM cannot leave the node")
			})
		}
	}
	e.mu.Lock()
	st.ConfigError, st.NodeError, st.PriorityLevel = e.status.ConfigError, e.status.NodeError, e.status.PriorityLevel
	// The API server stopped answering during this look (which may have waited on it:
	// the clock is read again, not the look's start): what it read is no proof.
	unknown := e.apiUnknownLocked(e.opts.Clock.Now())
	seen := map[string]bool{}
	for i := range st.VMs {
		vs := &st.VMs[i]
		key := vs.Namespace + "/" + vs.Name
		seen[key] = true
		vs.Since = e.since.observe(key, vs.State, now)
	}
	for key := range e.since {
		if !seen[key] {
			delete(e.since, key)
		}
	}
	e.mu.Unlock()
	st.Safe = SafeToPowerOff(st.VMs, st.PodsLeft)
	if unknown != "" {
		st.Ready, st.Reason, st.Safe = false, unknown, false
	}
	e.setStatus(func(s *NodeStatus) { *s = st })
	e.metrics.observe(st)
	e.writeState(ctx, node, st)
	return st.Safe
}

// stateEvery bounds the writes of the state annotation while only its counts change: a
// 100-VM drain changed them about 100 times in 13 s, each an update of the Node that
// every watcher of Nodes receives. A change of phase (idle, draining, drained, waiting
// for a turn) is written at once; a count is written at most stateEvery after the last
// write, by the look that the engine asks for then.
const stateEvery = 2 * time.Second

// writeState keeps the node's state annotation in step with st, within stateEvery.
func (e *Engine) writeState(ctx context.Context, node *corev1.Node, st NodeStatus) {
	summary := st.Summary()
	if node.Annotations[AnnotationState] == summary {
		return
	}
	now, phase := e.opts.Clock.Now(), st.phase()
	e.mu.Lock()
	wait := e.stateAt.Add(stateEvery).Sub(now)
	due := phase != e.statePhase || wait <= 0
	e.mu.Unlock()
	if !due {
		e.queue.AddAfter(e.opts.NodeName, wait)
		return
	}
	if err := patchAnnotations(ctx, e.clients.Kube, node.Name, map[string]any{AnnotationState: summary}); err != nil {
		e.log.WithError(err).Warn("cannot update the state annotation")
		return
	}
	e.mu.Lock()
	e.stateAt, e.statePhase = now, phase
	e.mu.Unlock()
}

// setStatus changes the status and wakes whoever waits on it.
func (e *Engine) setStatus(change func(*NodeStatus)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	change(&e.status)
	close(e.changed)
	e.changed = make(chan struct{})
}

// statusChanged wakes whoever waits on the status, after a change made under e.mu.
func (e *Engine) statusChanged() { e.setStatus(func(*NodeStatus) {}) }

// Status returns the current status and a channel closed at its next change.
func (e *Engine) Status() (NodeStatus, <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	st := e.status
	st.VMs = append([]VMStatus{}, e.status.VMs...)
	return st, e.changed
}

// SafeToPowerOff says whether a node is safe to power off: no VM is left on it and
// (with all-pods) no other evictable pod. /safe-to-shutdown answers it; `node-agent
// drain` follows the node until it holds.
func SafeToPowerOff(vms []VMStatus, podsLeft int) bool {
	return len(vms) == 0 && podsLeft == 0
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
