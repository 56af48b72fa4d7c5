package agent

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// MigrationStatus is the migration a VM is in, as /safe-to-shutdown and `node-agent
// status` show it.
type MigrationStatus struct {
	// Name is the VirtualMachineInstanceMigration's name.
	Name string `json:"name"`
	// Phase is its phase (Pending, Scheduling, Scheduled, PreparingTarget, TargetReady,
	// Running, Succeeded, Failed), from the freshest source: the VMI's
	// status.migrationState once the migration is handed to the nodes, else the
	// migration object.
	Phase string `json:"phase"`
	// TargetNode is where it goes, once known.
	TargetNode string `json:"targetNode,omitempty"`
	// PhaseSince is when it entered Phase, as KubeVirt recorded it (the migration's
	// status.phaseTransitionTimestamps; for Running, Succeeded and Failed told by the
	// VMI, its migrationState's start and end); nil when KubeVirt recorded none.
	PhaseSince *metav1.Time `json:"phaseSince,omitempty"`
}

// DescribeMigration names the migration a VM is in, from its VMI and the migrations
// of that VMI: the newest unfinished one, else the one the VMI's migrationState names
// (ended, the VMI not moved yet); nil if none. The VMI's migrationState wins for the
// phase when it names that migration: it tells Running, Succeeded and Failed before
// the migration object does.
func DescribeMigration(vmi *kubevirtv1.VirtualMachineInstance, migrations []kubevirtv1.VirtualMachineInstanceMigration) *MigrationStatus {
	var ms *kubevirtv1.VirtualMachineInstanceMigrationState
	if vmi != nil {
		ms = vmi.Status.MigrationState
	}
	m := UnfinishedMigration(migrations)
	if m == nil && ms != nil && ms.MigrationUID != "" {
		for i := range migrations {
			if migrations[i].UID == ms.MigrationUID {
				m = &migrations[i]
			}
		}
	}
	if m == nil {
		return nil
	}
	out := &MigrationStatus{Name: m.Name, Phase: string(m.Status.Phase)}
	if out.Phase == "" {
		out.Phase = string(kubevirtv1.MigrationPending)
	}
	if ms != nil && ms.MigrationUID != "" && ms.MigrationUID == m.UID {
		switch {
		case ms.Failed:
			out.Phase = string(kubevirtv1.MigrationFailed)
		case ms.Completed:
			out.Phase = string(kubevirtv1.MigrationSucceeded)
		case ms.StartTimestamp != nil && !m.IsFinal():
			out.Phase = string(kubevirtv1.MigrationRunning)
		}
		out.TargetNode = ms.TargetNode
	}
	if out.TargetNode == "" && m.Status.MigrationState != nil {
		out.TargetNode = m.Status.MigrationState.TargetNode
	}
	out.PhaseSince = phaseSince(out.Phase, m, ms)
	return out
}

// phaseSince is when the migration m entered phase, from the VMI's migrationState ms
// where the phase was read there, else from the migration's own phase transitions.
func phaseSince(phase string, m *kubevirtv1.VirtualMachineInstanceMigration, ms *kubevirtv1.VirtualMachineInstanceMigrationState) *metav1.Time {
	if ms != nil && ms.MigrationUID == m.UID && phase != string(m.Status.Phase) {
		switch phase {
		case string(kubevirtv1.MigrationRunning):
			return ms.StartTimestamp
		case string(kubevirtv1.MigrationSucceeded), string(kubevirtv1.MigrationFailed):
			return ms.EndTimestamp
		}
		return nil
	}
	var since *metav1.Time
	for _, t := range m.Status.PhaseTransitionTimestamps {
		if string(t.Phase) == phase {
			since = t.PhaseTransitionTimestamp.DeepCopy()
		}
	}
	return since
}

// DefaultMigrationStallTimeout is the engine's MigrationStallTimeout unless set: as
// long as KubeVirt waits for an unschedulable target pod before it gives up on it.
const DefaultMigrationStallTimeout = 5 * time.Minute

// A migration stalls in the phases after its target pod was scheduled and before the
// transfer starts (Scheduled, PreparingTarget, TargetReady): there the target node's
// virt-handler moves it on, and KubeVirt times none of them out (v1.8's migration
// controller times out only a target pod that is not scheduled, after 5 and 15
// minutes, and virt-handler aborts a transfer that makes no progress). A migration in
// one of them for longer than the engine's MigrationStallTimeout is reported blocked.
func stallPhase(phase string) bool {
	switch kubevirtv1.VirtualMachineInstanceMigrationPhase(phase) {
	case kubevirtv1.MigrationScheduled, kubevirtv1.MigrationPreparingTarget, kubevirtv1.MigrationTargetReady:
		return true
	}
	return false
}

