package agent

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func TestUnfinishedMigrationIsTheNewestLiveOne(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	migration := func(name string, phase kubevirtv1.VirtualMachineInstanceMigrationPhase) kubevirtv1.VirtualMachineInstanceMigration {
		m := kubevirtv1.VirtualMachineInstanceMigration{}
		m.Namespace, m.Name, m.Status.Phase = "ns", name, phase
		return m
	}
	at := func(m kubevirtv1.VirtualMachineInstanceMigration, d time.Duration) kubevirtv1.VirtualMachineInstanceMigration {
		m.CreationTimestamp = metav1.NewTime(t0.Add(d))
		return m
	}
	tests := []struct {
		name       string
		migrations []kubevirtv1.VirtualMachineInstanceMigration
		want       string
	}{
		{name: "none"},
		{name: "only final ones", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			at(migration("done", kubevirtv1.MigrationSucceeded), 0), at(migration("failed", kubevirtv1.MigrationFailed), time.Minute)}},
		{name: "the newest unfinished", want: "second", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			at(migration("first", kubevirtv1.MigrationRunning), 0), at(migration("second", kubevirtv1.MigrationPending), time.Minute),
			at(migration("done", kubevirtv1.MigrationSucceeded), 2*time.Minute)}},
		{name: "one being deleted does not count", want: "first", migrations: []kubevirtv1.VirtualMachineInstanceMigration{
			at(migration("first", kubevirtv1.MigrationRunning), 0), *deleting(ptr(at(migration("going", kubevirtv1.MigrationRunning), time.Minute)))}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if m := UnfinishedMigration(tt.migrations); m != nil {
				got = m.Name
			}
			if got != tt.want {
				t.Errorf("UnfinishedMigration() = %q, want %q", got, tt.want)
			}
		})
	}
}
