package sim

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/util/retry"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Node lifecycle: a simulated node's registration, its kubelet's heartbeat (the
// Lease and the node status), reboots, and stopping and starting its kubelet.

// simNode is the simulator's memory of a node it runs.
type simNode struct {
	name       string
	index      int
	bootID     string
	internalIP string
	usedIPs    map[string]bool
	nextHost   int
	resources  corev1.ResourceList // capacity and allocatable

	// The kubelet's heartbeat: running once started; stopped by StopKubelet,
	// ended by RemoveNode (endHeartbeat).
	heartbeat    bool
	endHeartbeat context.CancelFunc
	stopped      bool
	lastStatus   time.Time
	// handlerStopped: the node's virt-handler does not run (StopVirtHandler).
	handlerStopped bool
	// The work queues of the node's kubelet (pod keys) and virt-handler (VMI keys).
	kubeletQ workqueue.TypedRateLimitingInterface[string]
	handlerQ workqueue.TypedRateLimitingInterface[string]
	lease    *coordinationv1.Lease // last written, renewed by the heartbeat only
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
		s.startQueues(s.ctx, sn)
		s.simNodes[name] = sn
	}
	sn.resources = cfg.allocatable
	index := sn.index
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

	if err := s.postStatus(ctx, sn, false); err != nil {
		return nil, err
	}
	s.startHeartbeat(sn, node.UID)
	// The API server's TaintNodesByCondition admission taints a new node not-ready;
	// the node lifecycle controller lifts the taint once the node reports Ready.
	var lifted *corev1.Node
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, s.opts.WaitTimeout, true, func(ctx context.Context) (bool, error) {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		lifted = n
		return !hasTaint(n, corev1.TaintNodeNotReady) && !hasTaint(n, corev1.TaintNodeUnreachable), nil
	})
	if err != nil {
		return nil, fmt.Errorf("waiting for the node lifecycle controller to lift the not-ready taint of node %s: %w", name, err)
	}
	s.log.WithField("node", name).Info("node added")
	return lifted, nil
}

func hasTaint(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
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

	if err := s.postStatus(ctx, sn, true); err != nil {
		return fmt.Errorf("writing the new boot ID of node %s: %w", node, err)
	}
	sort.Strings(podKeys)
	for _, k := range podKeys {
		s.toKubelet(node, k, 0)
	}
	for _, k := range vmiKeys {
		s.toHandlerKey(k, 0)
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

// conflictBackoff paces the retries of a Node status write that lost a race with
// another writer (the node-lifecycle controller, the agent, the tests), as client-go's
// retry.RetryOnConflict does, with more steps: the Node is busy.
func conflictBackoff() wait.Backoff {
	return wait.Backoff{Steps: 10, Duration: 10 * time.Millisecond, Factor: 2, Jitter: 0.1, Cap: time.Second}
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

// nodeLeaseDurationSeconds is the Lease's duration a kubelet writes (its default).
const nodeLeaseDurationSeconds = 40

// postStatus writes the node's status as its kubelet does: capacity, allocatable,
// addresses, node info and the conditions with a fresh heartbeat; a condition
// keeps its transition time while its status stays, unless rebooted.
func (s *Sim) postStatus(ctx context.Context, sn *simNode, rebooted bool) error {
	s.mu.Lock()
	name, ip, bootID, res := sn.name, sn.internalIP, sn.bootID, sn.resources.DeepCopy()
	s.mu.Unlock()
	nodes := s.kube.CoreV1().Nodes()
	err := retry.RetryOnConflict(conflictBackoff(), func() error {
		node, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		now := metav1.Now().Rfc3339Copy()
		conds := nodeConditions(now)
		for i := range conds {
			for _, old := range node.Status.Conditions {
				if old.Type == conds[i].Type && old.Status == conds[i].Status && !rebooted {
					conds[i].LastTransitionTime = old.LastTransitionTime
				}
			}
		}
		info := nodeInfo(name, bootID)
		if old := node.Status.NodeInfo; old.SystemUUID != "" {
			info.SystemUUID = old.SystemUUID
		}
		node.Status = corev1.NodeStatus{
			Capacity:    res.DeepCopy(),
			Allocatable: res,
			Phase:       corev1.NodeRunning,
			Conditions:  conds,
			Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: ip},
				{Type: corev1.NodeHostName, Address: name},
			},
			DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
			NodeInfo:        info,
			Images:          node.Status.Images,
			VolumesInUse:    node.Status.VolumesInUse,
			VolumesAttached: node.Status.VolumesAttached,
		}
		_, err = nodes.UpdateStatus(ctx, node, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("writing the status of node %s: %w", name, err)
	}
	s.mu.Lock()
	sn.lastStatus = time.Now()
	s.mu.Unlock()
	return nil
}

// startHeartbeat starts the node's kubelet heartbeat unless it runs: the Lease
// renewed every LeaseRenewInterval, the status posted every NodeStatusInterval,
// until the simulator stops.
func (s *Sim) startHeartbeat(sn *simNode, nodeUID types.UID) {
	s.mu.Lock()
	running := sn.heartbeat
	sn.heartbeat = true
	s.mu.Unlock()
	if running {
		return
	}
	log := s.log.WithField("node", sn.name)
	ctx, cancel := context.WithCancel(s.ctx)
	s.mu.Lock()
	sn.endHeartbeat = cancel
	s.mu.Unlock()
	go wait.UntilWithContext(ctx, func(ctx context.Context) {
		s.mu.Lock()
		stopped, due := sn.stopped, time.Since(sn.lastStatus) >= s.opts.NodeStatusInterval
		s.mu.Unlock()
		if stopped {
			return
		}
		if err := s.renewLease(ctx, sn, nodeUID); err != nil && ctx.Err() == nil {
			log.Warnf("kubelet: renewing the node lease: %v", err)
		}
		if due {
			if err := s.postStatus(ctx, sn, false); err != nil && ctx.Err() == nil {
				log.Warnf("kubelet: %v", err)
			}
		}
	}, s.opts.LeaseRenewInterval)
}

// renewLease creates or renews the node's Lease in kube-node-lease, owned by the
// Node as a kubelet makes it.
func (s *Sim) renewLease(ctx context.Context, sn *simNode, nodeUID types.UID) error {
	leases := s.kube.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	if sn.lease != nil {
		l := sn.lease.DeepCopy()
		l.Spec.RenewTime = &now
		updated, err := leases.Update(ctx, l, metav1.UpdateOptions{})
		if err == nil {
			sn.lease = updated
			return nil
		}
		if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return err
		}
		sn.lease = nil // read it again
	}
	l, err := leases.Get(ctx, sn.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		l = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: sn.name, Namespace: corev1.NamespaceNodeLease,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: sn.name, UID: nodeUID}}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(sn.name),
				LeaseDurationSeconds: ptr.To[int32](nodeLeaseDurationSeconds), RenewTime: &now},
		}
		l, err = leases.Create(ctx, l, metav1.CreateOptions{})
	case err == nil:
		l.Spec.RenewTime = &now
		l, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("writing lease %s: %w", sn.name, err)
	}
	sn.lease = l
	return nil
}

