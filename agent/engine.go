package agent

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/clock"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/fleet"
	"github.com/node-agent/node-agent/nodeinfo"
)

// NodeView is what the engine reads about its node (nodeinfo.View provides it).
type NodeView interface {
	Synced() (bool, string)
	LauncherPodsListed() bool
	Node() (*corev1.Node, error)
	VMIs() []*kubevirtv1.VirtualMachineInstance
	LauncherPods() []*corev1.Pod
	Config() (nodeinfo.Config, error)
	// NamespaceMigrations lists the migrations of a namespace (read once per sync).
	NamespaceMigrations(ctx context.Context, namespace string) ([]kubevirtv1.VirtualMachineInstanceMigration, error)
	// VMIMigrations lists the migrations of VMIs of one namespace, by VMI name (KubeVirt's
	// kubevirt.io/vmi-name label; all the VMIs in one request).
	VMIMigrations(ctx context.Context, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error)
	// MigrationTargetPods lists the target pods of one migration (KubeVirt's
	// kubevirt.io/migrationJobUID label).
	MigrationTargetPods(ctx context.Context, namespace string, migration types.UID) ([]corev1.Pod, error)
	// AddChangeHandler has f called after every change the view sees (before Run).
	AddChangeHandler(f func())
}

var _ NodeView = (*nodeinfo.View)(nil)

// Clients are the API clients the engine acts through.
type Clients struct {
	Kube kubernetes.Interface
	// KubeVirt is a kubevirt.io/v1 REST client (nodeinfo.NewKubeVirtClient).
	KubeVirt rest.Interface
	// Subresources is a subresources.kubevirt.io/v1 REST client.
	Subresources rest.Interface
}

// Options configure the engine.
type Options struct {
	NodeName string
	// AllPods also evicts every other pod of the node during a drain, as
	// `kubectl drain --ignore-daemonsets --delete-emptydir-data --force` would.
	AllPods bool
	// ShutdownAllPods does the same for a drain started by a host shutdown.
	ShutdownAllPods bool
	// Resync is how often a drain in progress is looked at again. Default 5s.
	Resync time.Duration
	// PodEvictionRetry is the first pause before another eviction attempt of an
	// other pod (--all-pods) that was refused; it doubles up to EvictionBackoffMax.
	// Default 5s.
	PodEvictionRetry time.Duration
	// EvictionBackoff and EvictionBackoffMax bound the per-VM exponential backoff of a
	// refused eviction (and of the other pods' evictions). Default 2s and 1m.
	EvictionBackoff    time.Duration
	EvictionBackoffMax time.Duration
	// MigrationStallTimeout is how long a migration may stay in one of the phases that
	// the target node's virt-handler moves on (Scheduled, PreparingTarget,
	// TargetReady) before its VM is reported blocked (MigrationStatus.Stalled).
	// Default DefaultMigrationStallTimeout.
	MigrationStallTimeout time.Duration
	// ProbeAPI asks the API server whether it serves; while a drain or a host shutdown
	// is under way the engine calls it every few seconds, and reports the node's state
	// unknown while it fails (apihealth.go). Nil: no probe.
	ProbeAPI APIProbe
	// Turns, when set, has a host shutdown's drain wait for its turn across the
	// cluster (turn.go): at most MaxConcurrentDrains at once (for the status), and
	// out of turn after MaxTurnWait (default DefaultMaxTurnWait).
	Turns               Turns
	MaxConcurrentDrains int
	MaxTurnWait         time.Duration
	// PriorityLevel names the API Priority and Fairness level the API server puts the
	// agent's requests in (nodeinfo.PriorityLevel). In a level of its own the agent acts
	// on up to actConcurrencyOwnLevel VMs at once, else actConcurrency (see there).
	// Nil: not known, actConcurrency.
	PriorityLevel PriorityLevel
	Clock         clock.WithTicker
	Log           logrus.FieldLogger
}

