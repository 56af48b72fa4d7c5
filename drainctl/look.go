package drainctl

import (
	"context"
	"fmt"
	"io"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// NodeView is what the workstation commands show of a node.
type NodeView struct {
	Node     string           `json:"node"`
	TaintKey string           `json:"taintKey"`
	Draining bool             `json:"draining"`
	Cordoned bool             `json:"cordoned"`
	VMs      []agent.VMStatus `json:"vms"`
	// Predicted, per namespace/name, is how each VM ends up after a drain.
	Predicted map[string]string `json:"predicted,omitempty"`
	// PodsLeft counts the other evictable pods, when they are followed (all pods);
	// -1 when they cannot be listed.
	PodsLeft int `json:"podsLeft,omitempty"`
	// Agent is the agent's state at a glance (its node annotation).
	Agent string `json:"agentState,omitempty"`
}

// Safe says whether the node is safe to power off, as the agent's /safe-to-shutdown.
func (v NodeView) Safe() bool { return agent.SafeToPowerOff(v.VMs, v.PodsLeft) }

// newView says, from the node and what runs on it, whether it is being drained and
// what is happening to each VM, by the agent's own rules.
func newView(node *corev1.Node, cfg nodeinfo.Config, vmis []*kubevirtv1.VirtualMachineInstance, pods []*corev1.Pod) NodeView {
	v := NodeView{
		Node:     node.Name,
		TaintKey: cfg.DrainTaintKey,
		Draining: agent.TaintTriggersDrain(node, cfg.DrainTaintKey) || agent.ShutdownPendingOnNode(node),
		Cordoned: node.Spec.Unschedulable,
		Agent:    node.Annotations[agent.AnnotationState],
	}
	v.VMs = agent.Snapshot(node.Name, v.Draining, cfg, vmis, pods)
	return v
}

// Look reads the node and what is on it, with the migration of each migrating VM
// and, when predict is set, each VM's predicted end.
func (c *Client) Look(ctx context.Context, node string, cfg nodeinfo.Config, predict bool) (NodeView, error) {
	n, err := c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return NodeView{}, fmt.Errorf("reading node %s: %w", node, err)
	}
	vmis, pods, err := c.onNode(ctx, node)
	if err != nil {
		return NodeView{}, err
	}
	return c.complete(ctx, c.migrationTracker(), newView(n, cfg, vmis, pods), cfg, vmis, predict), nil
}

// migrationTracker follows the migrations of migrating VMs as the agent does: one
// tracker for the looks of one command, so that a VM's migrations are listed when its
// VMI shows a change, not on every look.
func (c *Client) migrationTracker() *agent.MigrationTracker {
	list := func(ctx context.Context, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
		return nodeinfo.MigrationsOf(ctx, c.KubeVirt, namespace, vmis)
	}
	targets := func(ctx context.Context, namespace string, migration types.UID) ([]corev1.Pod, error) {
		return nodeinfo.MigrationTargetPodsOf(ctx, c.Kube, namespace, migration)
	}
	// A list that fails is tried again at the next change; the command shows the VM as
	// its VMI tells it meanwhile, and says nothing of it.
	log := logrus.New()
	log.SetOutput(io.Discard)
	return agent.NewMigrationTracker(list, targets, clock.RealClock{}, c.opts.MigrationStallTimeout, log)
}

// complete adds what takes more reading: the migrations of migrating VMs (through
// migrations), and the predicted ends (each VM's owner).
func (c *Client) complete(ctx context.Context, migrations *agent.MigrationTracker, v NodeView, cfg nodeinfo.Config, vmis []*kubevirtv1.VirtualMachineInstance, predict bool) NodeView {
	byKey := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, vmi := range vmis {
		byKey[vmi.Namespace+"/"+vmi.Name] = vmi
	}
	migrations.Complete(ctx, v.VMs, byKey)
	if predict {
		v.Predicted = map[string]string{}
		for _, vm := range v.VMs {
			key := vm.Namespace + "/" + vm.Name
			if vmi := byKey[key]; vmi != nil {
				v.Predicted[key] = agent.PredictEnd(agent.Decide(vmi, cfg.ClusterEvictionStrategy), c.owner(ctx, vmi))
			}
		}
	}
	return v
}

// owner reads what owns the VMI; a VirtualMachine it cannot read has no run strategy.
func (c *Client) owner(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) agent.Owner {
	kind, name := agent.OwnerOf(vmi)
	o := agent.Owner{Kind: kind}
	if kind == "VirtualMachine" {
		vm := &kubevirtv1.VirtualMachine{}
		if err := c.KubeVirt.Get().Namespace(vmi.Namespace).Resource(nodeinfo.ResourceVMs).Name(name).Do(ctx).Into(vm); err == nil {
			if rs, err := vm.RunStrategy(); err == nil {
				o.RunStrategy = rs
			}
		}
	}
	return o
}

// onNode lists the node's VMIs and virt-launcher pods, scoped as the agent's informers are.
func (c *Client) onNode(ctx context.Context, node string) ([]*kubevirtv1.VirtualMachineInstance, []*corev1.Pod, error) {
	vmiList := &kubevirtv1.VirtualMachineInstanceList{}
	err := c.KubeVirt.Get().Resource(nodeinfo.ResourceVMIs).
		Param("labelSelector", labels.SelectorFromSet(labels.Set{nodeinfo.NodeNameLabel: node}).String()).
		Do(ctx).Into(vmiList)
	if err != nil {
		return nil, nil, fmt.Errorf("listing the VMIs of node %s: %w", node, err)
	}
	podList, err := c.Kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
		LabelSelector: nodeinfo.LauncherLabelSelector,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("listing the virt-launcher pods of node %s: %w", node, err)
	}
	vmis := make([]*kubevirtv1.VirtualMachineInstance, len(vmiList.Items))
	for i := range vmiList.Items {
		vmis[i] = &vmiList.Items[i]
	}
	pods := make([]*corev1.Pod, len(podList.Items))
	for i := range podList.Items {
		pods[i] = &podList.Items[i]
	}
	return vmis, pods, nil
}
