package agent

import (
	"sort"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"
)

// evacuationBackoffBase is the first pause after a failed evacuation migration. Like
// KubeVirt's migration controller (v1.8, handleMigrationBackoff), which holds a new
// evacuation migration Pending for as long: 20 s after the last failure, doubling
// with each failure since the last success.
const evacuationBackoffBase = 20 * time.Second

// maxEvacuationBackoff stops the doubling (after 13 failures) before it overflows.
const maxEvacuationBackoff = 24 * time.Hour

// migrationBackoff is the pause before a VMI's next evacuation migration, in the
// shape KubeVirt gives its own: the evacuation (and workload-update) migrations of the
// VMI, newest first, are counted back to the last one that succeeded, skipping those
// being deleted; n failed ones mean a pause of 20 s * 2^(n-1) after the newest one
// failed. It returns the time left (0: create it now) and the failures counted. The
// state is the cluster's (the migrations), so a restarted agent keeps the same pace.
func migrationBackoff(migrations []kubevirtv1.VirtualMachineInstanceMigration, now time.Time) (time.Duration, int) {
	var eligible []*kubevirtv1.VirtualMachineInstanceMigration
	for i := range migrations {
		m := &migrations[i]
		_, evacuation := m.Annotations[kubevirtv1.EvacuationMigrationAnnotation]
		_, update := m.Annotations[kubevirtv1.WorkloadUpdateMigrationAnnotation]
		if evacuation || update {
			eligible = append(eligible, m)
		}
	}
	if len(eligible) == 0 {
		return 0, 0
	}
	sort.SliceStable(eligible, func(i, j int) bool {
		return eligible[j].CreationTimestamp.Before(&eligible[i].CreationTimestamp)
	})
	var backoff time.Duration
	failures := 0
	for _, m := range eligible {
		if m.Status.Phase == kubevirtv1.MigrationSucceeded {
			break
		}
		if m.DeletionTimestamp != nil {
			continue
		}
		if m.Status.Phase == kubevirtv1.MigrationFailed {
			failures++
			switch {
			case backoff == 0:
				backoff = evacuationBackoffBase
			default:
				// KubeVirt doubles without bound (and overflows after ~38 failures).
				backoff = min(2*backoff, maxEvacuationBackoff)
			}
		}
	}
	if failures == 0 {
		return 0, 0
	}
	failed := failedAt(eligible[0])
	if failed.IsZero() {
		return 0, failures
	}
	if left := failed.Add(backoff).Sub(now); left > 0 {
		return left, failures
	}
	return 0, failures
}

// failedAt is when the migration entered the Failed phase; zero if it did not.
func failedAt(m *kubevirtv1.VirtualMachineInstanceMigration) time.Time {
	for _, ts := range m.Status.PhaseTransitionTimestamps {
		if ts.Phase == kubevirtv1.MigrationFailed {
			return ts.PhaseTransitionTimestamp.Time
		}
	}
	return time.Time{}
}
