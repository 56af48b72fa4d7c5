package e2e

// The path where KubeVirt's eviction webhook is not registered (a cluster of its own):
// an eviction of a virt-launcher pod would go through and shut the VM down, so the
// agent migrates LiveMigrate VMs with a VirtualMachineInstanceMigration of its own,
// retried at KubeVirt's pace, and leaves the node to KubeVirt's evacuation controller
// where that acts (the node carries KubeVirt's own drain taint).

import (
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

const ownMigrationLabel = agent.LabelMigrationNode

func TestNoEvictionWebhook(t *testing.T) {
	// MigrationPriorityQueue off (Beta in KubeVirt 1.8: off unless the KubeVirt CR
	// enables it; virt-config's isFeatureGateEnabled turns on only GA gates by itself),
	// said here so that the test holds if the cluster's defaults change: KubeVirt's
	// evacuation controller then creates at most two migrations from one node at a time.
	// Measured: KubeVirtsTaintLeftToKubeVirt still passed with the agent's check of
	// KubeVirt's taint disabled (KubeVirt created every migration before the agent
	// looked), so that subtest checks the invariant but does not prove the check.
	e := newPrivateEnv(t, cluster.Options{WithoutEvictionWebhook: true, KubeVirtConfiguration: kubevirtv1.KubeVirtConfiguration{
		DeveloperConfiguration: &kubevirtv1.DeveloperConfiguration{DisabledFeatureGates: []string{"MigrationPriorityQueue"}},
	}})
	t.Run("MigratesWithKubeVirtsBackoff", func(t *testing.T) { noWebhookMigratesWithBackoff(t, e) })
	t.Run("WithdrawDeletesTheAgentsMigrations", func(t *testing.T) { noWebhookWithdrawDeletesMigrations(t, e) })
	t.Run("KubeVirtsTaintLeftToKubeVirt", func(t *testing.T) { noWebhookKubeVirtsTaint(t, e) })
}

// LiveMigrate VMs leave by live migration, through migrations the agent creates, and
// are never evicted (each one is the same VMI on the other node; the agent counted no
// eviction of them); a None VM is evicted and restarted elsewhere. A VM whose first
// two migrations fail gets its second one 20 s after the first failure and its third
// 40 s after the second, as KubeVirt's migration controller paces evacuation
// migrations, not one per resync (before the fix the agent created the next migration
// within a resync of the failure). Never two unfinished migrations for one VMI.
func noWebhookMigratesWithBackoff(t *testing.T, e *env) {
	sc := newScenarioIn(t, e, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	flaky := sc.pinned("flaky", node, liveMigrate, sim.WithMigrationDuration(time.Second), sim.WithMigrationFailures(2))
	steady := sc.pinned("steady", node, liveMigrate, sim.WithMigrationDuration(time.Second))
	none := sc.pinned("none", node, noneStrategy)
	migrations := sc.watchMigrations()
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	a.waitSafe(4 * time.Minute)
	sc.waitMigrated(flaky, other)
	sc.waitMigrated(steady, other)
	sc.waitRestarted(none, other)
	migrations.stopAndReport(t)

	for name, want := range map[string]int{"flaky": 3, "steady": 1} {
		ms := sc.migrationsOf(name)
		if len(ms) != want {
			t.Errorf("VMI %s had %d migrations, want %d", name, len(ms), want)
		}
		for _, m := range ms {
			if m.Labels[ownMigrationLabel] != node {
				t.Errorf("migration %s of %s was not created by the agent (labels %v)", m.Name, name, m.Labels)
			}
		}
	}
	ms := sc.migrationsOf("flaky")
	sort.Slice(ms, func(i, j int) bool { return ms[i].CreationTimestamp.Before(&ms[j].CreationTimestamp) })
	var figures []string
	for i := 1; i < len(ms); i++ {
		failed := phaseAt(&ms[i-1], kubevirtv1.MigrationFailed)
		if failed.IsZero() {
			t.Errorf("migration %s (%s) has no Failed time", ms[i-1].Name, ms[i-1].Status.Phase)
			continue
		}
		gap := ms[i].CreationTimestamp.Sub(failed)
		backoff := 20 * time.Second << (i - 1)
		figures = append(figures, fmt.Sprintf("migration %d created %s after failure %d (backoff %s)", i+1, gap, i, backoff))
		// Both times are in whole seconds; the agent looks again every second
		// (--resync=1s). Never before the backoff (the property); after it within 30 s:
		// with the scenarios in parallel a loaded run once took 31 s for a 20 s backoff.
		if gap < backoff-time.Second || gap > backoff+30*time.Second {
			t.Errorf("migration %d of flaky created %s after the failure before it; want %s (KubeVirt's backoff)", i+1, gap, backoff)
		}
	}
	// The VMI runs on the target before virt-controller marks its migration
	// Succeeded (under load, seconds later): wait for it, do not read it once.
	if n := len(ms); n > 0 {
		last := ms[n-1].Name
		sc.eventually(time.Minute, "the last migration of flaky to succeed", func() (bool, string) {
			for _, m := range sc.migrationsOf("flaky") {
				if m.Name == last {
					return m.Status.Phase == kubevirtv1.MigrationSucceeded, string(m.Status.Phase)
				}
			}
			return false, "gone"
		})
	}
	t.Logf("flaky: %s", strings.Join(figures, "; "))
	if n, ok := a.metric(`node_agent_eviction_requests_total{action="migrate",node="` + node + `",outcome="evicted"}`); ok && n != 0 {
		t.Errorf("the agent evicted %v LiveMigrate VMs", n)
	}
	a.checkMetrics(map[string]float64{
		`node_agent_eviction_requests_total{action="migrate",node="` + node + `",outcome="migration-created"}`: 4,
		`node_agent_eviction_requests_total{action="shutdown",node="` + node + `",outcome="evicted"}`:          1,
	})
}

// Withdrawing a drain deletes the migrations the agent created (here one that cannot
// complete: one node, its target pod stays Pending); the VM stays where it runs.
func noWebhookWithdrawDeletesMigrations(t *testing.T, e *env) {
	sc := newScenarioIn(t, e, 1)
	node := sc.nodes[0]
	vmi := sc.createVM("vm", liveMigrate)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	var name string
	sc.eventually(time.Minute, "a migration created by the agent", func() (bool, string) {
		for _, m := range sc.migrationsOf("vm") {
			if m.Labels[ownMigrationLabel] == node && !m.IsFinal() {
				name = m.Name
				return true, ""
			}
		}
		return false, fmt.Sprint(len(sc.migrationsOf("vm")), " migrations")
	})
	a.waitStatus(30*time.Second, "the VM reported migrating (blocked once its target pod is unschedulable)", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		return migratingOrNoRoom(vmStatus(st, sc.ns, "vm"))
	})

	sc.untaint(node, agentOnlyKey)
	ev := sc.withdrawn(a, node)
	if !strings.Contains(ev.Message, "1 migration the agent created deleted") {
		t.Errorf("DrainWithdrawn event %q: want it to count the migration deleted", ev.Message)
	}
	sc.eventually(time.Minute, "migration "+name+" to be deleted", func() (bool, string) {
		for _, m := range sc.migrationsOf("vm") {
			if m.Name == name {
				return m.DeletionTimestamp != nil, string(m.Status.Phase)
			}
		}
		return true, ""
	})
	a.checkMetrics(map[string]float64{
		`node_agent_withdraw_actions_total{node="` + node + `",object="migration",outcome="deleted"}`: 1,
	})
	if after := sc.vmi("vm"); after.UID != vmi.UID || after.Status.Phase != kubevirtv1.Running || after.Status.NodeName != node {
		t.Errorf("the VM did not stay: uid %s phase %s node %s", after.UID, after.Status.Phase, after.Status.NodeName)
	}
}

// On a node with KubeVirt's own drain taint (the default key) KubeVirt's evacuation
// controller migrates the VMs itself, webhook or not; the agent creates no migration
// of its own there and never a second unfinished one. It passed also with the agent's
// check disabled (see TestNoEvictionWebhook): the race is a narrow window.
func noWebhookKubeVirtsTaint(t *testing.T, e *env) {
	sc := newScenarioIn(t, e, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	var vmis []*kubevirtv1.VirtualMachineInstance
	for i := 0; i < 4; i++ {
		opts := []sim.VMOption{liveMigrate, sim.WithMigrationDuration(3 * time.Second)}
		if i == 0 {
			opts = append(opts, sim.WithMigrationFailures(1))
		}
		vmis = append(vmis, sc.pinned("vm"+strconv.Itoa(i), node, opts...))
	}
	migrations := sc.watchMigrations()
	a := sc.startAgent(node)

	sc.taint(node, nodeinfo.DefaultDrainTaintKey)
	a.waitSafe(4 * time.Minute)
	for _, v := range vmis {
		sc.waitMigrated(v, other)
	}
	migrations.stopAndReport(t)
	for _, v := range vmis {
		for _, m := range sc.migrationsOf(v.Name) {
			if _, ok := m.Labels[ownMigrationLabel]; ok {
				t.Errorf("the agent created migration %s of %s although KubeVirt's evacuation controller acts on the node", m.Name, v.Name)
			}
		}
	}
	if n, ok := a.metric(`node_agent_eviction_requests_total{action="migrate",node="` + node + `",outcome="migration-created"}`); ok && n != 0 {
		t.Errorf("the agent counted %v migrations created", n)
	}
}

// phaseAt is when the migration entered phase; zero if it did not.
func phaseAt(m *kubevirtv1.VirtualMachineInstanceMigration, phase kubevirtv1.VirtualMachineInstanceMigrationPhase) time.Time {
	for _, ts := range m.Status.PhaseTransitionTimestamps {
		if ts.Phase == phase {
			return ts.PhaseTransitionTimestamp.Time
		}
	}
	return time.Time{}
}

// stopAndReport stops the watch and fails the test for each moment a VMI had two
// unfinished migrations.
func (u *unfinishedMigrations) stopAndReport(t testing.TB) {
	t.Helper()
	u.stop()
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, v := range u.violations {
		t.Error(v)
	}
}