// Engine drains its node when asked: on the drain taint, or on a host shutdown.
type Engine struct {
	opts     Options
	view     NodeView
	clients  Clients
	recorder record.EventRecorder
	metrics  *Metrics
	queue    workqueue.TypedRateLimitingInterface[string]
	log      logrus.FieldLogger

	mu      sync.Mutex
	status  NodeStatus
	changed chan struct{} // closed and replaced when status changes
	since   since
	// intent is what the shutdown path asked for; sync carries it out on the Node.
	intent shutdownIntent
	gen    int                // counts the shutdown notices, so sync clears only what it carried out
	loaded bool               // sync has read the shutdown record an earlier agent left
	abort  context.CancelFunc // ends a sync's drain that only a pending shutdown asked for
	// adopted is set when the pending shutdown was read from the Node, not notified.
	adopted bool
	// Writes of the Node that failed: the error reported, when to try again.
	nodeErr     map[string]string
	nodeRetry   map[string]time.Time
	nodeBackoff workqueue.TypedRateLimiter[string]
	notHeld     string // why a host shutdown under way is not held by a lock of ours
	// blindReported: the not-synced reason last reported during a shutdown; blindSince:
	// since when the view is not synced (zero while it is).
	blindReported string
	blindSince    time.Time
	// stateAt and statePhase: when the state annotation was last written, and the
	// phase it said (writeState).
	stateAt    time.Time
	statePhase string
	// expectations are the actions taken that the cache does not show yet.
	expectations expectations
	// retries backs off the VMs whose requests were refused.
	retries  *retries
	evictor  evictor
	warnedMu sync.Mutex
	warned   map[string]sets // warnings already sent this drain: VM -> causes
	pods     *PodDrainer
	// withdrawing is the withdraw under way, kept across the syncs that retry it after
	// an answer that may change (virt-api restarting, a timeout); only sync uses it.
	withdrawing withdrawProgress
	// migrations names the migration of each migrating VM for the status.
	migrations *migrations
	// probeWake starts the API server probes (runAPIProbe) when a drain or a host
	// shutdown is under way; idle, the agent does not probe.
	probeWake chan struct{}
	// api is what the API server probes found (under mu).
	api apiHealth
	// turn is the host shutdown's turn to drain (under mu).
	turn turnState
	// fits is the capacity check before a turn is taken (fleet.Fits).
	fits func(ctx context.Context, kube kubernetes.Interface, node string, mine []*corev1.Pod, draining, ahead, behind []string, shuttingDown func(*corev1.Node) bool) (string, error)
}

type sets map[string]struct{}

// New creates an engine; it attaches itself to the view's changes (each enqueues a
// look at the node). Run works the queue.
func New(view NodeView, clients Clients, recorder record.EventRecorder, metrics *Metrics, opts Options) *Engine {
	if opts.Resync <= 0 {
		opts.Resync = 5 * time.Second
	}
	if opts.MigrationStallTimeout <= 0 {
		opts.MigrationStallTimeout = DefaultMigrationStallTimeout
	}
	if opts.PodEvictionRetry <= 0 {
		opts.PodEvictionRetry = DefaultPodEvictionRetry
	}
	if opts.EvictionBackoff <= 0 {
		opts.EvictionBackoff = defaultEvictionBackoff
	}
	if opts.EvictionBackoffMax < opts.EvictionBackoff {
		opts.EvictionBackoffMax = max(defaultEvictionBackoffMax, opts.EvictionBackoff)
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	if opts.MaxTurnWait <= 0 {
		opts.MaxTurnWait = DefaultMaxTurnWait
	}
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	if metrics == nil {
		metrics = NewMetrics(opts.NodeName)
	}
	e := &Engine{
		opts:     opts,
		view:     view,
		clients:  clients,
		recorder: recorder,
		metrics:  metrics,
		log:      opts.Log.WithField("node", opts.NodeName),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "node-agent", Clock: opts.Clock}),
		changed:     make(chan struct{}),
		probeWake:   make(chan struct{}, 1),
		since:       since{},
		nodeErr:     map[string]string{},
		nodeRetry:   map[string]time.Time{},
		nodeBackoff: workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Second, 2*time.Minute),
		warned:      map[string]sets{},
		retries:     newRetries(opts.EvictionBackoff, opts.EvictionBackoffMax, opts.Clock),
		evictor:     apiEvictor{kube: clients.Kube},
		fits:        fleet.Fits,
		status:      NodeStatus{Node: opts.NodeName, Reason: "starting"},
	}
	if opts.AllPods || opts.ShutdownAllPods {
		e.pods = NewPodDrainer(clients.Kube, PodDrainerOptions{
			Node: opts.NodeName, Retry: opts.PodEvictionRetry, RetryMax: opts.EvictionBackoffMax, Clock: opts.Clock,
			Log: e.log, Recorder: recorder, Metrics: metrics,
		})
	}
	e.migrations = &migrations{list: view.VMIMigrations, targets: view.MigrationTargetPods, clock: opts.Clock, stall: opts.MigrationStallTimeout, entries: map[string]migrationEntry{}}
	view.AddChangeHandler(e.Enqueue)
	if opts.Turns != nil {
		opts.Turns.AddChangeHandler(e.Enqueue)
	}
	return e
}

