// Package fleet coordinates the agents of a cluster for host shutdowns: at most a set
// number of nodes drain for a host shutdown at a time, first come first served,
// through coordination.k8s.io Leases in the agent's namespace (no leader, no
// controller: each agent reads the Leases and writes its own), and a node starts its
// drain only when its VMs fit on the nodes that remain.
//
// The Leases:
//   - a ticket per node whose host is shutting down, node-agent-turn-<node>: its
//     acquireTime is when the shutdown began (the queue's order), renewed while the
//     agent waits or drains; an expired ticket (its agent gone) leaves the queue;
//   - slots node-agent-drain-slot-0 .. -<n-1>: the node named in holderIdentity
//     drains; taken with an update that names the resourceVersion read (a
//     compare-and-swap: of two agents only one wins), given back (holder emptied) when
//     the node is safe or its shutdown cancelled; an expired slot (its agent gone)
//     counts as free, so a crashed agent never holds one for ever.
package fleet

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	coordinationlisters "k8s.io/client-go/listers/coordination/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/clock"
	"k8s.io/utils/ptr"
)

const (
	// LabelTurn marks the Leases of the queue: "ticket" or "slot".
	LabelTurn = "node-agent.kubevirt.io/turn"
	// TicketPrefix and SlotPrefix name the Leases.
	TicketPrefix = "node-agent-turn-"
	SlotPrefix   = "node-agent-drain-slot-"
	// DefaultLeaseDuration is how long a ticket or slot lives unless renewed; the
	// agent renews it every third of that while it waits or drains.
	DefaultLeaseDuration = 30 * time.Second
	// DefaultSettle is Options.Settle unless set.
	DefaultSettle = 2 * time.Second
)

// Options configure Turns.
type Options struct {
	// Namespace holds the Leases (the agent's own).
	Namespace string
	// Node is this agent's node.
	Node string
	// Slots is how many nodes may drain for a host shutdown at once
	// (--max-concurrent-drains).
	Slots int
	// LeaseDuration: default DefaultLeaseDuration.
	LeaseDuration time.Duration
	// Settle is how long after its shutdown began a node first takes a slot: hosts
	// told to shut down together enter the queue within moments of each other, and the
	// first in line must see the others queued (about to go, no room for its VMs)
	// before it drains. Default DefaultSettle.
	Settle time.Duration
	Clock  clock.Clock
	Log    logrus.FieldLogger
}

// Turns is one agent's place in the cluster's queue of host-shutdown drains.
type Turns struct {
	opts     Options
	kube     kubernetes.Interface
	factory  informers.SharedInformerFactory
	informer cache.SharedIndexInformer
	leases   coordinationlisters.LeaseLister

	mu       sync.Mutex
	handlers []func()
}

// Turn is where a node stands in the queue.
type Turn struct {
	// Granted: the node holds a slot (Slot) and may drain.
	Granted bool
	Slot    string
	// Position is the node's place among the nodes waiting, from 1; 0 when granted.
	Position int
	// Waiting counts the nodes waiting (this one included while it waits).
	Waiting int
	// Draining names the nodes that hold the slots.
	Draining []string
	// Slots is how many there are.
	Slots int
	// Settling is how long the node still lets the queue settle before it takes a
	// slot that is its own (Options.Settle); zero otherwise.
	Settling time.Duration
}

// FitsFunc says whether the VMs of this node fit on the nodes that remain, with the
// nodes draining and those waiting ahead of it and behind it (Fits): why not, empty
// when they do.
type FitsFunc func(ctx context.Context, draining, ahead, behind []string) (string, error)

