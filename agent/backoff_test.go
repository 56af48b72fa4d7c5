package agent

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	testingclock "k8s.io/utils/clock/testing"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

var bt0 = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

// mig is an evacuation migration created at bt0+created seconds, in phase, that failed
// at bt0+failed seconds (when phase is Failed).
func mig(name string, created int, phase kubevirtv1.VirtualMachineInstanceMigrationPhase, failed int) kubevirtv1.VirtualMachineInstanceMigration {
	m := kubevirtv1.VirtualMachineInstanceMigration{ObjectMeta: metav1.ObjectMeta{
		Name:              name,
		CreationTimestamp: metav1.NewTime(bt0.Add(time.Duration(created) * time.Second)),
		Annotations:       map[string]string{kubevirtv1.EvacuationMigrationAnnotation: "n0"},
	}}
	m.Status.Phase = phase
	if phase == kubevirtv1.MigrationFailed {
		m.Status.PhaseTransitionTimestamps = []kubevirtv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{
			{Phase: kubevirtv1.MigrationFailed, PhaseTransitionTimestamp: metav1.NewTime(bt0.Add(time.Duration(failed) * time.Second))},
		}
	}
	return m
}

func TestMigrationBackoffShape(t *testing.T) {
	failed := kubevirtv1.MigrationFailed
	deleting := mig("deleting", 3, failed, 4)
	deleting.DeletionTimestamp = &metav1.Time{Time: bt0}
	manual := mig("manual", 1, failed, 2)
	manual.Annotations = nil
	for _, tc := range []struct {
		name       string
		migrations []kubevirtv1.VirtualMachineInstanceMigration
		at         int // seconds after bt0
		wantWait   time.Duration
		wantFailed int
	}{
		{name: "none yet", at: 0},
		{name: "one failed, just now", migrations: []kubevirtv1.VirtualMachineInstanceMigration{mig("a", 0, failed, 5)}, at: 5, wantWait: 20 * time.Second, wantFailed: 1},
		{name: "one failed, 19 s ago", migrations: []kubevirtv1.VirtualMachineInstanceMigration{mig("a", 0, failed, 5)}, at: 24, wantWait: time.Second, wantFailed: 1},
		{name: "one failed, 20 s ago", migrations: []kubevirtv1.VirtualMachineInstanceMigration{mig("a", 0, failed, 5)}, at: 25, wantFailed: 1},
		{name: "two failed: 40 s after the newer failure", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			mig("b", 30, failed, 35), mig("a", 0, failed, 5)}, at: 35, wantWait: 40 * time.Second, wantFailed: 2},
		{name: "three failed: 80 s", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			mig("a", 0, failed, 5), mig("c", 80, failed, 90), mig("b", 30, failed, 35)}, at: 100, wantWait: 70 * time.Second, wantFailed: 3},
		{name: "a success ends the count", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			mig("a", 0, failed, 5), mig("b", 30, kubevirtv1.MigrationSucceeded, 0), mig("c", 80, failed, 90)}, at: 90, wantWait: 20 * time.Second, wantFailed: 1},
		{name: "the newest succeeded", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			mig("a", 0, failed, 5), mig("b", 30, kubevirtv1.MigrationSucceeded, 0)}, at: 31},
		{name: "deleted ones do not count", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			mig("a", 0, failed, 2), deleting}, at: 10, wantWait: 14 * time.Second, wantFailed: 1},
		{name: "a migration an operator created is not the evacuation's", migrations: []kubevirtv1.VirtualMachineInstanceMigration{manual}, at: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := testingclock.NewFakeClock(bt0.Add(time.Duration(tc.at) * time.Second))
			wait, failures := migrationBackoff(tc.migrations, clock.Now())
			if wait != tc.wantWait || failures != tc.wantFailed {
				t.Errorf("migrationBackoff = %s, %d failures; want %s, %d", wait, failures, tc.wantWait, tc.wantFailed)
			}
		})
	}
}

// The doubling stops at maxEvacuationBackoff instead of overflowing into no pause.
func TestMigrationBackoffDoesNotOverflow(t *testing.T) {
	var ms []kubevirtv1.VirtualMachineInstanceMigration
	for i := 0; i < 60; i++ {
		ms = append(ms, mig("m", i, kubevirtv1.MigrationFailed, i))
	}
	if wait, n := migrationBackoff(ms, bt0.Add(60*time.Second)); n != 60 || wait <= 0 || wait > maxEvacuationBackoff {
		t.Errorf("after 60 failures: wait %s (%d failures), want a pause of at most %s", wait, n, maxEvacuationBackoff)
	}
}