// Enqueue asks for the node to be looked at again.
func (e *Engine) Enqueue() { e.queue.Add(e.opts.NodeName) }

// Run works the queue until ctx ends.
func (e *Engine) Run(ctx context.Context) error {
	go func() {
		<-ctx.Done()
		e.queue.ShutDown()
	}()
	if e.opts.ProbeAPI != nil {
		go e.runAPIProbe(ctx)
	}
	e.Enqueue()
	for e.processNext(ctx) {
	}
	if e.pods != nil {
		e.pods.Stop()
	}
	return nil
}

func (e *Engine) processNext(ctx context.Context) bool {
	key, quit := e.queue.Get()
	if quit {
		return false
	}
	defer e.queue.Done(key)
	requeue, err := e.syncSafely(ctx)
	e.wakeAPIProbe()
	switch {
	case err != nil:
		e.log.WithError(err).Warn("sync failed; retrying")
		e.queue.AddRateLimited(key)
	case requeue:
		e.queue.Forget(key)
		e.queue.AddAfter(key, e.opts.Resync)
	default:
		e.queue.Forget(key)
	}
	return true
}

// syncSafely runs sync, turning a panic (a bug met on some object in the cluster)
// into an error that is logged and retried with a backoff, so that one bad object
// cannot crash-loop the agent and stop it draining everything else.
func (e *Engine) syncSafely(ctx context.Context) (requeue bool, err error) {
	defer func() {
		if r := recover(); r != nil {
			e.log.WithField("panic", r).WithField("stack", string(debug.Stack())).Error("sync panicked; retrying")
			requeue, err = false, fmt.Errorf("sync panicked: %v", r)
		}
	}()
	return e.sync(ctx)
}

// ShutdownStarted records that a host shutdown is under way (at, and released at the
// latest at deadline) and asks for a look at the node: sync records it on the Node,
// takes the node out of service (drain taint and cordon, recorded as the agent's own)
// and drains it. The shutdown path calls it; it never writes the Node itself.
func (e *Engine) ShutdownStarted(at, deadline time.Time) {
	e.mu.Lock()
	e.intent = shutdownIntent{pending: true, at: at, deadline: deadline}
	e.adopted = false
	e.gen++
	e.mu.Unlock()
	e.wakeAPIProbe()
	e.Enqueue()
}

// ShutdownCancelled records that no host shutdown is pending (PrepareForShutdown(false),
// or a logind that forgot it) and asks for a look at the node: sync records the cancel
// on the Node before anything else, gives the node back (retrying with a backoff until
// it can) and withdraws the drain. A drain under way for the shutdown alone stops at
// once: no VM is evicted for a cancelled shutdown. Calling it with no shutdown pending
// is harmless: it gives back only what a shutdown recorded on the Node took.
func (e *Engine) ShutdownCancelled() {
	e.mu.Lock()
	e.intent = shutdownIntent{cancelled: true}
	e.adopted = false
	e.gen++
	abort := e.abort
	e.mu.Unlock()
	if abort != nil {
		abort()
	}
	e.Enqueue()
}

func (e *Engine) shutdownPending() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.intent.pending
}

