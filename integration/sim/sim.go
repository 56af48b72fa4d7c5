// Package sim simulates, against a real kube-apiserver and KubeVirt's real
// virt-controller and virt-api, the node-side programs that cannot run in a
// test: the scheduler, the kubelet and virt-handler.
//
// Each is an informer-driven controller with a work queue that reads and writes
// the fields its real counterpart reads and writes (KubeVirt v1.8.0):
//
//   - scheduler: binds pending pods of the default scheduler (pods/binding) to a
//     simulated node that fits them (cordon, taints, nodeSelector, required node
//     affinity, required pod (anti-)affinity, resources); otherwise it sets
//     PodScheduled=False/Unschedulable and retries when nodes or pods change.
//   - kubelet: runs the pods bound to simulated nodes (phase Running, containers
//     running and ready, readiness gates honoured, a pod IP), reports exited
//     containers (phase Succeeded/Failed) and deletes terminated pods with grace
//     0. On deletion a virt-launcher pod whose guest runs exits when the guest
//     is off (or is killed at the end of its grace period); other pods' processes
//     exit on SIGTERM at once. It also lifts the not-ready taint of new nodes, as
//     the node lifecycle controller would.
//   - virt-handler: starts the guest of a Scheduled VMI (phase Running,
//     LiveMigratable, selinuxContext "none"), drives live migrations through
//     status.migrationState, and shuts the guest down when its virt-launcher pod
//     or the VMI is deleted.
//
// Only nodes added with AddNode are simulated. Run one Sim per cluster.
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
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/uuid"
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
	// SchedulerName is the spec.schedulerName the scheduler serves (pods with an
	// empty schedulerName are served too). Default: "default-scheduler".
	SchedulerName string
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
	// cluster admin's does) and a cluster admin's permissions. KubeVirt's VMI
	// webhooks let only its own service accounts change a VMI's status and its
	// reserved kubevirt.io/ labels. Default: KubeVirt's virt-handler service
	// account in the kubevirt namespace.
	VirtHandlerUser string
}

// DefaultVirtHandlerUser is virt-handler's service account in a KubeVirt
// installed in the kubevirt namespace.
const DefaultVirtHandlerUser = "system:serviceaccount:kubevirt:kubevirt-handler"

// Sim runs the simulated scheduler, kubelets and virt-handlers.
type Sim struct {
	log  logrus.FieldLogger
	opts Options
	kube kubernetes.Interface
	kv   rest.Interface
	// handlerKV is kv as virt-handler (Options.VirtHandlerUser).
	handlerKV rest.Interface

	pods       cache.SharedIndexInformer
	nodes      cache.SharedIndexInformer
	namespaces cache.SharedIndexInformer
	vmis       cache.SharedIndexInformer

	schedQ   workqueue.TypedRateLimitingInterface[string]
	kubeletQ workqueue.TypedRateLimitingInterface[string]
	handlerQ workqueue.TypedRateLimitingInterface[string]

	mu         sync.Mutex
	simNodes   map[string]*simNode             // by node name
	nodeIndex  int                             // last index handed out
	runtimes   map[types.UID]*podRuntime       // by pod UID
	domains    map[types.UID]*domain           // by VMI UID
	migrations map[types.UID]*migrationRun     // by migration UID
	attempts   map[types.UID]int               // migrations started, by VMI UID
	assumed    map[types.UID]string            // pod UID -> node, bound but not yet seen bound
	warned     map[types.UID]bool              // VMIs already warned about
	podsByNode map[string]map[types.UID]string // node -> pod UID -> key, for Reboot
}

// simNode is the simulator's memory of a node it runs.
type simNode struct {
	name       string
	index      int
	bootID     string
	internalIP string
	usedIPs    map[string]bool
	nextHost   int
}