// New creates Turns; Run starts its watch of the Leases.
func New(kube kubernetes.Interface, opts Options) *Turns {
	if opts.LeaseDuration <= 0 {
		opts.LeaseDuration = DefaultLeaseDuration
	}
	if opts.Settle <= 0 {
		opts.Settle = DefaultSettle
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	factory := informers.NewSharedInformerFactoryWithOptions(kube, 0, informers.WithNamespace(opts.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelTurn }))
	lease := factory.Coordination().V1().Leases()
	t := &Turns{opts: opts, kube: kube, factory: factory, informer: lease.Informer(), leases: lease.Lister()}
	_, _ = t.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { t.changed() },
		UpdateFunc: func(any, any) { t.changed() },
		DeleteFunc: func(any) { t.changed() },
	})
	return t
}

// AddChangeHandler has f called after every change of the queue's Leases (before Run).
func (t *Turns) AddChangeHandler(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.handlers = append(t.handlers, f)
}

func (t *Turns) changed() {
	t.mu.Lock()
	hs := append([]func(){}, t.handlers...)
	t.mu.Unlock()
	for _, f := range hs {
		f()
	}
}

// Run starts the watch of the queue's Leases; it returns at once.
func (t *Turns) Run(ctx context.Context) { t.factory.Start(ctx.Done()) }

// Synced says whether the Leases were listed.
func (t *Turns) Synced() bool { return t.informer.HasSynced() }

// TicketName is the name of node's ticket Lease (long names are cut and end in a hash).
func TicketName(node string) string { return leaseName(TicketPrefix + node) }

// SlotName is the name of slot i.
func SlotName(i int) string { return SlotPrefix + strconv.Itoa(i) }

func leaseName(name string) string {
	if len(name) <= 253 {
		return name
	}
	h := uint32(2166136261)
	for i := 0; i < len(name); i++ {
		h = (h ^ uint32(name[i])) * 16777619
	}
	return fmt.Sprintf("%s-%08x", name[:253-9], h)
}

// live says whether a Lease was renewed within its duration (by this agent's clock).
func live(l *coordinationv1.Lease, now time.Time) bool {
	if l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		return false
	}
	return now.Before(l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second))
}

func holder(l *coordinationv1.Lease) string { return ptr.Deref(l.Spec.HolderIdentity, "") }

// Take enters the node in the queue for a host shutdown that began at since (or keeps
// it there, renewing its ticket and its slot when due) and takes a free slot when it is
// the node's turn: the waiting nodes in the order their shutdowns began (then by
// name), the first ones as many as slots are free, once Settle has passed since its
// shutdown began. fits, asked only when it is the
// node's turn, says whether its VMs fit on the nodes that remain (why not, else
// empty); nil: they do. It never waits; call it again on a change (AddChangeHandler)
// or after a while.
func (t *Turns) Take(ctx context.Context, since time.Time, fits FitsFunc) (Turn, string, error) {
	now := t.opts.Clock.Now()
	if err := t.keepTicket(ctx, since, now); err != nil {
		return Turn{}, "", err
	}
	slots, free := t.slots(now)
	turn := Turn{Slots: t.opts.Slots}
	for i, s := range slots {
		if s != nil && live(s, now) && holder(s) != "" {
			turn.Draining = append(turn.Draining, holder(s))
			if holder(s) == t.opts.Node {
				turn.Granted, turn.Slot = true, SlotName(i)
			}
		}
	}
	if turn.Granted {
		return turn, "", t.renew(ctx, slots, now)
	}
	waiting := t.waiting(now, since, turn.Draining)
	for i, n := range waiting {
		if n == t.opts.Node {
			turn.Position = i + 1
		}
	}
	turn.Waiting = len(waiting)
	if turn.Position == 0 || turn.Position > len(free) {
		return turn, "", nil
	}
	if settled := since.Add(t.opts.Settle); now.Before(settled) {
		turn.Settling = settled.Sub(now)
		return turn, "", nil
	}
	if fits != nil {
		why, err := fits(ctx, turn.Draining, waiting[:turn.Position-1], waiting[turn.Position:])
		if err != nil || why != "" {
			return turn, why, err
		}
	}
	i := free[turn.Position-1]
	if err := t.acquire(ctx, i, slots[i], now); err != nil {
		if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) {
			return turn, "", nil // another agent took it first: its turn, not an error
		}
		return turn, "", err
	}
	turn.Granted, turn.Slot, turn.Position = true, SlotName(i), 0
	turn.Draining = append(turn.Draining, t.opts.Node)
	turn.Waiting--
	return turn, "", nil
}