// sync is one look at the node: start, continue or withdraw a drain. It reports
// whether the node must be looked at again after Resync.
func (e *Engine) sync(ctx context.Context) (bool, error) {
	if ok, why := e.view.Synced(); !ok {
		e.notSynced(why, true)
		return true, nil
	}
	if why := e.apiUnknown(); why != "" {
		// What the cache shows may be gone or have changed: no proof either way.
		e.notSynced(why, false)
		return true, nil
	}
	e.metrics.ViewSynced.Set(1)
	e.mu.Lock()
	e.blindSince = time.Time{}
	e.mu.Unlock()
	node, err := e.view.Node()
	if apierrors.IsNotFound(err) {
		e.setStatus(func(s *NodeStatus) { s.Ready, s.Reason = false, "node "+e.opts.NodeName+" not found" })
		return true, nil
	}
	if err != nil {
		return false, err
	}
	cfg, cfgErr := e.view.Config()
	e.reportConfig(node, cfg, cfgErr)
	e.refreshPriorityLevel(ctx)

	var rec DrainRecord
	hasRecord, err := readAnnotation(node, AnnotationDrain, &rec)
	if err != nil {
		e.log.WithError(err).Warn("ignoring the unreadable drain record; a new drain starts if one is asked for")
		e.metrics.ConfigErrors.WithLabelValues("drain-record").Inc()
	}
	intent := e.reconcileShutdown(ctx, node, cfg.DrainTaintKey)
	shutdown := intent.pending
	// The drain taint is a trigger when someone else put it there: the agent's own, added
	// for a host shutdown, serves that shutdown only, and no VM is evicted for a
	// shutdown that was cancelled (the taint is on its way off then).
	tainted := TaintTriggersDrain(node, cfg.DrainTaintKey)
	if !tainted && !shutdown {
		if hasRecord {
			if err := e.withdraw(ctx, node, &rec); err != nil {
				return false, err
			}
		}
		// With --all-pods (or --shutdown-all-pods), the pods a drain would evict count
		// against "safe to power off" whether or not a drain runs.
		podsLeft := 0
		if e.pods != nil {
			podsLeft = e.otherPods(ctx, false)
		}
		e.report(ctx, node, cfg, "", vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods()), nil, withPods(podsLeft))
		return e.pods != nil, nil
	}
	e.withdrawing = withdrawProgress{} // a withdraw cut short by a new trigger starts afresh next time
	if !tainted {
		// A drain for the shutdown alone: a cancel ends it where it stands.
		parent := ctx
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		e.mu.Lock()
		stillPending, unconfirmed := e.intent.pending, e.adopted
		e.abort = cancel
		e.mu.Unlock()
		defer func() {
			e.mu.Lock()
			e.abort = nil
			e.mu.Unlock()
		}()
		if !stillPending {
			e.Enqueue()
			return false, nil
		}
		if intent.waiting {
			// Its turn to drain has not come: held, nothing acted on (awaitTurn).
			e.report(ctx, node, cfg, "", vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods()), nil)
			return true, nil
		}
		if unconfirmed {
			// Read from the Node by a restarted agent: the node stays out of service, but
			// no VM is acted on before logind confirms the shutdown (ShutdownStarted): it
			// may have been cancelled while no agent ran.
			e.report(ctx, node, cfg, TriggerShutdown, vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods()), nil)
			return true, nil
		}
		requeue, err := e.startOrDrain(ctx, node, cfg, rec, hasRecord)
		if ctx.Err() == nil {
			st, _ := e.Status()
			e.keepTurn(ctx, intent, st.Safe && st.Ready)
		}
		if ctx.Err() != nil && parent.Err() == nil {
			// Cancelled while it ran: look again, now to withdraw.
			e.log.Info("host shutdown cancelled during the drain: stopping it")
			e.Enqueue()
			return false, nil
		}
		return requeue, err
	}
	return e.startOrDrain(ctx, node, cfg, rec, hasRecord)
}

// startOrDrain starts a drain (writing its record) unless one is recorded, and goes on with it.
func (e *Engine) startOrDrain(ctx context.Context, node *corev1.Node, cfg nodeinfo.Config, rec DrainRecord, hasRecord bool) (bool, error) {
	shutdown := e.shutdownPending()
	if !hasRecord {
		rec = DrainRecord{Trigger: TriggerTaint, TaintKey: cfg.DrainTaintKey, Started: e.opts.Clock.Now().UTC()}
		if shutdown {
			rec.Trigger = TriggerShutdown
		}
		if err := e.writeRecord(ctx, node.Name, &rec); err != nil {
			return false, err
		}
		e.warnedMu.Lock()
		e.warned = map[string]sets{}
		e.warnedMu.Unlock()
		e.expectations.reset()
		e.retries.reset()
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonDrainStarted, "Drain started (%s, taint key %s)", rec.Trigger, cfg.DrainTaintKey)
		e.log.WithFields(logrus.Fields{"trigger": rec.Trigger, "taintKey": cfg.DrainTaintKey}).Info("drain started")
		e.metrics.DrainsStarted.WithLabelValues(rec.Trigger).Inc()
	}
	return e.drain(ctx, node, cfg, &rec)
}

