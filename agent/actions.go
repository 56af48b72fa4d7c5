package agent

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// evictionResult is how the API server (and KubeVirt's webhook) answered an eviction.
type evictionResult int

const (
	// evicted: the pod is being deleted (the guest shuts down).
	evicted evictionResult = iota
	// evacuating: KubeVirt intercepted it and marked the VMI for evacuation.
	evacuating
	// notMigratable: KubeVirt refused: the VMI cannot live-migrate.
	notMigratable
	// refused: refused for now with 429 (a PodDisruptionBudget, KubeVirt while a
	// target pod is pending): retried with a backoff.
	refused
	// failed: any other error (a pod under two budgets answers 500, an admission
	// webhook denies it, the API server is down): retried with a backoff.
	failed
	// gone: the pod no longer exists.
	gone
)

// evictor requests the eviction of a pod, once, without client-side retries: the
// engine backs off per VM. dryRun asks what would happen.
type evictor interface {
	evict(ctx context.Context, pod *corev1.Pod, dryRun bool) answer
}

// apiEvictor posts to the pods/eviction subresource.
type apiEvictor struct{ kube kubernetes.Interface }

func (a apiEvictor) evict(ctx context.Context, pod *corev1.Pod, dryRun bool) answer {
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace}}
	if dryRun {
		ev.DeleteOptions = &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}}
	}
	err := a.kube.CoreV1().RESTClient().Post().
		Namespace(pod.Namespace).Resource("pods").Name(pod.Name).SubResource("eviction").
		MaxRetries(0).Body(ev).Do(ctx).Error()
	return classify(err)
}

// classify reads an eviction's answer.
func classify(err error) answer {
	switch {
	case err == nil:
		return answer{result: evicted}
	case apierrors.IsNotFound(err):
		return answer{result: gone}
	case apierrors.IsTooManyRequests(err) || statusCode(err) == http.StatusTooManyRequests:
		msg := err.Error()
		switch {
		case strings.Contains(msg, "is not live-migratable"):
			return answer{result: notMigratable, msg: msg, cause: "NotLiveMigratable"}
		case strings.Contains(msg, "triggered evacuation") || strings.Contains(msg, "Evacuation in progress"):
			return answer{result: evacuating, msg: msg}
		default:
			return answer{result: refused, msg: msg, cause: string(metav1.StatusReasonTooManyRequests)}
		}
	default:
		cause := string(apierrors.ReasonForError(err))
		if cause == "" {
			cause = "Error"
		}
		if code := statusCode(err); code != 0 {
			cause = fmt.Sprintf("%s/%d", cause, code)
		}
		return answer{result: failed, msg: err.Error(), cause: cause}
	}
}

func statusCode(err error) int32 {
	if s, ok := err.(apierrors.APIStatus); ok {
		return s.Status().Code
	}
	return 0
}

