package nodeinfo

import (
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// DefaultDrainTaintKey is KubeVirt's default node drain taint key.
const DefaultDrainTaintKey = "kubevirt.io/drain"

// LegacyConfigMapName is the kubevirt-config ConfigMap of the seed document
// (removed from KubeVirt in v0.48, still honoured here for old installations).
const LegacyConfigMapName = "kubevirt-config"

// Where the drain taint key came from.
const (
	SourceFlag      = "flag"
	SourceKubeVirt  = "KubeVirt CR"
	SourceConfigMap = "kubevirt-config ConfigMap"
	SourceDefault   = "default"
)

// Config is how node-agent is configured by the cluster: the drain taint key and the
// cluster-wide eviction strategy.
type Config struct {
	// DrainTaintKey is the key of the NoSchedule taint that asks for a drain.
	DrainTaintKey string
	// DrainTaintKeySource says where DrainTaintKey came from (Source* constants).
	DrainTaintKeySource string
	// KubeVirtDrainTaintKey is the key KubeVirt's own evacuation controller acts on: the
	// KubeVirt CR's migrations.nodeDrainTaintKey, else the default (KubeVirt does not
	// read the legacy ConfigMap, nor the agent's flag). On a node with this taint
	// KubeVirt creates the VMs' migrations itself, with or without its eviction webhook.
	KubeVirtDrainTaintKey string
	// ClusterEvictionStrategy is the KubeVirt CR's spec.configuration.evictionStrategy,
	// nil when unset. It is kept as read: an unknown value is for the decision to refuse.
	ClusterEvictionStrategy *kubevirtv1.EvictionStrategy
}

// ConfigError is a configuration source that could not be used. The resolution
// skips it and says why.
type ConfigError struct {
	Source string
	Err    error
}

func (e *ConfigError) Error() string { return fmt.Sprintf("%s: %v", e.Source, e.Err) }
func (e *ConfigError) Unwrap() error { return e.Err }

// ValidateTaintKey checks a taint key as the API server does (a qualified name).
func ValidateTaintKey(key string) error {
	if msgs := validation.IsQualifiedName(key); len(msgs) > 0 {
		return fmt.Errorf("invalid taint key %q: %s", key, strings.Join(msgs, "; "))
	}
	return nil
}

// ResolveConfig works out the configuration from, in order: the flag, the KubeVirt CR,
// the legacy kubevirt-config ConfigMap, the default. kv and cm may be nil. A source
// that is set but unusable (an invalid key, a ConfigMap that does not parse) is
// skipped and reported in the returned error (a join of *ConfigError); the caller
// decides whether to keep its last good configuration instead.
func ResolveConfig(flagKey string, kv *kubevirtv1.KubeVirt, cm *corev1.ConfigMap) (Config, error) {
	var cfg Config
	var errs []error
	if kv != nil {
		cfg.ClusterEvictionStrategy = kv.Spec.Configuration.EvictionStrategy
	}
	candidates := []struct {
		source string
		key    func() (string, error)
	}{
		{SourceFlag, func() (string, error) { return flagKey, nil }},
		{SourceKubeVirt, func() (string, error) { return kubeVirtDrainKey(kv) }},
		{SourceConfigMap, func() (string, error) { return legacyDrainKey(cm) }},
	}
	for _, c := range candidates {
		key, err := c.key()
		if err == nil && key != "" {
			err = ValidateTaintKey(key)
		}
		if err != nil {
			errs = append(errs, &ConfigError{Source: c.source, Err: err})
			continue
		}
		if key != "" && cfg.DrainTaintKey == "" {
			cfg.DrainTaintKey, cfg.DrainTaintKeySource = key, c.source
		}
	}
	if cfg.DrainTaintKey == "" {
		cfg.DrainTaintKey, cfg.DrainTaintKeySource = DefaultDrainTaintKey, SourceDefault
	}
	cfg.KubeVirtDrainTaintKey = DefaultDrainTaintKey
	if key, err := kubeVirtDrainKey(kv); err == nil && key != "" && ValidateTaintKey(key) == nil {
		cfg.KubeVirtDrainTaintKey = key
	}
	return cfg, errors.Join(errs...)
}

// OldestKubeVirt is the KubeVirt CR that node-agent reads the configuration from when
// there are several: the oldest. nil when there is none.
func OldestKubeVirt(kvs []*kubevirtv1.KubeVirt) *kubevirtv1.KubeVirt {
	var oldest *kubevirtv1.KubeVirt
	for _, kv := range kvs {
		if oldest == nil || kv.CreationTimestamp.Before(&oldest.CreationTimestamp) {
			oldest = kv
		}
	}
	return oldest
}

func kubeVirtDrainKey(kv *kubevirtv1.KubeVirt) (string, error) {
	if kv == nil || kv.Spec.Configuration.MigrationConfiguration == nil || kv.Spec.Configuration.MigrationConfiguration.NodeDrainTaintKey == nil {
		return "", nil
	}
	if *kv.Spec.Configuration.MigrationConfiguration.NodeDrainTaintKey == "" {
		return "", fmt.Errorf("spec.configuration.migrations.nodeDrainTaintKey is empty")
	}
	return *kv.Spec.Configuration.MigrationConfiguration.NodeDrainTaintKey, nil
}

// legacyDrainKey reads data.migrations (YAML or JSON) of the kubevirt-config ConfigMap.
func legacyDrainKey(cm *corev1.ConfigMap) (string, error) {
	if cm == nil || strings.TrimSpace(cm.Data["migrations"]) == "" {
		return "", nil
	}
	var migrations struct {
		NodeDrainTaintKey *string `json:"nodeDrainTaintKey"`
	}
	if err := yaml.Unmarshal([]byte(cm.Data["migrations"]), &migrations); err != nil {
		return "", fmt.Errorf("data.migrations is neither YAML nor JSON: %w", err)
	}
	if migrations.NodeDrainTaintKey == nil {
		return "", nil
	}
	if *migrations.NodeDrainTaintKey == "" {
		return "", fmt.Errorf("data.migrations.nodeDrainTaintKey is empty")
	}
	return *migrations.NodeDrainTaintKey, nil
}