// Start starts the simulators. They run until ctx ends; the informers are synced
// when Start returns.
func Start(ctx context.Context, cfg *rest.Config, opts Options) (*Sim, error) {
	if opts.Log == nil {
		l := logrus.New()
		l.SetLevel(logrus.InfoLevel)
		opts.Log = l
	}
	if opts.SchedulerName == "" {
		opts.SchedulerName = corev1.DefaultSchedulerName
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
		Groups:   []string{"system:masters", "system:authenticated"},
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
		schedQ:     newQueue("sim-scheduler"),
		kubeletQ:   newQueue("sim-kubelet"),
		handlerQ:   newQueue("sim-virt-handler"),
		simNodes:   map[string]*simNode{},
		runtimes:   map[types.UID]*podRuntime{},
		domains:    map[types.UID]*domain{},
		migrations: map[types.UID]*migrationRun{},
		attempts:   map[types.UID]int{},
		assumed:    map[types.UID]string{},
		warned:     map[types.UID]bool{},
		podsByNode: map[string]map[types.UID]string{},
	}

	factory := informers.NewSharedInformerFactory(kube, 0)
	s.pods = factory.Core().V1().Pods().Informer()
	s.nodes = factory.Core().V1().Nodes().Informer()
	s.namespaces = factory.Core().V1().Namespaces().Informer()
	s.vmis = cache.NewSharedIndexInformer(
		cache.NewFilteredListWatchFromClient(kv, nodeinfo.ResourceVMIs, metav1.NamespaceAll, func(*metav1.ListOptions) {}),
		&kubevirtv1.VirtualMachineInstance{}, 0,
		cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})

	if _, err := s.pods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.podChanged(nil, obj) },
		UpdateFunc: func(old, obj any) { s.podChanged(old, obj) },
		DeleteFunc: s.podDeleted,
	}); err != nil {
		return nil, fmt.Errorf("watching pods: %w", err)
	}
	if _, err := s.nodes.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { s.enqueuePendingPods() },
		UpdateFunc: func(any, any) { s.enqueuePendingPods() },
		DeleteFunc: func(any) { s.enqueuePendingPods() },
	}); err != nil {
		return nil, fmt.Errorf("watching nodes: %w", err)
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
	if !cache.WaitForNamedCacheSync("sim", ctx.Done(), s.pods.HasSynced, s.nodes.HasSynced, s.namespaces.HasSynced, s.vmis.HasSynced) {
		factory.Shutdown()
		return nil, fmt.Errorf("syncing the simulators' informers: %w", context.Cause(ctx))
	}

	s.runWorkers(ctx, s.schedQ, 1, s.schedule)
	s.runWorkers(ctx, s.kubeletQ, 2, s.syncPod)
	s.runWorkers(ctx, s.handlerQ, 2, s.syncVMI)
	go func() {
		<-ctx.Done()
		s.schedQ.ShutDown()
		s.kubeletQ.ShutDown()
		s.handlerQ.ShutDown()
		factory.Shutdown()
	}()
	s.log.Info("simulated scheduler, kubelet and virt-handler started")
	return s, nil
}

func newQueue(name string) workqueue.TypedRateLimitingInterface[string] {
	return workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](20*time.Millisecond, 5*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: name})
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

// NodeOption configures a node made by AddNode.
type NodeOption func(*nodeConfig)

type nodeConfig struct {
	labels        map[string]string
	taints        []corev1.Taint
	unschedulable bool
	allocatable   corev1.ResourceList
}

// WithNodeLabels adds labels to the node (e.g. a pool label that tests select with
// their VMs' nodeSelector).
func WithNodeLabels(labels map[string]string) NodeOption {
	return func(c *nodeConfig) {
		for k, v := range labels {
			c.labels[k] = v
		}
	}
}

// WithTaints adds taints to the node.
func WithTaints(taints ...corev1.Taint) NodeOption {
	return func(c *nodeConfig) { c.taints = append(c.taints, taints...) }
}

// WithUnschedulable creates the node cordoned.
func WithUnschedulable() NodeOption {
	return func(c *nodeConfig) { c.unschedulable = true }
}

