// Package sim simulates, against a real kube-apiserver, kube-scheduler,
// kube-controller-manager and KubeVirt's real virt-controller and virt-api, the
// node-side programs that cannot run in a test: the kubelet and virt-handler.
// The real kube-scheduler places every pod.
//
// Each is an informer-driven controller that reads and writes the fields its real
// counterpart reads and writes (KubeVirt v1.8.0). As in a cluster, each simulated
// node has a kubelet and a virt-handler of its own: work queues of its own, so a
// busy node (a drain shutting 50 guests down) does not hold up another node's
// pods (a migration's target pod), with the workers of the real ones: virt-handler
// runs KubeVirt's 10 VMI workers, the kubelet kubeletWorkers (the real kubelet runs
// every pod in a goroutine of its own and writes their statuses one at a time):
//
//   - kubelet: registers its node and keeps it alive as a kubelet does: a Lease
//     in kube-node-lease renewed every Options.LeaseRenewInterval, the node's
//     status (Ready and the pressure conditions, capacity and allocatable with
//     KubeVirt's device-plugin resources, addresses, node info) posted at start
//     and every Options.NodeStatusInterval; the node lifecycle controller of
//     kube-controller-manager then lifts the not-ready taint, and turns the node
//     NotReady (Unknown) and taints it unreachable once StopKubelet stops it. It
//     runs the pods bound to simulated nodes (phase Running, containers running
//     and ready, readiness gates honoured, a pod IP), reports exited containers
//     (phase Succeeded/Failed) and deletes terminated pods with grace 0. On
//     deletion a virt-launcher pod whose guest runs exits when the guest is off
//     (or is killed at the end of its grace period); other pods' processes exit
//     on SIGTERM at once.
//   - virt-handler: starts the guest of a Scheduled VMI (phase Running,
//     LiveMigratable, selinuxContext "none"), drives live migrations through
//     status.migrationState, and shuts the guest down when its virt-launcher pod
//     or the VMI is deleted.
//
// Only nodes added with AddNode are simulated. Run one Sim per cluster.
//
// The files by concern: sim.go starts the informers and each node's work queues;
// routing.go routes pod and VMI events to the queues of a node's kubelet and
// virt-handler; nodes.go is a node's lifecycle (AddNode, the Lease and status
// heartbeat, Reboot, StopKubelet and StartKubelet); kubelet.go runs pods;
// handler.go and migratable.go are virt-handler; objects.go builds test objects
// and waits on them.
//
// Test knobs, read from VMI annotations (in reality they come from the guest and
// the network):
//
//   - AnnotationMigrationDuration ("sim.node-agent.test/migration-duration"): how
//     long a live migration runs, a Go duration; default Options.MigrationDuration.
//   - AnnotationMigrationFailures ("sim.node-agent.test/migration-failures"): the
//     first N migration attempts of this VMI fail (failed: true on the VMI's
//     migrationState, so KubeVirt marks the migration Failed and may retry).
//   - AnnotationShutdownDuration ("sim.node-agent.test/shutdown-duration"): how
//     long the guest takes to power off after an ACPI shutdown request; default
//     Options.ShutdownDuration. Beyond the VMI's terminationGracePeriodSeconds
//     the domain is destroyed instead and the VMI ends Failed.
package sim

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// Test knobs read from VMI annotations; see the package documentation.
const (
	AnnotationMigrationDuration = "sim.node-agent.test/migration-duration"
	AnnotationMigrationFailures = "sim.node-agent.test/migration-failures"
	AnnotationShutdownDuration  = "sim.node-agent.test/shutdown-duration"
)

// Resources a simulated node advertises besides cpu, memory and pods: the device
// plugins of virt-handler, which virt-launcher pods request
// (pkg/virt-controller/services/renderresources.go getRequiredResources).
const (
	ResourceKVM        corev1.ResourceName = "devices.kubevirt.io/kvm"
	ResourceTun        corev1.ResourceName = "devices.kubevirt.io/tun"
	ResourceVhostNet   corev1.ResourceName = "devices.kubevirt.io/vhost-net"
	ResourceVhostVsock corev1.ResourceName = "devices.kubevirt.io/vhost-vsock"
)

