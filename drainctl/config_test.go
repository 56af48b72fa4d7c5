package drainctl

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

func kubeVirtWithKey(key string) *kubevirtv1.KubeVirt {
	kv := &kubevirtv1.KubeVirt{}
	kv.Spec.Configuration.MigrationConfiguration = &kubevirtv1.MigrationConfiguration{NodeDrainTaintKey: &key}
	return kv
}

func legacyWithKey(migrations string) *corev1.ConfigMap {
	return &corev1.ConfigMap{Data: map[string]string{"migrations": migrations}}
}

func TestResolveTellsAKeyItCannotKnow(t *testing.T) {
	forbidden := apierrors.NewForbidden(schema.GroupResource{Group: "kubevirt.io", Resource: "kubevirts"}, "", errors.New("no RBAC"))
	unreadable := func(source string) error {
		return &nodeinfo.ConfigError{Source: source, Err: forbidden}
	}
	tests := []struct {
		name        string
		flag        string
		kv          *kubevirtv1.KubeVirt
		cm          *corev1.ConfigMap
		readErr     error
		wantKey     string
		wantWarning bool
		wantUnknown bool
	}{
		{name: "nothing configured: the default", wantKey: nodeinfo.DefaultDrainTaintKey},
		{name: "the KubeVirt CR's key", kv: kubeVirtWithKey("example.com/drain"), wantKey: "example.com/drain"},
		{name: "the KubeVirt CR cannot be read: unknown, not the default", readErr: unreadable(nodeinfo.SourceKubeVirt), wantKey: nodeinfo.DefaultDrainTaintKey, wantUnknown: true},
		{name: "the KubeVirt CR cannot be read but the ConfigMap names a key: unknown", cm: legacyWithKey("nodeDrainTaintKey: legacy.example.com/drain"),
			readErr: unreadable(nodeinfo.SourceKubeVirt), wantKey: "legacy.example.com/drain", wantUnknown: true},
		{name: "the ConfigMap cannot be read and the CR names no key: unknown", kv: &kubevirtv1.KubeVirt{},
			readErr: unreadable(nodeinfo.SourceConfigMap), wantKey: nodeinfo.DefaultDrainTaintKey, wantUnknown: true},
		{name: "the ConfigMap cannot be read but the CR names the key: a warning", kv: kubeVirtWithKey("example.com/drain"),
			readErr: unreadable(nodeinfo.SourceConfigMap), wantKey: "example.com/drain", wantWarning: true},
		{name: "the CR's key is invalid: unknown", kv: kubeVirtWithKey("not a key!"), wantKey: nodeinfo.DefaultDrainTaintKey, wantUnknown: true},
		{name: "the flag names the key: nothing read matters", flag: "flag.example.com/drain", readErr: unreadable(nodeinfo.SourceKubeVirt),
			wantKey: "flag.example.com/drain", wantWarning: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, warning, err := resolve(tt.flag, tt.kv, tt.cm, tt.readErr)
			if cfg.DrainTaintKey != tt.wantKey {
				t.Errorf("key %q, want %q", cfg.DrainTaintKey, tt.wantKey)
			}
			if (warning != nil) != tt.wantWarning {
				t.Errorf("warning %v, want one: %v", warning, tt.wantWarning)
			}
			var unknown *KeyUnknownError
			if errors.As(err, &unknown) != tt.wantUnknown || (err != nil && !tt.wantUnknown) {
				t.Errorf("error %v, want a KeyUnknownError: %v", err, tt.wantUnknown)
			}
			if tt.readErr != nil && err != nil && !apierrors.IsForbidden(err) {
				t.Errorf("error %v does not carry the read error", err)
			}
		})
	}
}
