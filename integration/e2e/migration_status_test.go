package e2e

// /safe-to-shutdown names a migrating VM's migration and its phase (SPEC "Ready to
// power off"), and the agent reads migrations a few times per migration, not per sync.

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
)

// migrationNamed returns the named migration of a VMI, or nil.
func migrationNamed(ms []kubevirtv1.VirtualMachineInstanceMigration, name string) *kubevirtv1.VirtualMachineInstanceMigration {
	for i := range ms {
		if ms[i].Name == name {
			return &ms[i]
		}
	}
	return nil
}

// A LiveMigrate VM on a node with no other node to go to (issue 13 part 3, a target
// pod that never schedules): KubeVirt creates the evacuation migration, whose target
// pod the real scheduler finds no node for. /safe-to-shutdown reports the VM blocked,
// with the migration's name and phase (Pending or Scheduling) and the scheduler's
// message, a Warning DrainBlocked event on the Node says so, and `node-agent status`
// shows the same; the VM keeps running where it is, never shut down. A node added to
// the pool makes room: the scheduler places the target pod, the VM migrates and the
// node is safe.
func TestSafeToShutdownNamesAMigrationThatCannotFinish(t *testing.T) {
	sc := newScenario(t, 1)
	node := sc.nodes[0]
	sc.createVM("vm", liveMigrate)
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	st := a.waitStatus(time.Minute, "the VM blocked, its migration named, Pending or Scheduling, the target pod unschedulable", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "vm")
		return v != nil && v.State == agent.StateBlocked && v.Migration != nil && v.Migration.Name != "" &&
			(v.Migration.Phase == string(kubevirtv1.MigrationPending) || v.Migration.Phase == string(kubevirtv1.MigrationScheduling))
	})
	v := vmStatus(st, sc.ns, "vm")
	m := migrationNamed(sc.migrationsOf("vm"), v.Migration.Name)
	if m == nil || m.Spec.VMIName != "vm" || m.IsFinal() {
		t.Fatalf("/safe-to-shutdown names migration %q, not an unfinished migration of the VM: %+v", v.Migration.Name, m)
	}
	// The real scheduler's message: "0/N nodes are available: ...".
	prefix := "migration " + v.Migration.Name + " " + v.Migration.Phase + ": its target pod cannot be scheduled: "
	if !strings.HasPrefix(v.Detail, prefix) || !strings.Contains(v.Detail, "nodes are available") {
		t.Errorf("detail %q, want %q and the scheduler's message", v.Detail, prefix+"0/N nodes are available: ...")
	}
	ev := sc.nodeEvent(node, agent.ReasonBlocked)
	if !strings.Contains(ev.Message, sc.ns+"/vm") || !strings.Contains(ev.Message, "its target pod cannot be scheduled") {
		t.Errorf("event %s %q: want it to name the VM and its unschedulable target pod", ev.Reason, ev.Message)
	}
	out, errOut, code := sc.ctl("status", node, "--drain-taint-key="+agentOnlyKey)
	if code != 0 && code != 1 || !strings.Contains(out, "blocked: migration "+v.Migration.Name+" ") || !strings.Contains(out, "its target pod cannot be scheduled") {
		t.Errorf("node-agent status (exit %d) does not show the VM blocked on migration %s's target pod:\n%s%s", code, v.Migration.Name, out, errOut)
	}
	sc.waitVMIOn("vm", node) // still running where it was: never shut down

	other := sc.addNode()
	after := a.waitSafe(3 * time.Minute)
	if len(after.VMs) != 0 {
		t.Errorf("safe with VMs %+v", after.VMs)
	}
	sc.waitVMIOn("vm", other)
}