// Options configure the simulators. The zero value is usable.
type Options struct {
	// Log receives the simulators' logs. Default: a new logrus logger at Info.
	Log logrus.FieldLogger
	// LeaseRenewInterval is how often a simulated kubelet renews its node's Lease
	// (a real kubelet: 10 s). It must stay well below the controller-manager's
	// node-monitor-grace-period (integration/cluster: 16 s). Default: 2s.
	LeaseRenewInterval time.Duration
	// NodeStatusInterval is how often a simulated kubelet posts its node's status
	// when nothing changed (a real kubelet: 5 min). Default: 1m.
	NodeStatusInterval time.Duration
	// MigrationDuration is how long a live migration runs unless the VMI's
	// AnnotationMigrationDuration says otherwise. Default: 1s.
	MigrationDuration time.Duration
	// ShutdownDuration is how long a guest takes to power off unless the VMI's
	// AnnotationShutdownDuration says otherwise; it is capped by the VMI's
	// terminationGracePeriodSeconds. Default: 1s.
	ShutdownDuration time.Duration
	// WaitTimeout bounds the Wait* helpers when their context has no deadline.
	// Default: 3m.
	WaitTimeout time.Duration
	// VirtHandlerUser is the user virt-handler writes VMIs as, impersonated with
	// the configuration given to Start (which must allow impersonation, as a
	// cluster admin's does) with a service account's groups and no more rights
	// than RBAC gives that user: for the default, the kubevirt-handler ClusterRole
	// of KubeVirt's install (integration/cluster creates it). KubeVirt's VMI
	// webhooks let only its own service accounts change a VMI's status and its
	// reserved kubevirt.io/ labels. Default: KubeVirt's virt-handler service
	// account in the kubevirt namespace.
	VirtHandlerUser string
}

// DefaultVirtHandlerUser is virt-handler's service account in a KubeVirt
// installed in the kubevirt namespace.
const DefaultVirtHandlerUser = "system:serviceaccount:kubevirt:kubevirt-handler"

// Sim runs the simulated kubelets and virt-handlers.
type Sim struct {
	log  logrus.FieldLogger
	opts Options
	kube kubernetes.Interface
	kv   rest.Interface
	// handlerKV is kv as virt-handler (Options.VirtHandlerUser).
	handlerKV rest.Interface
	ctx       context.Context // Start's: ends the kubelets' heartbeats

	pods cache.SharedIndexInformer
	vmis cache.SharedIndexInformer

	mu         sync.Mutex
	simNodes   map[string]*simNode             // by node name
	nodeIndex  int                             // last index handed out
	runtimes   map[types.UID]*podRuntime       // by pod UID
	domains    map[types.UID]*domain           // by VMI UID
	migrations map[types.UID]*migrationRun     // by migration UID
	attempts   map[types.UID]int               // migrations started, by VMI UID
	warned     map[types.UID]bool              // VMIs already warned about
	podsByNode map[string]map[types.UID]string // node -> pod UID -> key, for Reboot
	vmiLocks   map[string]*sync.Mutex          // by VMI key, see syncVMI; kept: a VM's next VMI has the key
}