// ErrNodeBusy: RemoveNode found pods or VMs still on the node.
var ErrNodeBusy = errors.New("pods or VMs still on the node")

// RemoveNode takes node out of the cluster as an operator decommissions an empty
// host: its kubelet stops for good and the Node is deleted (the garbage collector
// then deletes the node's Lease, which the Node owns). It fails with ErrNodeBusy
// while a pod or a VM domain is still there, and leaves the node as it was.
func (s *Sim) RemoveNode(ctx context.Context, node string) error {
	s.mu.Lock()
	sn := s.simNodes[node]
	if sn == nil {
		s.mu.Unlock()
		return fmt.Errorf("node %s is not simulated", node)
	}
	busy := len(s.podsByNode[node]) > 0
	for _, d := range s.domains {
		busy = busy || d.node == node
	}
	if busy {
		s.mu.Unlock()
		return fmt.Errorf("removing node %s: %w", node, ErrNodeBusy)
	}
	sn.stopped = true
	if sn.endHeartbeat != nil {
		sn.endHeartbeat()
	}
	sn.stopQueues()
	delete(s.simNodes, node)
	delete(s.podsByNode, node)
	s.mu.Unlock()
	if err := s.kube.CoreV1().Nodes().Delete(ctx, node, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting node %s: %w", node, err)
	}
	s.log.WithField("node", node).Info("node removed")
	return nil
}

// StopKubelet stops the kubelet of node, as if it crashed or the node lost its
// network: it renews no Lease, posts no status and leaves its pods as they are.
// The node lifecycle controller then marks the node's conditions Unknown and
// taints it node.kubernetes.io/unreachable (NoSchedule and NoExecute) once its
// node-monitor-grace-period passed.
func (s *Sim) StopKubelet(node string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn := s.simNodes[node]
	if sn == nil {
		return fmt.Errorf("node %s is not simulated", node)
	}
	sn.stopped = true
	s.log.WithField("node", node).Info("kubelet stopped")
	return nil
}

// StartKubelet starts a stopped kubelet of node again: it posts its status (Ready)
// at once, renews its Lease and runs its pods again.
func (s *Sim) StartKubelet(ctx context.Context, node string) error {
	s.mu.Lock()
	sn := s.simNodes[node]
	if sn == nil {
		s.mu.Unlock()
		return fmt.Errorf("node %s is not simulated", node)
	}
	sn.stopped = false
	var podKeys []string
	for _, key := range s.podsByNode[node] {
		podKeys = append(podKeys, key)
	}
	s.mu.Unlock()
	if err := s.postStatus(ctx, sn, false); err != nil {
		return err
	}
	for _, k := range podKeys {
		s.toKubelet(node, k, 0)
	}
	s.log.WithField("node", node).Info("kubelet started")
	return nil
}

// StopVirtHandler stops the virt-handler of node, as if it crashed or hung, while the
// node and its kubelet stay up: a migration whose target is node is not prepared (its
// target pod runs, and KubeVirt's migration controller waits in PreparingTarget for
// the target's virt-handler, with no timeout).
func (s *Sim) StopVirtHandler(node string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn := s.simNodes[node]
	if sn == nil {
		return fmt.Errorf("node %s is not simulated", node)
	}
	sn.handlerStopped = true
	s.log.WithField("node", node).Info("virt-handler stopped")
	return nil
}

// StartVirtHandler starts a stopped virt-handler of node again; it looks at every VMI,
// as a starting virt-handler does.
func (s *Sim) StartVirtHandler(node string) error {
	s.mu.Lock()
	sn := s.simNodes[node]
	if sn == nil {
		s.mu.Unlock()
		return fmt.Errorf("node %s is not simulated", node)
	}
	sn.handlerStopped = false
	s.mu.Unlock()
	for _, obj := range s.vmis.GetStore().List() {
		s.enqueueVMI(obj)
	}
	s.log.WithField("node", node).Info("virt-handler started")
	return nil
}

// handlerRuns reports whether node is simulated and its virt-handler not stopped.
func (s *Sim) handlerRuns(node string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn := s.simNodes[node]
	return sn != nil && !sn.handlerStopped
}

// kubeletRuns reports whether node is simulated and its kubelet not stopped.
func (s *Sim) kubeletRuns(node string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn := s.simNodes[node]
	return sn != nil && !sn.stopped
}
