package agent

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
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
	return out
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
// sync, which a drain runs on every event of every VMI and pod of the node.
type migrations struct {
	list  func(ctx context.Context, namespace, vmi string) ([]kubevirtv1.VirtualMachineInstanceMigration, error)
	clock interface{ Now() time.Time }

	mu      sync.Mutex
	entries map[string]migrationEntry // by VM key
}

type migrationEntry struct {
	mark   string // what on the VMI the list was read for
	listed time.Time
	items  []kubevirtv1.VirtualMachineInstanceMigration
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

// describe names the migration of a migrating VM, listing its migrations only when
// its VMI shows a change (or every migrationRelist while it shows nothing).
func (c *migrations) describe(ctx context.Context, v *vm, log logrus.FieldLogger) *MigrationStatus {
	if v.vmi == nil {
		return nil
	}
	mark, now := migrationMark(v.vmi), c.clock.Now()
	c.mu.Lock()
	entry, ok := c.entries[v.key]
	c.mu.Unlock()
	current := DescribeMigration(v.vmi, entry.items)
	waiting := current == nil || current.Phase == string(kubevirtv1.MigrationPending) || current.Phase == string(kubevirtv1.MigrationScheduling)
	if ok && entry.mark == mark && (!waiting || now.Sub(entry.listed) < migrationRelist) {
		return current
	}
	items, err := c.list(ctx, v.vmi.Namespace, v.vmi.Name)
	if err != nil {
		// Shown as the VMI tells it; read again after migrationRelist.
		log.WithError(err).Debug("cannot list the VM's migrations")
		items = entry.items
	}
	c.mu.Lock()
	c.entries[v.key] = migrationEntry{mark: mark, listed: now, items: items}
	c.mu.Unlock()
	return DescribeMigration(v.vmi, items)
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