// slots reads slots 0..Slots-1 (nil where missing) and which of them are free: missing,
// with no holder, or expired.
func (t *Turns) slots(now time.Time) ([]*coordinationv1.Lease, []int) {
	slots := make([]*coordinationv1.Lease, t.opts.Slots)
	var free []int
	for i := range slots {
		l, err := t.leases.Leases(t.opts.Namespace).Get(SlotName(i))
		if err == nil {
			slots[i] = l
		}
		if l == nil || holder(l) == "" || !live(l, now) {
			free = append(free, i)
		}
	}
	return slots, free
}

// waiting is the queue: this node (its shutdown began at since) and the nodes with a
// live ticket that hold no slot (draining), in the order their shutdowns began, then
// by name.
func (t *Turns) waiting(now, since time.Time, draining []string) []string {
	tickets, _ := t.leases.Leases(t.opts.Namespace).List(labels.SelectorFromSet(labels.Set{LabelTurn: "ticket"}))
	skip := map[string]bool{}
	for _, n := range draining {
		skip[n] = true
	}
	type entry struct {
		node string
		at   time.Time
	}
	q := []entry{{t.opts.Node, since}}
	for _, l := range tickets {
		n := holder(l)
		if n == "" || n == t.opts.Node || skip[n] || !live(l, now) || l.Spec.AcquireTime == nil {
			continue
		}
		q = append(q, entry{n, l.Spec.AcquireTime.Time})
	}
	sort.Slice(q, func(i, j int) bool {
		if !q[i].at.Equal(q[j].at) {
			return q[i].at.Before(q[j].at)
		}
		return q[i].node < q[j].node
	})
	out := make([]string, len(q))
	for i, e := range q {
		out[i] = e.node
	}
	return out
}

// renewDue: a Lease is renewed every third of its duration.
func (t *Turns) renewDue(l *coordinationv1.Lease, now time.Time) bool {
	return l.Spec.RenewTime == nil || now.Sub(l.Spec.RenewTime.Time) >= t.opts.LeaseDuration/3
}

// keepTicket creates the node's ticket, or renews it when due (a new since, a new
// shutdown, is written at once).
func (t *Turns) keepTicket(ctx context.Context, since time.Time, now time.Time) error {
	name := TicketName(t.opts.Node)
	at := metav1.NewMicroTime(since)
	l, err := t.leases.Leases(t.opts.Namespace).Get(name)
	if apierrors.IsNotFound(err) {
		l, err = t.kube.CoordinationV1().Leases(t.opts.Namespace).Get(ctx, name, metav1.GetOptions{})
	}
	switch {
	case apierrors.IsNotFound(err):
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: t.opts.Namespace, Labels: map[string]string{LabelTurn: "ticket"}}}
		t.fill(l, now)
		l.Spec.AcquireTime = &at
		_, err = t.kube.CoordinationV1().Leases(t.opts.Namespace).Create(ctx, l, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating the turn ticket %s: %w", name, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("reading the turn ticket %s: %w", name, err)
	}
	if holder(l) == t.opts.Node && l.Spec.AcquireTime != nil && l.Spec.AcquireTime.Equal(&at) && !t.renewDue(l, now) {
		return nil
	}
	l = l.DeepCopy()
	t.fill(l, now)
	l.Spec.AcquireTime = &at
	if _, err := t.kube.CoordinationV1().Leases(t.opts.Namespace).Update(ctx, l, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
		return fmt.Errorf("renewing the turn ticket %s: %w", name, err)
	}
	return nil
}