// Stalled says why the migration cannot be expected to finish: it has been in a phase
// that only the target node's virt-handler moves on (stallPhase) for at least after,
// counted from KubeVirt's record of the phase to read, when the migration was read in
// it (a later time would take a phase that moved on since for one that stalled). Empty
// when it has not, or when KubeVirt recorded no time for the phase.
func (m *MigrationStatus) Stalled(read time.Time, after time.Duration) string {
	if !m.stalls() {
		return ""
	}
	stuck := read.Sub(m.PhaseSince.Time)
	if stuck < after {
		return ""
	}
	return fmt.Sprintf("it has been %s for %s (since %s): the virt-handler of %s has not moved it on",
		m.Phase, stuck.Round(time.Second), m.PhaseSince.UTC().Format(time.RFC3339), targetOrUnknown(m.TargetNode))
}

// stalls: the migration is in a phase that only the target node's virt-handler moves
// on, and KubeVirt recorded when it began.
func (m *MigrationStatus) stalls() bool {
	return m != nil && m.PhaseSince != nil && stallPhase(m.Phase)
}

func targetOrUnknown(node string) string {
	if node == "" {
		return "the target node"
	}
	return "the target node " + node
}

// SetStalled reports a migrating VM whose migration stalled (why, Stalled's) as
// blocked, the migration still named: it cannot leave until the target node's
// virt-handler acts, or the migration is cancelled and tried again. Empty why leaves it
// as it is.
func (s *VMStatus) SetStalled(why string) {
	if why != "" {
		s.blockMigrating(why)
	}
}

// blockMigrating reports a migrating VM as blocked, why added to its detail (which
// still names the migration); a VM in another state is left as it is.
func (s *VMStatus) blockMigrating(why string) {
	if s.State != StateMigrating {
		return
	}
	s.State = StateBlocked
	s.Detail += ": " + why
}

// SetMigration puts the migration on a VM's status: the field, and the detail that
// `node-agent status` prints ("migration NAME PHASE[ to NODE]"). nil leaves it as it is.
func (s *VMStatus) SetMigration(m *MigrationStatus) {
	if m == nil {
		return
	}
	s.Migration = m
	s.Detail = fmt.Sprintf("migration %s %s", m.Name, m.Phase)
	if m.TargetNode != "" {
		s.Detail += " to " + m.TargetNode
	}
}

// migrationRelist is how often the migrations of a VM are read again while nothing on
// its VMI shows the migration's progress: before the migration is handed to the nodes
// (Pending, Scheduling: its target pod waits for a node) or while none is found yet
// (KubeVirt's evacuation controller creates it after it marks the VMI).
const migrationRelist = 10 * time.Second

// migrations keeps, per migrating VM, its migrations as last listed and what on its
// VMI they were listed for. A VM's migrations are listed (by KubeVirt's
// kubevirt.io/vmi-name label, in its namespace) when that changes, a few times per
// migration, and every migrationRelist while the VMI shows nothing of it: not on every
// sync, which a drain runs on every event of every VMI and pod of the node. The VMs of
// a namespace due for a list in one look are listed in one request.
type migrations struct {
	list    func(ctx context.Context, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error)
	targets func(ctx context.Context, namespace string, migration types.UID) ([]corev1.Pod, error)
	clock   interface{ Now() time.Time }
	// stall is how long a migration may stay in a stallPhase before it is reported
	// stalled (the engine's MigrationStallTimeout).
	stall time.Duration

	mu      sync.Mutex
	entries map[string]migrationEntry // by VM key
}

type migrationEntry struct {
	mark   string // what on the VMI the list was read for
	listed time.Time
	items  []kubevirtv1.VirtualMachineInstanceMigration
	// unschedulable is why the scheduler found no node for the waiting migration's
	// target pod (its PodScheduled condition), as last read; empty when it did not say.
	unschedulable string
}

// migrationMark is what on a VMI changes when its migration is created or handed from
// one step to the next before it runs: the evacuation mark, and the migrationState
// the migration controller and the target's virt-handler fill in. Running, completed
// and failed are read from the VMI itself (DescribeMigration).
func migrationMark(vmi *kubevirtv1.VirtualMachineInstance) string {
	mark := vmi.Status.EvacuationNodeName
	if ms := vmi.Status.MigrationState; ms != nil {
		mark += fmt.Sprintf("|%s|%s|%s|%s", ms.MigrationUID, ms.TargetNode, ms.TargetPod, ms.TargetNodeAddress)
	}
	return mark
}