// WithAllocatable sets (adds or overrides) resources the node advertises as
// capacity and allocatable, e.g. a host device's resource name.
func WithAllocatable(resources corev1.ResourceList) NodeOption {
	return func(c *nodeConfig) {
		for k, v := range resources {
			c.allocatable[k] = v
		}
	}
}

// NodeCPUModel is the CPU model simulated nodes report through the labels of
// virt-handler's node labeller.
const NodeCPUModel = "Skylake-Client-IBRS"

// AddNode creates (or takes over) the node name and simulates its kubelet and
// virt-handler. The node is Ready, labelled like a KubeVirt node
// (kubernetes.io/hostname, kubevirt.io/schedulable=true, the node labeller's CPU
// labels) and advertises cpu, memory, pods and KubeVirt's device-plugin resources.
func (s *Sim) AddNode(ctx context.Context, name string, opts ...NodeOption) (*corev1.Node, error) {
	cfg := &nodeConfig{
		labels: map[string]string{
			corev1.LabelHostname:                                      name,
			corev1.LabelOSStable:                                      "linux",
			corev1.LabelArchStable:                                    "amd64",
			kubevirtv1.NodeSchedulable:                                "true",
			kubevirtv1.CPUModelVendorLabel + "Intel":                  "true",
			kubevirtv1.HostModelCPULabel + NodeCPUModel:               "true",
			kubevirtv1.SupportedHostModelMigrationCPU + NodeCPUModel:  "true",
			kubevirtv1.CPUModelLabel + NodeCPUModel:                   "true",
			kubevirtv1.SupportedMachineTypeLabel + "q35":              "true",
			kubevirtv1.SupportedMachineTypeLabel + "pc-q35-rhel9.6.0": "true",
		},
		allocatable: corev1.ResourceList{
			corev1.ResourceCPU:              resource.MustParse("32"),
			corev1.ResourceMemory:           resource.MustParse("128Gi"),
			corev1.ResourcePods:             resource.MustParse("110"),
			corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
			ResourceKVM:                     resource.MustParse("1k"),
			ResourceTun:                     resource.MustParse("1k"),
			ResourceVhostNet:                resource.MustParse("1k"),
			ResourceVhostVsock:              resource.MustParse("1k"),
		},
	}
	for _, o := range opts {
		o(cfg)
	}

	s.mu.Lock()
	sn := s.simNodes[name]
	if sn == nil {
		if s.nodeIndex >= 250 {
			s.mu.Unlock()
			return nil, errors.New("the simulator runs at most 250 nodes")
		}
		s.nodeIndex++
		sn = &simNode{
			name:       name,
			index:      s.nodeIndex,
			bootID:     string(uuid.NewUUID()),
			internalIP: fmt.Sprintf("172.18.0.%d", s.nodeIndex+1),
			usedIPs:    map[string]bool{},
		}
		s.simNodes[name] = sn
	}
	index, internalIP, bootID := sn.index, sn.internalIP, sn.bootID
	s.mu.Unlock()

	nodes := s.kube.CoreV1().Nodes()
	node, err := nodes.Get(ctx, name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		node = &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: cfg.labels},
			Spec: corev1.NodeSpec{
				PodCIDR:       fmt.Sprintf("10.244.%d.0/24", index),
				PodCIDRs:      []string{fmt.Sprintf("10.244.%d.0/24", index)},
				Taints:        cfg.taints,
				Unschedulable: cfg.unschedulable,
			},
		}
		if node, err = nodes.Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("creating node %s: %w", name, err)
		}
	case err != nil:
		return nil, fmt.Errorf("reading node %s: %w", name, err)
	default:
		if node.Labels == nil {
			node.Labels = map[string]string{}
		}
		for k, v := range cfg.labels {
			node.Labels[k] = v
		}
		node.Spec.Taints = cfg.taints
		node.Spec.Unschedulable = cfg.unschedulable
		if node, err = nodes.Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			return nil, fmt.Errorf("updating node %s: %w", name, err)
		}
	}

	now := metav1.Now().Rfc3339Copy()
	node.Status = corev1.NodeStatus{
		Capacity:    cfg.allocatable.DeepCopy(),
		Allocatable: cfg.allocatable.DeepCopy(),
		Phase:       corev1.NodeRunning,
		Conditions:  nodeConditions(now),
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: internalIP},
			{Type: corev1.NodeHostName, Address: name},
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
		NodeInfo:        nodeInfo(name, bootID),
	}
	node, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("writing the status of node %s: %w", name, err)
	}
	// The API server's TaintNodesByCondition admission taints new nodes
	// not-ready; the node lifecycle controller (kube-controller-manager, not
	// running here) lifts the taint once the node reports Ready.
	err = retryOnConflict(ctx, func() error {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var kept []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key != corev1.TaintNodeNotReady && t.Key != corev1.TaintNodeUnreachable {
				kept = append(kept, t)
			}
		}
		if len(kept) == len(n.Spec.Taints) {
			node = n
			return nil
		}
		n.Spec.Taints = kept
		node, err = nodes.Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lifting the not-ready taint of node %s: %w", name, err)
	}
	s.log.WithField("node", name).Info("node added")
	return node, nil
}