// A LiveMigrate VM whose migration stalls after its target pod was scheduled (the
// target node's virt-handler stopped: KubeVirt waits in PreparingTarget, with no
// timeout) is reported blocked once it has been in that phase
// --migration-stall-timeout, with the migration named and a DrainBlocked event, and is
// never shut down; once the target's virt-handler runs again the VM migrates and the
// node is safe.
func TestSafeToShutdownNamesAStalledMigration(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	before := sc.pinned("vm", node, liveMigrate)
	if err := sc.env.sim.StopVirtHandler(other); err != nil {
		t.Fatal(err)
	}
	const stall = 10 * time.Second
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey, "--migration-stall-timeout="+stall.String())

	sc.taint(node, agentOnlyKey)
	st := a.waitStatus(2*time.Minute, "the VM blocked, its migration named, stuck before Running", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "vm")
		return v != nil && v.State == agent.StateBlocked && v.Migration != nil && v.Migration.PhaseSince != nil
	})
	v := vmStatus(st, sc.ns, "vm")
	m := migrationNamed(sc.migrationsOf("vm"), v.Migration.Name)
	if m == nil || m.IsFinal() || string(m.Status.Phase) != v.Migration.Phase {
		t.Fatalf("/safe-to-shutdown names migration %q in %s, not an unfinished migration of the VM in that phase: %+v", v.Migration.Name, v.Migration.Phase, m)
	}
	if v.Migration.Phase != string(kubevirtv1.MigrationPreparingTarget) || v.Migration.TargetNode != other {
		t.Errorf("migration %+v: want PreparingTarget (KubeVirt waits for the target's virt-handler) to %s", v.Migration, other)
	}
	// Blocked since (the agent's clock) no earlier than the stall timeout after the
	// phase began (KubeVirt's record, whole seconds: one second of slack).
	if stuck := v.Since.Sub(v.Migration.PhaseSince.Time); stuck < stall-time.Second {
		t.Errorf("blocked %s after the phase began, before the stall timeout %s", stuck, stall)
	}
	want := "migration " + v.Migration.Name + " PreparingTarget to " + other + ": it has been PreparingTarget for "
	if !strings.HasPrefix(v.Detail, want) || !strings.HasSuffix(v.Detail, "the virt-handler of the target node "+other+" has not moved it on") {
		t.Errorf("detail %q, want %q...", v.Detail, want)
	}
	ev := sc.nodeEvent(node, agent.ReasonBlocked)
	if !strings.Contains(ev.Message, sc.ns+"/vm") || !strings.Contains(ev.Message, "has been PreparingTarget for") {
		t.Errorf("event %s %q: want it to name the VM and its stalled migration", ev.Reason, ev.Message)
	}
	out, errOut, code := sc.ctl("status", node, "--drain-taint-key="+agentOnlyKey, "--migration-stall-timeout="+stall.String())
	if code != 0 && code != 1 || !strings.Contains(out, "blocked: migration "+v.Migration.Name+" ") || !strings.Contains(out, "has not moved it on") {
		t.Errorf("node-agent status (exit %d) does not show the VM blocked on its stalled migration %s:\n%s%s", code, v.Migration.Name, out, errOut)
	}
	sc.waitVMIOn("vm", node) // still running where it was: never shut down

	if err := sc.env.sim.StartVirtHandler(other); err != nil {
		t.Fatal(err)
	}
	a.waitSafe(2 * time.Minute)
	sc.waitMigrated(before, other)
	if n := len(sc.migrationsOf("vm")); n != 1 {
		t.Errorf("%d migrations of the VM: want the one that stalled, finished", n)
	}
}

// A LiveMigrate VM whose migration takes a while: at some point /safe-to-shutdown
// shows it Running, with the migration's name and its target, then the node is safe
// and the VM runs on the other node.
func TestSafeToShutdownNamesARunningMigration(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	before := sc.pinned("vm", node, liveMigrate, sim.WithMigrationDuration(15*time.Second))
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey)

	sc.taint(node, agentOnlyKey)
	st := a.waitStatus(time.Minute, "the VM's migration named and Running", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
		v := vmStatus(st, sc.ns, "vm")
		return v != nil && v.State == agent.StateMigrating && v.Migration != nil && v.Migration.Phase == string(kubevirtv1.MigrationRunning)
	})
	v := vmStatus(st, sc.ns, "vm")
	if m := migrationNamed(sc.migrationsOf("vm"), v.Migration.Name); m == nil {
		t.Errorf("/safe-to-shutdown names migration %q, which the VM does not have", v.Migration.Name)
	}
	if v.Migration.TargetNode != other || v.Detail != "migration "+v.Migration.Name+" Running to "+other {
		t.Errorf("migration %+v, detail %q; want the target %s", v.Migration, v.Detail, other)
	}
	a.waitSafe(time.Minute)
	sc.waitMigrated(before, other)
}