// blocked is why a migrating VM cannot leave the node while its migration lasts, from
// describe: the scheduler finds no node for its target pod, or it stalled.
type blocked struct {
	unschedulable string // TargetUnschedulable's message
	stalled       string // Stalled's
}

// tracked is a migrating VM to describe: its key (namespace/name) and VMI.
type tracked struct {
	key string
	vmi *kubevirtv1.VirtualMachineInstance
	log logrus.FieldLogger
}

// described is what describe found of a tracked VM.
type described struct {
	migration *MigrationStatus
	why       blocked
}

// describeAll describes each of vms (describe), reading the migrations of the VMs due
// for a read in one request per namespace, not one per VM, and forgets the VMs not in
// vms (not migrating any more, or gone).
func (c *migrations) describeAll(ctx context.Context, vms []tracked) []described {
	now := c.clock.Now()
	due := map[string][]string{} // namespace -> the names of its VMs due for a read
	present := map[string]bool{}
	for _, t := range vms {
		present[t.key] = true
		if t.vmi != nil && c.due(t.key, t.vmi, now) {
			due[t.vmi.Namespace] = append(due[t.vmi.Namespace], t.vmi.Name)
		}
	}
	read := map[string]listed{} // by VM key
	for ns, names := range due {
		slices.Sort(names)
		got, err := c.list(ctx, ns, names)
		for _, name := range names {
			read[ns+"/"+name] = listed{items: got[name], err: err}
		}
	}
	out := make([]described, len(vms))
	for i, t := range vms {
		var r *listed
		if l, ok := read[t.key]; ok {
			r = &l
		}
		m, why := c.describe(ctx, t.key, t.vmi, r, now, t.log)
		out[i] = described{migration: m, why: why}
	}
	c.keep(present)
	return out
}

// listed is one VM's migrations as a list read them, or the list's error.
type listed struct {
	items []kubevirtv1.VirtualMachineInstanceMigration
	err   error
}

// due says whether a VM's migrations are to be read again: its VMI shows a change, or
// every migrationRelist while it shows nothing of the migration. It reads them again
// every migrationRelist also while the migration is in a phase that only the target's
// virt-handler moves on: the migration controller writes those phases just after the
// VMI change the list was read for, so the list can be one phase behind. And once such
// a phase would have lasted the stall timeout, if the list is older.
func (c *migrations) due(key string, vmi *kubevirtv1.VirtualMachineInstance, now time.Time) bool {
	c.mu.Lock()
	entry, ok := c.entries[key]
	c.mu.Unlock()
	current := DescribeMigration(vmi, entry.items)
	waiting := current == nil || current.WaitingForTarget() || stallPhase(current.Phase)
	stallDue := current.stalls() && entry.listed.Before(current.PhaseSince.Add(c.stall)) && !now.Before(current.PhaseSince.Add(c.stall))
	return !ok || entry.mark != migrationMark(vmi) || stallDue || (waiting && now.Sub(entry.listed) >= migrationRelist)
}

// describe names the migration of a migrating VM from its migrations as last read, or
// as r read them now (nil: not read now, describeAll found it not due). While the
// migration waits for its target pod to be scheduled it also reads that pod, and
// returns why the scheduler finds no node for it (empty while it did not say so): such
// a VM cannot leave until the cluster changes. A migration is said to have stalled only
// from a list read once the stall timeout had passed: the one before may be a phase
// behind.
func (c *migrations) describe(ctx context.Context, key string, vmi *kubevirtv1.VirtualMachineInstance, r *listed, now time.Time, log logrus.FieldLogger) (*MigrationStatus, blocked) {
	if vmi == nil {
		return nil, blocked{}
	}
	c.mu.Lock()
	entry := c.entries[key]
	c.mu.Unlock()
	if r == nil {
		current := DescribeMigration(vmi, entry.items)
		return current, c.blocked(current, entry)
	}
	items := r.items
	if r.err != nil {
		// Shown as the VMI tells it; read again after migrationRelist.
		log.WithError(r.err).Debug("cannot list the VM's migrations")
		items = entry.items
	}
	current := DescribeMigration(vmi, items)
	unschedulable := ""
	// The target pod exists from Scheduling on: a migration still Pending (KubeVirt
	// holds it back while the node has parallelOutboundMigrationsPerNode running) has
	// none to read.
	if m := UnfinishedMigration(items); m != nil && current != nil && current.Phase == string(kubevirtv1.MigrationScheduling) && c.targets != nil {
		pods, err := c.targets(ctx, vmi.Namespace, m.UID)
		if err != nil {
			log.WithError(err).Debug("cannot list the migration's target pods")
			unschedulable = entry.unschedulable
		}
		if why := TargetUnschedulable(pods); why != "" {
			unschedulable = why
		}
	}
	entry = migrationEntry{mark: migrationMark(vmi), listed: now, items: items, unschedulable: unschedulable}
	c.mu.Lock()
	c.entries[key] = entry
	c.mu.Unlock()
	return current, c.blocked(current, entry)
}

