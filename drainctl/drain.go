package drainctl

import (
	"context"
	"errors"

	corev1 "k8s.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// DrainTaintValue is the value of the drain taint a workstation sets (the agents
// ignore the value).
const DrainTaintValue = "draining"

// setDrain puts the drain on the node object: the drain taint key:NoSchedule (in
// place of any other taint with that key) and the cordon. It says whether it changed
// anything.
func setDrain(node *corev1.Node, key string) bool {
	want := corev1.Taint{Key: key, Value: DrainTaintValue, Effect: corev1.TaintEffectNoSchedule}
	taints := []corev1.Taint{}
	has := false
	for _, t := range node.Spec.Taints {
		switch {
		case t.Key != key:
			taints = append(taints, t)
		case !has && t.Effect == want.Effect && t.Value == want.Value:
			taints, has = append(taints, t), true
		}
	}
	changed := len(taints) != len(node.Spec.Taints) || !has || !node.Spec.Unschedulable
	if !has {
		taints = append(taints, want)
	}
	node.Spec.Taints = taints
	node.Spec.Unschedulable = true
	return changed
}

// removeDrain takes every taint with the drain key and the cordon off the node
// object. It says whether it changed anything.
func removeDrain(node *corev1.Node, key string) bool {
	var taints []corev1.Taint
	for _, t := range node.Spec.Taints {
		if t.Key != key {
			taints = append(taints, t)
		}
	}
	changed := len(taints) != len(node.Spec.Taints) || node.Spec.Unschedulable
	node.Spec.Taints = taints
	node.Spec.Unschedulable = false
	return changed
}

// SetDrain taints the node with the drain taint (key:NoSchedule) and cordons it. The
// agent on the node sees the taint and drains.
func (c *Client) SetDrain(ctx context.Context, node, key string) error {
	if key == "" {
		return errors.New("no drain taint key")
	}
	return nodeinfo.UpdateNode(ctx, c.Kube, node, func(n *corev1.Node) (bool, error) {
		return setDrain(n, key), nil
	})
}

// RemoveDrain removes the drain taint and the cordon from the node.
func (c *Client) RemoveDrain(ctx context.Context, node, key string) error {
	if key == "" {
		return errors.New("no drain taint key")
	}
	return nodeinfo.UpdateNode(ctx, c.Kube, node, func(n *corev1.Node) (bool, error) {
		return removeDrain(n, key), nil
	})
}

// Cancelled is one VMI whose pending evacuation from the node was cancelled, or
// could not be (Err).
type Cancelled struct {
	Namespace, Name string
	Err             error
}

// CancelEvacuations cancels the evacuations still pending from the node (the VMIs on
// it whose status.evacuationNodeName is the node), through the agent's own request.
func (c *Client) CancelEvacuations(ctx context.Context, node string) ([]Cancelled, error) {
	vmis, _, err := c.onNode(ctx, node)
	if err != nil {
		return nil, err
	}
	var out []Cancelled
	for _, vmi := range vmis {
		if vmi.Status.EvacuationNodeName != node {
			continue
		}
		err := agent.CancelEvacuation(ctx, c.Subresources, vmi.Namespace, vmi.Name, node)
		out = append(out, Cancelled{Namespace: vmi.Namespace, Name: vmi.Name, Err: err})
	}
	return out, nil
}