// Start starts the simulators. They run until ctx ends; the informers are synced
// when Start returns.
func Start(ctx context.Context, cfg *rest.Config, opts Options) (*Sim, error) {
	if opts.Log == nil {
		l := logrus.New()
		l.SetLevel(logrus.InfoLevel)
		opts.Log = l
	}
	if opts.LeaseRenewInterval <= 0 {
		opts.LeaseRenewInterval = 2 * time.Second
	}
	if opts.NodeStatusInterval <= 0 {
		opts.NodeStatusInterval = time.Minute
	}
	if opts.MigrationDuration <= 0 {
		opts.MigrationDuration = time.Second
	}
	if opts.ShutdownDuration <= 0 {
		opts.ShutdownDuration = time.Second
	}
	if opts.WaitTimeout <= 0 {
		opts.WaitTimeout = 3 * time.Minute
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	kv, err := nodeinfo.NewKubeVirtClient(cfg)
	if err != nil {
		return nil, err
	}
	if opts.VirtHandlerUser == "" {
		opts.VirtHandlerUser = DefaultVirtHandlerUser
	}
	handlerCfg := rest.CopyConfig(cfg)
	handlerCfg.Impersonate = rest.ImpersonationConfig{
		UserName: opts.VirtHandlerUser,
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:kubevirt", "system:authenticated"},
	}
	handlerKV, err := nodeinfo.NewKubeVirtClient(handlerCfg)
	if err != nil {
		return nil, err
	}
	s := &Sim{
		log:        opts.Log.WithField("component", "sim"),
		opts:       opts,
		kube:       kube,
		kv:         kv,
		handlerKV:  handlerKV,
		ctx:        ctx,
		simNodes:   map[string]*simNode{},
		runtimes:   map[types.UID]*podRuntime{},
		domains:    map[types.UID]*domain{},
		migrations: map[types.UID]*migrationRun{},
		attempts:   map[types.UID]int{},
		warned:     map[types.UID]bool{},
		podsByNode: map[string]map[types.UID]string{},
		vmiLocks:   map[string]*sync.Mutex{},
	}

	factory := informers.NewSharedInformerFactory(kube, 0)
	s.pods = factory.Core().V1().Pods().Informer()
	s.vmis = cache.NewSharedIndexInformer(
		cache.NewFilteredListWatchFromClient(kv, nodeinfo.ResourceVMIs, metav1.NamespaceAll, func(*metav1.ListOptions) {}),
		&kubevirtv1.VirtualMachineInstance{}, 0,
		cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})

	if _, err := s.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.podChanged,
		UpdateFunc: func(_, obj any) { s.podChanged(obj) },
		DeleteFunc: s.podDeleted,
	}); err != nil {
		return nil, fmt.Errorf("watching pods: %w", err)
	}
	if _, err := s.vmis.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    s.enqueueVMI,
		UpdateFunc: func(_, obj any) { s.enqueueVMI(obj) },
		DeleteFunc: s.vmiDeleted,
	}); err != nil {
		return nil, fmt.Errorf("watching VMIs: %w", err)
	}

	factory.Start(ctx.Done())
	go s.vmis.RunWithContext(ctx)
	if !cache.WaitForNamedCacheSync("sim", ctx.Done(), s.pods.HasSynced, s.vmis.HasSynced) {
		factory.Shutdown()
		return nil, fmt.Errorf("syncing the simulators' informers: %w", context.Cause(ctx))
	}

	go func() {
		<-ctx.Done()
		factory.Shutdown()
	}()
	s.log.Info("simulated kubelet and virt-handler started")
	return s, nil
}

// The workers of one node's kubelet and virt-handler.
const (
	// kubeletWorkers: the real kubelet syncs each pod in a goroutine of its own and
	// writes their statuses one at a time; the simulated one does both in a sync.
	kubeletWorkers = 4
	// handlerWorkers: virt-handler's VMI controller runs 10 workers
	// (cmd/virt-handler: vmController.Run(10, stop)).
	handlerWorkers = 10
)

func newQueue(name string) workqueue.TypedRateLimitingInterface[string] {
	return workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](20*time.Millisecond, 5*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: name})
}

// startQueues starts the work queues and workers of a new simulated node's kubelet
// and virt-handler; they run until RemoveNode stops them or ctx ends.
func (s *Sim) startQueues(ctx context.Context, sn *simNode) {
	name := sn.name
	sn.kubeletQ = newQueue("sim-kubelet-" + name)
	sn.handlerQ = newQueue("sim-virt-handler-" + name)
	s.runWorkers(ctx, sn.kubeletQ, kubeletWorkers, func(ctx context.Context, key string) error { return s.syncPod(ctx, name, key) })
	s.runWorkers(ctx, sn.handlerQ, handlerWorkers, func(ctx context.Context, key string) error { return s.syncVMI(ctx, name, key) })
	go func() {
		<-ctx.Done()
		sn.stopQueues()
	}()
}

// stopQueues shuts the node's queues down (again: a no-op); their workers end.
func (sn *simNode) stopQueues() {
	sn.kubeletQ.ShutDown()
	sn.handlerQ.ShutDown()
}

// runWorkers processes queue keys with sync until the queue shuts down. A sync
// error requeues the key with backoff.
func (s *Sim) runWorkers(ctx context.Context, q workqueue.TypedRateLimitingInterface[string], n int,
	sync func(context.Context, string) error) {
	for range n {
		go wait.UntilWithContext(ctx, func(ctx context.Context) {
			for {
				key, quit := q.Get()
				if quit {
					return
				}
				err := sync(ctx, key)
				switch {
				case err == nil:
					q.Forget(key)
				case ctx.Err() != nil:
					q.Forget(key)
				default:
					if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
						s.log.WithField("key", key).Debugf("retrying: %v", err)
					} else {
						s.log.WithField("key", key).Warnf("retrying: %v", err)
					}
					q.AddRateLimited(key)
				}
				q.Done(key)
			}
		}, time.Second)
	}
}