// blocked is why the migration m, as entry read it, keeps its VM on the node.
func (c *migrations) blocked(m *MigrationStatus, entry migrationEntry) blocked {
	if why := unschedulableIf(m, entry.unschedulable); why != "" {
		return blocked{unschedulable: why}
	}
	return blocked{stalled: m.Stalled(entry.listed, c.stall)}
}

// WaitingForTarget: the migration waits for its target pod to be created or
// scheduled (Pending, Scheduling).
func (m *MigrationStatus) WaitingForTarget() bool {
	return m.Phase == string(kubevirtv1.MigrationPending) || m.Phase == string(kubevirtv1.MigrationScheduling)
}

func unschedulableIf(m *MigrationStatus, why string) string {
	if m == nil || !m.WaitingForTarget() {
		return ""
	}
	return why
}

// TargetUnschedulable is the scheduler's message on a migration's pending target pod
// (of pods, the migration's target pods) that it found no node for: PodScheduled False,
// reason Unschedulable, as KubeVirt's migration controller checks it before it times
// the pod out. Empty when none is.
func TargetUnschedulable(pods []corev1.Pod) string {
	for _, p := range pods {
		if p.Status.Phase != corev1.PodPending || p.DeletionTimestamp != nil {
			continue
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
				if c.Message == "" {
					return "no node fits it"
				}
				return c.Message
			}
		}
	}
	return ""
}

// SetTargetUnschedulable reports a migrating VM whose migration's target pod cannot be
// scheduled (why, TargetUnschedulable's) as blocked, the migration still named: it
// cannot leave until the cluster changes (room on another node); KubeVirt times the
// target pod out and retries the migration. Empty why leaves it as it is.
func (s *VMStatus) SetTargetUnschedulable(why string) {
	if why != "" {
		s.blockMigrating("its target pod cannot be scheduled: " + why)
	}
}

// MigrationTracker follows the migrations of a node's migrating VMs by the agent's
// rules, for a program that shows them as the agent does (`node-agent drain` while it
// follows a node): a VM's migrations are listed when its VMI shows a change, and every
// 10 s while it shows nothing of the migration, not on every look; a VM is reported
// blocked when its migration's target pod cannot be scheduled or the migration stalled.
// Safe for one goroutine at a time.
type MigrationTracker struct {
	m   *migrations
	log logrus.FieldLogger
}

// NewMigrationTracker returns a tracker that lists the migrations of VMIs of a
// namespace with list (all of them in one request), a migration's target pods with
// targets, reports a migration stalled after stall, and logs a list that failed (the
// VM is then shown as its VMI tells it) to log.
func NewMigrationTracker(
	list func(ctx context.Context, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error),
	targets func(ctx context.Context, namespace string, migration types.UID) ([]corev1.Pod, error),
	clk clock.PassiveClock, stall time.Duration, log logrus.FieldLogger) *MigrationTracker {
	return &MigrationTracker{m: &migrations{list: list, targets: targets, clock: clk, stall: stall, entries: map[string]migrationEntry{}}, log: log}
}

// Complete puts on each migrating VM of vms its migration (vmis: the node's VMIs by
// namespace/name), reported blocked as the agent reports it, and forgets the VMs that
// are not migrating any more.
func (t *MigrationTracker) Complete(ctx context.Context, vms []VMStatus, vmis map[string]*kubevirtv1.VirtualMachineInstance) {
	var which []int
	var track []tracked
	for i := range vms {
		if vms[i].State != StateMigrating {
			continue
		}
		key := vms[i].Namespace + "/" + vms[i].Name
		which = append(which, i)
		track = append(track, tracked{key: key, vmi: vmis[key], log: t.log.WithField("vmi", key)})
	}
	for j, d := range t.m.describeAll(ctx, track) {
		vs := &vms[which[j]]
		vs.SetMigration(d.migration)
		vs.SetTargetUnschedulable(d.why.unschedulable)
		vs.SetStalled(d.why.stalled)
	}
}

// keep forgets the VMs not in present (not migrating any more, or gone).
func (c *migrations) keep(present map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for key := range c.entries {
		if !present[key] {
			delete(c.entries, key)
		}
	}
}