// agentRequestCounts counts, from the audit log, the requests of user between from and
// to, by "verb resource[/subresource][?labelSelector]".
func agentRequestCounts(path, user string, from, to time.Time) (map[string]int, error) {
	evs, err := readAudit(path, func(ev auditEvent) bool {
		return ev.User.Username == user && !ev.Stamp.Before(from) && ev.Stamp.Before(to)
	})
	counts := map[string]int{}
	for _, e := range evs {
		what := e.Verb
		if e.ObjectRef != nil {
			what += " " + e.ObjectRef.Resource
			if e.ObjectRef.Subresource != "" {
				what += "/" + e.ObjectRef.Subresource
			}
		}
		if strings.Contains(e.RequestURI, "labelSelector=kubevirt.io%2Fvmi-name") {
			what += "?vmi-name"
		}
		counts[what]++
	}
	return counts, err
}

// countsSummary is the total of request counts and the counts by kind, sorted.
func countsSummary(counts map[string]int) (int, string) {
	var lines []string
	total := 0
	for what, n := range counts {
		lines = append(lines, fmt.Sprintf("%s: %d", what, n))
		total += n
	}
	sort.Strings(lines)
	return total, strings.Join(lines, ", ")
}

// maxMigrationListsPerVM bounds the label-selected lists of a VM's migrations during
// its migration: one when it is marked for evacuation, one per hand-over step its VMI
// shows (migrationState set, target address), and one every 10 s while its VMI shows
// nothing of the migration; not one per sync (the drain syncs on every event of its
// VMIs and pods, and every second here).
const maxMigrationListsPerVM = 8

// A drain of 10 LiveMigrate VMs (two migrating at a time, 3 s each), by `node-agent
// drain` with the node's agent running: the requests of each, counted in the audit log
// (each runs as a service account of its own), list each VM's migrations at most
// maxMigrationListsPerVM times; the counts by kind are logged. The drain command follows
// the node by the agent's rules (agent.MigrationTracker), not with a list per VM on
// every change of the node.
func TestDrainMigrationStatusRequests(t *testing.T) {
	sc := newScenario(t, 2)
	node, other := sc.nodes[0], sc.nodes[1]
	var names []string
	for i := 0; i < 10; i++ {
		names = append(names, fmt.Sprintf("vm%d", i))
		sc.pinned(names[i], node, liveMigrate, sim.WithMigrationDuration(3*time.Second))
	}
	kubeconfig, user := sc.adminServiceAccount("measured-agent")
	commandKubeconfig, commandUser := sc.adminServiceAccount("measured-drain-command")
	a := sc.startAgent(node, "--drain-taint-key="+agentOnlyKey, "--kubeconfig="+kubeconfig)

	start := time.Now()
	out, errOut, code := sc.ctlWith(commandKubeconfig, "drain", node, "--drain-taint-key="+agentOnlyKey, "--timeout=3m")
	if code != 0 {
		t.Fatalf("node-agent drain exited %d\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	a.waitSafe(time.Minute)
	took := time.Since(start)
	for _, name := range names {
		if v := sc.vmi(name); v == nil || v.Status.NodeName != other {
			t.Errorf("VM %s not on %s", name, other)
		}
	}
	for _, program := range []struct{ name, user string }{{"agent", user}, {"drain command", commandUser}} {
		counts, err := agentRequestCounts(sc.env.cluster.AuditLog, program.user, start, time.Now().Add(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		total, summary := countsSummary(counts)
		t.Logf("drain of %d VMs in %s: %d requests by the %s: %s", len(names), took.Round(time.Second), total, program.name, summary)
		if n := counts["list virtualmachineinstancemigrations?vmi-name"]; n > maxMigrationListsPerVM*len(names) {
			t.Errorf("the %s listed the VMs' migrations %d times, want at most %d per VM", program.name, n, maxMigrationListsPerVM)
		}
	}
}
