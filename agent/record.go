package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
)

// The agent keeps its state on its Node, so that a restarted agent carries on.
const (
	// AnnotationPrefix starts every annotation the agent owns.
	AnnotationPrefix = "node-agent.kubevirt.io/"
	// AnnotationDrain holds the drain in progress (a DrainRecord, JSON).
	AnnotationDrain = AnnotationPrefix + "drain"
	// AnnotationOwned holds what the agent itself added to the Node (an Ownership, JSON).
	AnnotationOwned = AnnotationPrefix + "owned"
	// AnnotationShutdown holds the host shutdown the agent serves or gives the node back
	// from (a ShutdownRecord, JSON), so that a restarted agent carries on with it.
	AnnotationShutdown = AnnotationPrefix + "shutdown"
	// AnnotationState is the agent's state at a glance, for `kubectl get node -o yaml`.
	AnnotationState = AnnotationPrefix + "state"
)

// Triggers of a drain.
const (
	TriggerTaint    = "taint"
	TriggerShutdown = "shutdown"
)

// DrainRecord is the drain in progress. Requested is written before an eviction is
// sent, so that a restarted agent knows which evacuations are this drain's to cancel.
type DrainRecord struct {
	Trigger  string    `json:"trigger"`
	TaintKey string    `json:"taintKey,omitempty"`
	Started  time.Time `json:"started"`
	// Completed is set when the node was first seen empty.
	Completed *time.Time `json:"completed,omitempty"`
	// Requested maps namespace/name of each VMI acted on to the action requested.
	Requested map[string]Action `json:"requested,omitempty"`
}

// Ownership is what the agent added to its Node and must take away again itself.
type Ownership struct {
	// TaintKey is set when the agent added the drain taint.
	TaintKey string `json:"taintKey,omitempty"`
	// Cordoned is set when the agent set spec.unschedulable.
	Cordoned bool `json:"cordoned,omitempty"`
	// Waiting is set when the agent added its PreferNoSchedule TaintWaiting (the node
	// waited for its turn to drain for a host shutdown).
	Waiting bool `json:"waiting,omitempty"`
	// BootID is the node's boot ID when the agent took it out of service.
	BootID string `json:"bootID"`
	// Reason says why (for example "shutdown").
	Reason string    `json:"reason"`
	Since  time.Time `json:"since"`
}

// ShutdownRecord is a host shutdown of this node, recorded before the node is taken out
// of service, and marked cancelled before the node is given back. It is removed when
// the node is given back (the cancel, or the reboot: BootID differs).
type ShutdownRecord struct {
	// BootID is the node's boot ID when the shutdown started.
	BootID   string    `json:"bootID"`
	Started  time.Time `json:"started"`
	Deadline time.Time `json:"deadline,omitempty"`
	// Cancelled is set when the shutdown was cancelled: the node is to be given back.
	Cancelled *time.Time `json:"cancelled,omitempty"`
}

// readAnnotation decodes a JSON annotation into into (a pointer); absent is (false,
// nil). An annotation that does not decode leaves into as it was: json.Unmarshal fills
// the fields it could read before the error, and half a record (a deadline without its
// boot ID) must not be acted on as if it were one.
func readAnnotation(node *corev1.Node, key string, into any) (bool, error) {
	raw, ok := node.Annotations[key]
	if !ok || raw == "" {
		return false, nil
	}
	decoded := reflect.New(reflect.TypeOf(into).Elem())
	if err := json.Unmarshal([]byte(raw), decoded.Interface()); err != nil {
		return false, fmt.Errorf("annotation %s on node %s is not valid: %w", key, node.Name, err)
	}
	reflect.ValueOf(into).Elem().Set(decoded.Elem())
	return true, nil
}

// patchAnnotations sets (value non-nil) or removes (nil) annotations on the Node with
// one merge patch. Values that are not strings are JSON-encoded.
func patchAnnotations(ctx context.Context, kube kubernetes.Interface, node string, set map[string]any) error {
	annotations := map[string]any{}
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		switch v := set[k].(type) {
		case nil:
			annotations[k] = nil
		case string:
			annotations[k] = v
		default:
			raw, err := json.Marshal(v)
			if err != nil {
				return fmt.Errorf("encoding annotation %s: %w", k, err)
			}
			annotations[k] = string(raw)
		}
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": annotations}})
	if err != nil {
		return fmt.Errorf("encoding the node patch: %w", err)
	}
	if _, err := kube.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("patching the annotations of node %s: %w", node, err)
	}
	return nil
}

// HasDrainTaint says whether the node has the drain taint: a NoSchedule taint with
// this key (its value is ignored). The agent and `node-agent status` both ask it.
func HasDrainTaint(node *corev1.Node, key string) bool {
	for _, t := range node.Spec.Taints {
		if t.Key == key && t.Effect == corev1.TaintEffectNoSchedule {
			return true
		}
	}
	return false
}

func jsonMarshal(v any) (string, error) {
	raw, err := json.Marshal(v)
	return string(raw), err
}

// writeRecord writes the drain record (nil removes it) and waits until the node's
// informer shows it, so that the next look at the node does not act on a stale record
// (and start or complete the same drain twice).
func (e *Engine) writeRecord(ctx context.Context, node string, rec *DrainRecord) error {
	var want any
	wantRaw := ""
	if rec != nil {
		raw, err := jsonMarshal(rec)
		if err != nil {
			return fmt.Errorf("encoding the drain record: %w", err)
		}
		want, wantRaw = raw, raw
	}
	if err := patchAnnotations(ctx, e.clients.Kube, node, map[string]any{AnnotationDrain: want}); err != nil {
		return err
	}
	err := wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		n, err := e.view.Node()
		return err == nil && n.Annotations[AnnotationDrain] == wantRaw, nil
	})
	if err != nil {
		return fmt.Errorf("waiting to see the drain record on node %s: %w", node, err)
	}
	return nil
}