// drain acts on every VM that needs it, then reports.
func (e *Engine) drain(ctx context.Context, node *corev1.Node, cfg nodeinfo.Config, rec *DrainRecord) (bool, error) {
	vms := vmsOnNode(node.Name, e.view.VMIs(), e.view.LauncherPods())
	present := map[string]bool{}
	for _, v := range vms {
		present[v.key] = true
	}
	// What is kept per VM is dropped when the VM leaves: memory does not grow with
	// the VMs that passed through the node.
	e.expectations.keep(present)
	e.retries.keep(present)
	e.forgetWarned(present)
	var pending []*vm
	decisions := map[string]Decision{}
	awaited := map[string]outcome{}
	for _, v := range vms {
		d := decide(v, cfg)
		decisions[v.key] = d
		state, _ := observe(v, d, node.Name, true)
		// A blocked VM goes to act too: it is reported there, loudly (events, log).
		if state != StatePending && state != StateBlocked {
			e.expectations.seen(v.key)
			e.retries.done(v.key)
			continue
		}
		if o, ok := e.expectations.awaiting(v, e.opts.Clock.Now()); ok {
			// Acted on already; the cache has not shown it yet.
			awaited[v.key] = o
			continue
		}
		if o, ok := e.retries.waiting(v.key); ok {
			// Refused lately: not asked again before its backoff, whatever events come.
			awaited[v.key] = o
			continue
		}
		pending = append(pending, v)
	}
	// Record the intent before acting, so that a restarted agent can withdraw it.
	added := false
	for _, v := range pending {
		if _, ok := rec.Requested[v.key]; !ok && decisions[v.key].Action != ActionNone {
			if rec.Requested == nil {
				rec.Requested = map[string]Action{}
			}
			rec.Requested[v.key] = decisions[v.key].Action
			added = true
		}
	}
	if added {
		if err := e.writeRecord(ctx, node.Name, rec); err != nil {
			return false, err
		}
	}
	migrations, unread, errs := e.migrationsOf(ctx, pending, decisions)
	var act []*vm
	for _, v := range pending {
		if unread[v.key] {
			awaited[v.key] = outcome{StatePending, "cannot list the migrations of namespace " + v.vmi.Namespace}
			continue
		}
		act = append(act, v)
	}
	outcomes := e.actAll(ctx, node, migrationsFirst(act, decisions), decisions, migrations)
	for key, o := range awaited {
		outcomes[key] = o
	}
	// While a host shutdown is pending the drain serves it, whatever started it (an
	// operator's taint before the shutdown): the status says so, which is what the
	// shutdown waits for, and --shutdown-all-pods applies.
	trigger := rec.Trigger
	if e.shutdownPending() {
		trigger = TriggerShutdown
	}
	podsLeft := 0
	if (rec.Trigger == TriggerTaint && e.opts.AllPods) || (trigger == TriggerShutdown && e.opts.ShutdownAllPods) {
		podsLeft = e.otherPods(ctx, true)
	}
	safe := e.report(ctx, node, cfg, trigger, vms, outcomes, withPods(podsLeft))
	if safe && rec.Completed == nil {
		now := e.opts.Clock.Now().UTC()
		rec.Completed = &now
		if err := e.writeRecord(ctx, node.Name, rec); err != nil {
			return false, err
		}
		took := now.Sub(rec.Started)
		e.metrics.DrainDuration.WithLabelValues(rec.Trigger).Observe(took.Seconds())
		e.recorder.Eventf(node, corev1.EventTypeNormal, ReasonDrainCompleted, "Drain completed in %s: no VM left on the node", took.Round(time.Second))
		e.log.WithField("took", took.Round(time.Millisecond).String()).Info("drain completed: no VM left on the node")
	}
	return true, errors.Join(errs...)
}

