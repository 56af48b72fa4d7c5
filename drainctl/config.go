package drainctl

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// KeyUnknownError says that the drain taint key in force cannot be told: a source
// that would decide it (the KubeVirt CR, the legacy ConfigMap) could not be read or
// used. Acting on the fallback key would untaint or report the wrong taint.
type KeyUnknownError struct {
	// Fallback is the key the resolution fell back to, and where it came from.
	Fallback, Source string
	Err              error
}

func (e *KeyUnknownError) Error() string {
	return fmt.Sprintf("cannot tell the drain taint key (it is not %s from %s for certain): %v", e.Fallback, e.Source, e.Err)
}

func (e *KeyUnknownError) Unwrap() error { return e.Err }

// Config resolves the drain taint key and the cluster's eviction strategy as the
// agents do (the flag, the oldest KubeVirt CR, the legacy kubevirt-config ConfigMap,
// the default). err is a *KeyUnknownError when the key cannot be told; warning names
// a source that could not be used but does not decide the key.
func (c *Client) Config(ctx context.Context) (cfg nodeinfo.Config, warning, err error) {
	var kv *kubevirtv1.KubeVirt
	kvs := &kubevirtv1.KubeVirtList{}
	kvErr := c.KubeVirt.Get().Namespace(c.opts.KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Do(ctx).Into(kvs)
	if apierrors.IsNotFound(kvErr) {
		kvErr = nil
	}
	if kvErr != nil {
		kvErr = &nodeinfo.ConfigError{Source: nodeinfo.SourceKubeVirt, Err: fmt.Errorf("reading the KubeVirt CR: %w", kvErr)}
	} else {
		list := make([]*kubevirtv1.KubeVirt, len(kvs.Items))
		for i := range kvs.Items {
			list[i] = &kvs.Items[i]
		}
		kv = nodeinfo.OldestKubeVirt(list)
	}
	cm, cmErr := c.Kube.CoreV1().ConfigMaps(c.opts.KubeVirtNamespace).Get(ctx, nodeinfo.LegacyConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(cmErr) {
		cm, cmErr = nil, nil
	}
	if cmErr != nil {
		cm, cmErr = nil, &nodeinfo.ConfigError{Source: nodeinfo.SourceConfigMap, Err: fmt.Errorf("reading the %s ConfigMap: %w", nodeinfo.LegacyConfigMapName, cmErr)}
	}
	return resolve(c.opts.DrainTaintKey, kv, cm, errors.Join(kvErr, cmErr))
}

// resolve is Config without the reading: readErr joins the *nodeinfo.ConfigError of
// each source that could not be read.
func resolve(flagKey string, kv *kubevirtv1.KubeVirt, cm *corev1.ConfigMap, readErr error) (nodeinfo.Config, error, error) {
	cfg, resolveErr := nodeinfo.ResolveConfig(flagKey, kv, cm)
	problems := errors.Join(readErr, resolveErr)
	if problems == nil {
		return cfg, nil, nil
	}
	if nodeinfo.Outranks(problems, cfg.DrainTaintKeySource) {
		return cfg, nil, &KeyUnknownError{Fallback: cfg.DrainTaintKey, Source: cfg.DrainTaintKeySource, Err: problems}
	}
	return cfg, problems, nil
}
