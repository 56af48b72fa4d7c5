package nodeinfo

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
)

// UpdateNode reads the Node, lets mutate change it and writes it back. Only a conflict
// (someone else wrote the Node in between) is retried, with client-go's
// retry.DefaultRetry backoff and a fresh read; any other error is returned. mutate
// returns false when there is nothing to write, or an error to stop.
func UpdateNode(ctx context.Context, kube kubernetes.Interface, name string, mutate func(*corev1.Node) (bool, error)) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		node, err := kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading node %s: %w", name, err)
		}
		write, err := mutate(node)
		if err != nil || !write {
			return err
		}
		if _, err := kube.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
			return fmt.Errorf("updating node %s: %w", name, err)
		}
		return nil
	})
}