// fill makes l this node's, renewed now.
func (t *Turns) fill(l *coordinationv1.Lease, now time.Time) {
	renew := metav1.NewMicroTime(now)
	l.Spec.HolderIdentity = ptr.To(t.opts.Node)
	l.Spec.LeaseDurationSeconds = ptr.To(int32(t.opts.LeaseDuration / time.Second))
	l.Spec.RenewTime = &renew
}

// acquire takes slot i, read as cur (nil: missing), for this node: a create, or an
// update naming the resourceVersion read; a conflict means another agent was first.
func (t *Turns) acquire(ctx context.Context, i int, cur *coordinationv1.Lease, now time.Time) error {
	leases := t.kube.CoordinationV1().Leases(t.opts.Namespace)
	acquired := metav1.NewMicroTime(now)
	if cur == nil {
		l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: SlotName(i), Namespace: t.opts.Namespace, Labels: map[string]string{LabelTurn: "slot"}}}
		t.fill(l, now)
		l.Spec.AcquireTime = &acquired
		_, err := leases.Create(ctx, l, metav1.CreateOptions{})
		return err
	}
	l := cur.DeepCopy()
	t.fill(l, now)
	l.Spec.AcquireTime = &acquired
	l.Spec.LeaseTransitions = ptr.To(ptr.Deref(l.Spec.LeaseTransitions, 0) + 1)
	_, err := leases.Update(ctx, l, metav1.UpdateOptions{})
	return err
}

// renew renews the node's slot when due.
func (t *Turns) renew(ctx context.Context, slots []*coordinationv1.Lease, now time.Time) error {
	for _, s := range slots {
		if s == nil || holder(s) != t.opts.Node || !t.renewDue(s, now) {
			continue
		}
		l := s.DeepCopy()
		t.fill(l, now)
		if _, err := t.kube.CoordinationV1().Leases(t.opts.Namespace).Update(ctx, l, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
			return fmt.Errorf("renewing the drain slot %s: %w", s.Name, err)
		}
	}
	return nil
}

// Release gives back the node's slot (its holder emptied) and removes its ticket: the
// node is safe, or its shutdown was cancelled. Nothing is written when it holds
// neither (as the watch shows them).
func (t *Turns) Release(ctx context.Context) error {
	leases := t.kube.CoordinationV1().Leases(t.opts.Namespace)
	all, _ := t.leases.Leases(t.opts.Namespace).List(labels.Everything())
	// The ticket goes first: a node that gave back its slot but still had a ticket
	// would look to the others as waiting ahead of them.
	sort.Slice(all, func(i, j int) bool {
		return all[i].Labels[LabelTurn] == "ticket" && all[j].Labels[LabelTurn] != "ticket"
	})
	for _, l := range all {
		if holder(l) != t.opts.Node {
			continue
		}
		switch l.Labels[LabelTurn] {
		case "slot":
			// The watch may be behind this agent's own renewal: read it, and again on a
			// conflict, for as long as it is this node's.
			err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
				cur, err := leases.Get(ctx, l.Name, metav1.GetOptions{})
				if err != nil || holder(cur) != t.opts.Node {
					return err
				}
				cur.Spec.HolderIdentity, cur.Spec.RenewTime = nil, nil
				_, err = leases.Update(ctx, cur, metav1.UpdateOptions{})
				return err
			})
			if err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("giving back the drain slot %s: %w", l.Name, err)
			}
		case "ticket":
			if err := leases.Delete(ctx, l.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("removing the turn ticket %s: %w", l.Name, err)
			}
		}
	}
	return nil
}

// Holds says whether the node holds a ticket or a slot, as the watch shows them.
func (t *Turns) Holds() bool {
	all, _ := t.leases.Leases(t.opts.Namespace).List(labels.Everything())
	for _, l := range all {
		if holder(l) == t.opts.Node {
			return true
		}
	}
	return false
}