func nodeConditions(now metav1.Time) []corev1.NodeCondition {
	cond := func(t corev1.NodeConditionType, st corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: st, Reason: reason, Message: msg,
			LastHeartbeatTime: now, LastTransitionTime: now}
	}
	return []corev1.NodeCondition{
		cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
		cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
		cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
		cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady", "kubelet is posting ready status"),
	}
}

func nodeInfo(name, bootID string) corev1.NodeSystemInfo {
	return corev1.NodeSystemInfo{
		MachineID:               fmt.Sprintf("%x", []byte(name+"-machine-id-000000000000"))[:32],
		SystemUUID:              string(uuid.NewUUID()),
		BootID:                  bootID,
		KernelVersion:           "6.12.0-sim",
		OSImage:                 "Simulated Linux",
		ContainerRuntimeVersion: "containerd://2.1.0",
		KubeletVersion:          "v1.37.2",
		OperatingSystem:         "linux",
		Architecture:            "amd64",
	}
}

// Reboot simulates a reboot of node: the node reports a new bootID and every
// container on it is gone. Pods that do not restart (virt-launcher pods have
// restartPolicy Never) end Failed, as the kubelet reports containers it cannot
// find after a reboot; their guests are gone, so virt-handler reports their
// VMIs Failed. Pods with restartPolicy Always/OnFailure restart.
func (s *Sim) Reboot(ctx context.Context, node string) error {
	s.mu.Lock()
	sn := s.simNodes[node]
	if sn == nil {
		s.mu.Unlock()
		return fmt.Errorf("node %s is not simulated", node)
	}
	sn.bootID = string(uuid.NewUUID())
	bootID := sn.bootID
	var podKeys []string
	for uid, key := range s.podsByNode[node] {
		if rt := s.runtimes[uid]; rt != nil && !rt.exited {
			rt.lost = true
		}
		podKeys = append(podKeys, key)
	}
	var vmiKeys []string
	for uid, d := range s.domains {
		if d.node == node {
			vmiKeys = append(vmiKeys, d.vmiKey)
			delete(s.domains, uid)
		}
	}
	s.mu.Unlock()

	err := retryOnConflict(ctx, func() error {
		n, err := s.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now().Rfc3339Copy()
		n.Status.NodeInfo.BootID = bootID
		for i := range n.Status.Conditions {
			n.Status.Conditions[i].LastHeartbeatTime = now
			if n.Status.Conditions[i].Type == corev1.NodeReady {
				n.Status.Conditions[i].LastTransitionTime = now
				n.Status.Conditions[i].Message = "kubelet is posting ready status"
			}
		}
		_, err = s.kube.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("writing the new boot ID of node %s: %w", node, err)
	}
	sort.Strings(podKeys)
	for _, k := range podKeys {
		s.kubeletQ.Add(k)
	}
	for _, k := range vmiKeys {
		s.handlerQ.Add(k)
	}
	// VMIs whose migration targets this node notice the lost target pod through
	// the pod events; VMIs on this node without a domain are handled here too.
	for _, obj := range s.vmis.GetStore().List() {
		vmi := obj.(*kubevirtv1.VirtualMachineInstance)
		if vmi.Status.NodeName == node || vmi.Labels[kubevirtv1.MigrationTargetNodeNameLabel] == node {
			s.enqueueVMI(vmi)
		}
	}
	s.log.WithField("node", node).Info("node rebooted")
	return nil
}

// retryOnConflict runs f until it does not fail with a conflict.
func retryOnConflict(ctx context.Context, f func() error) error {
	for {
		err := f()
		if !apierrors.IsConflict(err) {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// managed returns the simulated node name, or nil.
func (s *Sim) managed(name string) *simNode {
	if name == "" {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.simNodes[name]
}

func (s *Sim) nodeIP(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sn := s.simNodes[name]; sn != nil {
		return sn.internalIP
	}
	return ""
}

// podChanged routes a pod event to the scheduler, the kubelet and virt-handler.
func (s *Sim) podChanged(oldObj, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	key, err := cache.MetaNamespaceKeyFunc(pod)
	if err != nil {
		return
	}
	if pod.Spec.NodeName == "" {
		s.schedQ.Add(key)
	} else {
		s.mu.Lock()
		delete(s.assumed, pod.UID)
		if s.simNodes[pod.Spec.NodeName] != nil {
			m := s.podsByNode[pod.Spec.NodeName]
			if m == nil {
				m = map[types.UID]string{}
				s.podsByNode[pod.Spec.NodeName] = m
			}
			m[pod.UID] = key
			s.kubeletQ.Add(key)
		}
		s.mu.Unlock()
	}
	if old, ok := oldObj.(*corev1.Pod); ok && !podTerminal(old) && podTerminal(pod) {
		// Resources and anti-affinity were freed.
		s.enqueuePendingPods()
	}
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == kubevirtv1.VirtualMachineInstanceGroupVersionKind.Kind {
		s.handlerQ.Add(pod.Namespace + "/" + ref.Name)
	}
}

func (s *Sim) podDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	s.mu.Lock()
	delete(s.assumed, pod.UID)
	if rt := s.runtimes[pod.UID]; rt != nil {
		if sn := s.simNodes[rt.node]; sn != nil {
			delete(sn.usedIPs, rt.ip)
		}
		delete(s.runtimes, pod.UID)
	}
	if m := s.podsByNode[pod.Spec.NodeName]; m != nil {
		delete(m, pod.UID)
	}
	s.mu.Unlock()
	s.enqueuePendingPods()
	if ref := metav1.GetControllerOf(pod); ref != nil && ref.Kind == kubevirtv1.VirtualMachineInstanceGroupVersionKind.Kind {
		s.handlerQ.Add(pod.Namespace + "/" + ref.Name)
	}
}

func (s *Sim) enqueueVMI(obj any) {
	if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
		s.handlerQ.Add(key)
	}
}

func (s *Sim) vmiDeleted(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	vmi, ok := obj.(*kubevirtv1.VirtualMachineInstance)
	if !ok {
		return
	}
	s.mu.Lock()
	d := s.domains[vmi.UID]
	delete(s.domains, vmi.UID)
	delete(s.attempts, vmi.UID)
	delete(s.warned, vmi.UID)
	for uid, run := range s.migrations {
		if run.vmiUID == vmi.UID {
			delete(s.migrations, uid)
		}
	}
	s.mu.Unlock()
	if d != nil {
		// The VMI is gone while its guest ran: the launcher has nothing left to run.
		s.launcherExited(d.podUID, 0, "Completed")
	}
}

func podTerminal(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed
}
