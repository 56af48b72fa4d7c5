package agent

import (
	"strings"
	"testing"

	kubevirtv1 "kubevirt.io/api/core/v1"
)

// TestResolve is act's table: (action, dry-run answer, eviction answer) -> the next
// request, or the state, event reason and metric outcome.
func TestResolve(t *testing.T) {
	migrate := Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionMigrate}
	shutdown := Decision{Strategy: kubevirtv1.EvictionStrategyNone, Action: ActionShutdown}
	external := Decision{Strategy: kubevirtv1.EvictionStrategyExternal, Action: ActionExternal}
	blocked := Decision{Strategy: kubevirtv1.EvictionStrategyLiveMigrate, Action: ActionNone, Reason: "not live-migratable: DisksNotLiveMigratable"}
	ans := func(r evictionResult, cause string) *answer {
		return &answer{result: r, msg: "the message", cause: cause}
	}
	intercepted := ans(evacuating, "")
	notIntercepted := ans(evicted, "")
	pdb := ans(refused, "TooManyRequests")
	tests := []struct {
		name    string
		d       Decision
		dry, ev *answer
		want    verdict // message is checked apart
	}{
		{"blocked: no request, a warning", blocked, nil, nil,
			verdict{state: StateBlocked, detail: blocked.Reason, event: ReasonBlocked, warning: true, cause: blocked.Reason}},
		{"migrate: probe first", migrate, nil, nil, verdict{next: callDryRun}},
		{"external: probe first", external, nil, nil, verdict{next: callDryRun}},
		{"shutdown: evict at once", shutdown, nil, nil, verdict{next: callEvict}},
		{"migrate, intercepted: evict", migrate, intercepted, nil, verdict{next: callEvict}},
		{"migrate, not intercepted: create a migration, never evict", migrate, notIntercepted, nil, verdict{next: callCreateMigration}},
		{"external, not intercepted: blocked, retried later", external, notIntercepted, nil,
			verdict{state: StateBlocked, detail: "KubeVirt does not intercept evictions (no eviction webhook): nothing marks it for the external controller", event: ReasonBlocked, warning: true, retry: true, cause: "NoEvictionWebhook"}},
		{"migrate, probe refused by a budget: pending, backs off", migrate, pdb, nil,
			verdict{state: StatePending, detail: "eviction refused: the message", event: ReasonEvictionRefused, warning: true, outcome: "refused", retry: true, cause: "TooManyRequests"}},
		{"migrate, probe says not migratable: blocked, backs off", migrate, ans(notMigratable, "NotLiveMigratable"), nil,
			verdict{state: StateBlocked, detail: "eviction refused: the message", event: ReasonEvictionRefused, warning: true, outcome: "not-migratable", retry: true, cause: "NotLiveMigratable"}},
		{"migrate, probe fails (500): pending, backs off", migrate, ans(failed, "InternalError/500"), nil,
			verdict{state: StatePending, detail: "eviction failed: the message", event: ReasonEvictionRefused, warning: true, outcome: "error", retry: true, cause: "InternalError/500"}},
		{"migrate, pod gone at the probe: nothing", migrate, ans(gone, ""), nil, verdict{}},
		{"migrate, evacuation triggered: migrating", migrate, intercepted, intercepted,
			verdict{state: StateMigrating, detail: "evacuation requested", event: ReasonMigrationRequested, outcome: "evacuation"}},
		{"external, evacuation marked: waiting for the controller", external, intercepted, intercepted,
			verdict{state: StateWaitingExternal, detail: "KubeVirt marked it for the external controller", event: ReasonExternalRequested, outcome: "evacuation"}},
		{"migrate, refused after the probe (KubeVirt's 429 while a target pod is pending): backs off", migrate, intercepted, pdb,
			verdict{state: StatePending, detail: "eviction refused: the message", event: ReasonEvictionRefused, warning: true, outcome: "refused", retry: true, cause: "TooManyRequests"}},
		{"shutdown, evicted: shutting down", shutdown, nil, notIntercepted,
			verdict{state: StateShuttingDown, detail: "evicted: the guest shuts down", event: ReasonShutdownRequested, outcome: "evicted"}},
		{"shutdown, refused by a budget: pending, backs off", shutdown, nil, pdb,
			verdict{state: StatePending, detail: "eviction refused: the message", event: ReasonEvictionRefused, warning: true, outcome: "refused", retry: true, cause: "TooManyRequests"}},
		{"shutdown denied by an admission webhook: pending, backs off", shutdown, nil, ans(failed, "Forbidden/403"),
			verdict{state: StatePending, detail: "eviction failed: the message", event: ReasonEvictionRefused, warning: true, outcome: "error", retry: true, cause: "Forbidden/403"}},
		{"shutdown, intercepted after all (LiveMigrateIfPossible, migratable by now): migrating", shutdown, nil, intercepted,
			verdict{state: StateMigrating, detail: "evacuation requested", event: ReasonMigrationRequested, outcome: "evacuation"}},
		{"shutdown, pod gone: nothing", shutdown, nil, ans(gone, ""), verdict{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := resolve(thisNode, tt.d, tt.dry, tt.ev)
			if got.event != "" && !strings.Contains(got.message, thisNode) {
				t.Errorf("event message %q does not name the node", got.message)
			}
			got.message = ""
			if got != tt.want {
				t.Errorf("resolve() =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

// Every refusal backs off: no answer that leaves the VM where it is ends without retry.
func TestResolveRefusalsBackOff(t *testing.T) {
	for _, d := range []Decision{{Action: ActionMigrate}, {Action: ActionShutdown}, {Action: ActionExternal}} {
		for _, r := range []evictionResult{refused, failed, notMigratable} {
			a := &answer{result: r, msg: "m", cause: "c"}
			var got verdict
			if d.Action == ActionShutdown {
				got = resolve(thisNode, d, nil, a)
			} else {
				got = resolve(thisNode, d, a, nil)
			}
			if !got.retry || got.next != callNone || got.event != ReasonEvictionRefused {
				t.Errorf("%s, answer %d: %+v; want a refusal that backs off", d.Action, r, got)
			}
		}
	}
}