// otherPods counts the node's other pods a drain evicts (with evict, evicting those
// due first); one when they cannot be listed, so that the node is not reported safe.
func (e *Engine) otherPods(ctx context.Context, evict bool) int {
	left, err := e.pods.Ensure(ctx, e.view.LauncherPods(), evict)
	if err != nil {
		e.log.WithError(err).Warn("cannot list the node's other pods")
		return 1
	}
	return left
}

// actConcurrency bounds the actions (evictions, migrations) in flight at once when the
// agent's requests share an API Priority and Fairness level with KubeVirt's: a node's
// hundred VMs are acted on 16 round trips at a time, not one after another and not all
// at once. Each eviction of a virt-launcher pod goes through virt-api's webhook, which
// reads the pod and the VMI back through the same API server, and an eviction holds its
// seat in the level while its webhook runs. In workload-low (where both service accounts
// go by default; it lends most of its seats away while idle) all at once holds every
// seat the level has and the webhook's reads queue behind them: measured, they waited
// 9.3 s, the answers took 10.8 s (the webhook's timeout is 10 s, failurePolicy Fail),
// and the 100-VM drain 21.8 s instead of 13.2 (docs/BENCHMARKS.md, "Reaction").
const actConcurrency = 16

// actConcurrencyOwnLevel bounds them when the API server puts the agent's requests in
// a level of their own (nodeinfo.OwnPriorityLevel, which manifests/base ships): the
// level's seats and queues then pace the agent's requests without holding back
// virt-api's reads, and every VM of a full node (the kubelet's default is 110 pods) is
// asked at once. The bound only caps the goroutines.
const actConcurrencyOwnLevel = 128

// PriorityLevel names the API Priority and Fairness level of the agent's last request:
// "" when not known.
type PriorityLevel interface {
	Name(ctx context.Context) (string, error)
}

// refreshPriorityLevel puts the agent's API Priority and Fairness level in the status,
// logging a change: it decides how many VMs are acted on at once (actLimit).
func (e *Engine) refreshPriorityLevel(ctx context.Context) {
	if e.opts.PriorityLevel == nil {
		return
	}
	name, err := e.opts.PriorityLevel.Name(ctx)
	if err != nil {
		e.log.WithError(err).WithField("inFlight", actConcurrency).Warn("cannot tell the API priority level of the agent's requests")
	}
	e.mu.Lock()
	changed := e.status.PriorityLevel != name
	e.mu.Unlock()
	if !changed {
		return
	}
	e.setStatus(func(s *NodeStatus) { s.PriorityLevel = name })
	e.log.WithField("priorityLevel", name).WithField("inFlight", e.actLimit()).Info("the API server's priority level of the agent's requests")
}

// actLimit is how many VMs are acted on at once: actConcurrencyOwnLevel in the agent's
// own API priority level, else actConcurrency.
func (e *Engine) actLimit() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.status.PriorityLevel == nodeinfo.OwnPriorityLevel {
		return actConcurrencyOwnLevel
	}
	return actConcurrency
}

// migrationsFirst orders the VMs to act on so that the live migrations are asked
// first (in their order), then the rest: KubeVirt moves a node's VMs two at a time, and
// the first of them should not start behind the shutdowns asked in the same moment
// (docs/BENCHMARKS.md, "Every row, the shipped code": the mixed rows).
func migrationsFirst(vms []*vm, decisions map[string]Decision) []*vm {
	out := slices.Clone(vms)
	slices.SortStableFunc(out, func(a, b *vm) int {
		am, bm := decisions[a.key].Action == ActionMigrate, decisions[b.key].Action == ActionMigrate
		switch {
		case am && !bm:
			return -1
		case bm && !am:
			return 1
		}
		return 0
	})
	return out
}

// actAll acts on the VMs, actLimit at a time. A VM whose request was refused
// backs off; the refusal is reported (event, log, metric, status), not returned as an
// error: it does not make the node's sync retry.
func (e *Engine) actAll(ctx context.Context, node *corev1.Node, vms []*vm, decisions map[string]Decision, migrations map[string][]kubevirtv1.VirtualMachineInstanceMigration) map[string]outcome {
	var mu sync.Mutex
	outcomes := map[string]outcome{}
	sem := make(chan struct{}, e.actLimit())
	var wg sync.WaitGroup
	for _, v := range vms {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			o, retry := e.actSafely(ctx, node, v, decisions[v.key], migrations[v.key])
			switch {
			case retry:
				e.retries.refused(v.key, o)
			case o.state == StateMigrating || o.state == StateShuttingDown || o.state == StateWaitingExternal:
				e.retries.done(v.key)
				e.expectations.expect(v, o, e.opts.Clock.Now())
			}
			mu.Lock()
			defer mu.Unlock()
			outcomes[v.key] = o
		}()
	}
	wg.Wait()
	return outcomes
}

