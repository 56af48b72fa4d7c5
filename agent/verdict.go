package agent

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
)

// answer is how the API server (and KubeVirt's webhook) answered one eviction request.
type answer struct {
	result evictionResult
	// msg is the server's message (for a refusal or an error).
	msg string
	// cause names the kind of refusal, stable across attempts (the status reason, not
	// the message, which may carry changing counts): events are sent once per VM and
	// cause.
	cause string
}

// call is the request act makes next.
type call int

const (
	callNone call = iota
	// callDryRun probes the eviction (dry-run), before a migrate or external action.
	callDryRun
	// callEvict requests the eviction.
	callEvict
	// callCreateMigration creates a VirtualMachineInstanceMigration: the eviction is
	// not intercepted by KubeVirt (no eviction webhook).
	callCreateMigration
)

// verdict is what act does next, or, when next is callNone, what acting left the VM
// as: its state for the status, the event to send on the VMI, the metric's outcome.
type verdict struct {
	next   call
	state  VMState
	detail string
	// event is the reason of the event to send on the VMI ("" for none); warning
	// makes it a Warning, sent once per VM and cause during a drain.
	event   string
	warning bool
	message string
	// outcome is the eviction_requests_total outcome label ("" for none).
	outcome string
	// retry: the request was refused; act on the VM again only after its backoff.
	retry bool
	cause string
}

// resolve maps (action, dry-run answer, eviction answer) to what to do next, or to
// the result: the SPEC's eviction path as a table (see verdict_test.go). dry and ev are
// nil while not asked. It reads no cluster and sends nothing.
func resolve(node string, d Decision, dry, ev *answer) verdict {
	if d.Action == ActionNone {
		return verdict{state: StateBlocked, detail: d.Reason, event: ReasonBlocked, warning: true, cause: d.Reason,
			message: fmt.Sprintf("Cannot leave node %s: %s", node, d.Reason)}
	}
	probe := d.Action == ActionMigrate || d.Action == ActionExternal
	if probe && dry == nil {
		return verdict{next: callDryRun}
	}
	if probe && ev == nil {
		switch dry.result {
		case evacuating:
			return verdict{next: callEvict}
		case evicted:
			// Where KubeVirt does not intercept the eviction it would delete the pod,
			// shutting down a VM that must migrate or be left to its controller.
			if d.Action == ActionMigrate {
				return verdict{next: callCreateMigration}
			}
			reason := "KubeVirt does not intercept evictions (no eviction webhook): nothing marks it for the external controller"
			return verdict{state: StateBlocked, detail: reason, event: ReasonBlocked, warning: true, cause: "NoEvictionWebhook",
				message: fmt.Sprintf("Cannot leave node %s: %s", node, reason), retry: true}
		default:
			return refusal(node, d, *dry)
		}
	}
	if ev == nil {
		return verdict{next: callEvict}
	}
	switch ev.result {
	case evacuating:
		if d.Action == ActionExternal {
			what := "KubeVirt marked it for the external controller"
			return verdict{state: StateWaitingExternal, detail: what, event: ReasonExternalRequested, outcome: "evacuation",
				message: fmt.Sprintf("Eviction from node %s requested: %s", node, what)}
		}
		return verdict{state: StateMigrating, detail: "evacuation requested", event: ReasonMigrationRequested, outcome: "evacuation",
			message: fmt.Sprintf("Eviction from node %s requested: KubeVirt evacuates it by live migration", node)}
	case evicted:
		return verdict{state: StateShuttingDown, detail: "evicted: the guest shuts down", event: ReasonShutdownRequested, outcome: "evicted",
			message: fmt.Sprintf("Evicted from node %s: the guest shuts down (evictionStrategy %s)", node, d.Strategy)}
	default:
		return refusal(node, d, *ev)
	}
}

// refusal is the verdict on an answer that did not move the VM.
func refusal(node string, d Decision, a answer) verdict {
	switch a.result {
	case gone:
		return verdict{}
	case notMigratable:
		return verdict{state: StateBlocked, detail: "eviction refused: " + a.msg, event: ReasonEvictionRefused, warning: true,
			outcome: "not-migratable", retry: true, cause: a.cause,
			message: fmt.Sprintf("Eviction from node %s refused, retrying with a backoff: %s", node, a.msg)}
	case failed:
		return verdict{state: StatePending, detail: "eviction failed: " + a.msg, event: ReasonEvictionRefused, warning: true,
			outcome: "error", retry: true, cause: a.cause,
			message: fmt.Sprintf("Eviction from node %s failed, retrying with a backoff: %s", node, a.msg)}
	default:
		return verdict{state: StatePending, detail: "eviction refused: " + a.msg, event: ReasonEvictionRefused, warning: true,
			outcome: "refused", retry: true, cause: a.cause,
			message: fmt.Sprintf("Eviction from node %s refused, retrying with a backoff: %s", node, a.msg)}
	}
}

// eventType is the verdict's event type.
func (v verdict) eventType() string {
	if v.warning {
		return corev1.EventTypeWarning
	}
	return corev1.EventTypeNormal
}