// createMigration creates a VirtualMachineInstanceMigration for the VMI, the fallback
// where the eviction is not intercepted by KubeVirt. The caller has checked that the
// VMI has no unfinished migration.
func (e *Engine) createMigration(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) (string, error) {
	m := &kubevirtv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "node-agent-evacuation-",
			Namespace:    vmi.Namespace,
			Labels:       map[string]string{LabelMigrationNode: ownMigrationLabelValue(e.opts.NodeName)},
			Annotations:  map[string]string{kubevirtv1.EvacuationMigrationAnnotation: e.opts.NodeName},
		},
		Spec: kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi.Name},
	}
	created := &kubevirtv1.VirtualMachineInstanceMigration{}
	if err := e.clients.KubeVirt.Post().Namespace(vmi.Namespace).Resource(nodeinfo.ResourceMigrations).
		Body(m).Do(ctx).Into(created); err != nil {
		return "", fmt.Errorf("creating a migration for VMI %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	return created.Name, nil
}

// CancelEvacuation asks virt-api to clear the VMI's evacuation mark for node
// (virtualmachineinstances/NAME/evacuate/cancel, KubeVirt v1.8+); subresources is a
// subresources.kubevirt.io/v1 client (nodeinfo.NewKubeVirtSubresourceClient).
func CancelEvacuation(ctx context.Context, subresources rest.Interface, namespace, name, node string) error {
	body, err := json.Marshal(&kubevirtv1.EvacuateCancelOptions{EvacuationNodeName: node})
	if err != nil {
		return fmt.Errorf("encoding the cancel request: %w", err)
	}
	err = subresources.Put().Namespace(namespace).Resource(nodeinfo.ResourceVMIs).Name(name).
		SubResource("evacuate", "cancel").SetHeader("Content-Type", "application/json").Body(body).Do(ctx).Error()
	if err != nil {
		return fmt.Errorf("cancelling the evacuation of VMI %s/%s: %w", namespace, name, err)
	}
	return nil
}

// CancelUnsupported says whether a CancelEvacuation error means that this KubeVirt does
// not serve evacuate/cancel (before v1.8 virt-api answers 404, and so does the API
// server where the subresource API is not registered). The evacuation stays marked:
// KubeVirt goes on migrating the VM.
func CancelUnsupported(err error) bool {
	return apierrors.IsNotFound(err) || apierrors.IsMethodNotSupported(err)
}

// cancelFailure says, for an event or a log, why an evacuation was not cancelled.
func cancelFailure(err error) string {
	switch {
	case CancelUnsupported(err):
		return "this KubeVirt does not serve evacuate/cancel (before v1.8, or virt-api's subresource API is not available): " + err.Error()
	case apierrors.IsForbidden(err):
		return "the agent may not cancel evacuations (RBAC): " + err.Error()
	default:
		return err.Error()
	}
}

// LabelMigrationNode labels the migrations the agent creates with its node (the node's
// name, or a hash of it when the name is too long for a label value).
const LabelMigrationNode = AnnotationPrefix + "node"

// ownMigrationLabelValue is the value of LabelMigrationNode for node: its name when it
// is a valid label value (up to 63 characters), else "sha256-" and the start of the
// name's SHA-256 (a node name may have 253 characters). The full name is in the
// migration's evacuation annotation, which deleteOwnMigrations checks too.
func ownMigrationLabelValue(node string) string {
	if len(validation.IsValidLabelValue(node)) == 0 {
		return node
	}
	sum := sha256.Sum256([]byte(node))
	return "sha256-" + hex.EncodeToString(sum[:])[:56]
}

// ownMigrationSelector selects the migrations the agent created for its node.
func ownMigrationSelector(node string) string {
	return LabelMigrationNode + "=" + ownMigrationLabelValue(node)
}

// deleteOwnMigrations deletes the unfinished migrations that the agent created for its
// node (deleting a migration is KubeVirt's way to cancel it). It returns the migrations
// deleted and, for each one not deleted, why.
func deleteOwnMigrations(ctx context.Context, kubevirt rest.Interface, node string) (deleted []string, failed map[string]error, err error) {
	list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := kubevirt.Get().Resource(nodeinfo.ResourceMigrations).Param("labelSelector", ownMigrationSelector(node)).
		Do(ctx).Into(list); err != nil {
		return nil, nil, fmt.Errorf("listing the migrations the agent created for node %s: %w", node, err)
	}
	for _, m := range list.Items {
		if m.IsFinal() || m.DeletionTimestamp != nil || m.Annotations[kubevirtv1.EvacuationMigrationAnnotation] != node {
			continue
		}
		key := m.Namespace + "/" + m.Name
		err := kubevirt.Delete().Namespace(m.Namespace).Resource(nodeinfo.ResourceMigrations).Name(m.Name).Do(ctx).Error()
		switch {
		case err == nil, apierrors.IsNotFound(err):
			deleted = append(deleted, key)
		default:
			if failed == nil {
				failed = map[string]error{}
			}
			failed[key] = fmt.Errorf("deleting migration %s of VMI %s: %w", key, m.Spec.VMIName, err)
		}
	}
	return deleted, failed, nil
}