// actSafely runs act, turning a panic (a bug met on one VM's objects) into a refused
// request that backs off like any other: syncSafely cannot recover a panic in act's
// goroutine, and without this one VM would crash the agent and stop every drain.
func (e *Engine) actSafely(ctx context.Context, node *corev1.Node, v *vm, d Decision, migrations []kubevirtv1.VirtualMachineInstanceMigration) (o outcome, retry bool) {
	defer func() {
		if r := recover(); r != nil {
			e.vmLog(v).WithField("panic", r).WithField("stack", string(debug.Stack())).Error("acting on the VM panicked; retrying with a backoff")
			o, retry = outcome{StatePending, fmt.Sprintf("acting on it failed (%v); retrying", r)}, true
		}
	}()
	return e.act(ctx, node, v, d, migrations)
}

// migrationsOf reads, once per sync and namespace, the migrations of the VMs about to
// be live-migrated, by VM key. A namespace that cannot be read is an error, and its
// VMs (unread) are not acted on in this sync.
func (e *Engine) migrationsOf(ctx context.Context, vms []*vm, decisions map[string]Decision) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, map[string]bool, []error) {
	out := map[string][]kubevirtv1.VirtualMachineInstanceMigration{}
	unread := map[string]bool{}
	listed := map[string]error{}
	var errs []error
	for _, v := range vms {
		if decisions[v.key].Action != ActionMigrate {
			continue
		}
		ns := v.vmi.Namespace
		err, done := listed[ns]
		if !done {
			var list []kubevirtv1.VirtualMachineInstanceMigration
			list, err = e.view.NamespaceMigrations(ctx, ns)
			listed[ns] = err
			if err != nil {
				errs = append(errs, err)
			}
			for _, m := range list {
				key := ns + "/" + m.Spec.VMIName
				out[key] = append(out[key], m)
			}
		}
		if err != nil {
			unread[v.key] = true
		}
	}
	return out, unread, errs
}

func decide(v *vm, cfg nodeinfo.Config) Decision {
	if v.vmi == nil {
		return Decision{Action: ActionNone, Reason: "a virt-launcher pod whose VMI runs elsewhere"}
	}
	return Decide(v.vmi, cfg.ClusterEvictionStrategy)
}

// reportConfig says, once per distinct error, that a configuration source is unusable.
func (e *Engine) reportConfig(node *corev1.Node, cfg nodeinfo.Config, err error) {
	e.mu.Lock()
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	changed := msg != e.status.ConfigError
	e.mu.Unlock()
	if !changed {
		return
	}
	e.setStatus(func(s *NodeStatus) { s.ConfigError = msg })
	if err == nil {
		e.log.WithFields(logrus.Fields{"taintKey": cfg.DrainTaintKey, "source": cfg.DrainTaintKeySource}).Info("configuration is valid again")
		return
	}
	e.metrics.ConfigErrors.WithLabelValues("config").Inc()
	e.recorder.Eventf(node, corev1.EventTypeWarning, ReasonConfigError, "Configuration error, using taint key %s from %s: %v", cfg.DrainTaintKey, cfg.DrainTaintKeySource, err)
	e.log.WithError(err).WithFields(logrus.Fields{"taintKey": cfg.DrainTaintKey, "source": cfg.DrainTaintKeySource}).Warn("configuration error; keeping the last good configuration")
}

// vmLog is the logger for one VM.
func (e *Engine) vmLog(v *vm) logrus.FieldLogger {
	if v.vmi == nil {
		return e.log.WithFields(logrus.Fields{"namespace": v.pods[0].Namespace, "pod": v.pods[0].Name})
	}
	return e.log.WithFields(logrus.Fields{"namespace": v.vmi.Namespace, "vmi": v.vmi.Name})
}

func (e *Engine) String() string { return fmt.Sprintf("node-agent engine for %s", e.opts.NodeName) }
