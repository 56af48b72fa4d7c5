package nodeinfo

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func ptr[T any](v T) *T { return &v }

// kubeVirtCR is a KubeVirt CR with the given drain taint key and eviction strategy
// (nil: unset).
func kubeVirtCR(key *string, strategy *kubevirtv1.EvictionStrategy) *kubevirtv1.KubeVirt {
	kv := &kubevirtv1.KubeVirt{}
	kv.Namespace, kv.Name = "kubevirt", "kubevirt"
	kv.Spec.Configuration.EvictionStrategy = strategy
	if key != nil {
		kv.Spec.Configuration.MigrationConfiguration = &kubevirtv1.MigrationConfiguration{NodeDrainTaintKey: key}
	}
	return kv
}

// legacyConfigMap is the kubevirt-config ConfigMap with data.migrations.
func legacyConfigMap(migrations string) *corev1.ConfigMap {
	cm := &corev1.ConfigMap{Data: map[string]string{"migrations": migrations}}
	cm.Namespace, cm.Name = "kubevirt", LegacyConfigMapName
	return cm
}

// configErrors are the *ConfigError joined in err, in order.
func configErrors(t *testing.T, err error) []*ConfigError {
	t.Helper()
	if err == nil {
		return nil
	}
	errs := []error{err}
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		errs = joined.Unwrap()
	}
	var out []*ConfigError
	for _, e := range errs {
		var ce *ConfigError
		if !errors.As(e, &ce) {
			t.Fatalf("error %q is not a *ConfigError", e)
		}
		out = append(out, ce)
	}
	return out
}

func TestResolveConfig(t *testing.T) {
	type wantErr struct {
		source string
		has    string
	}
	tests := []struct {
		name       string
		flag       string
		kv         *kubevirtv1.KubeVirt
		cm         *corev1.ConfigMap
		wantKey    string
		wantSource string
		wantErrs   []wantErr
	}{
		{
			name:    "default when nothing is set",
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
		},
		{
			name:    "flag beats the CR and the ConfigMap",
			flag:    "example.com/from-flag",
			kv:      kubeVirtCR(ptr("example.com/from-cr"), nil),
			cm:      legacyConfigMap("nodeDrainTaintKey: example.com/from-cm\n"),
			wantKey: "example.com/from-flag", wantSource: SourceFlag,
		},
		{
			name:    "the CR beats the ConfigMap",
			kv:      kubeVirtCR(ptr("example.com/from-cr"), nil),
			cm:      legacyConfigMap("nodeDrainTaintKey: example.com/from-cm\n"),
			wantKey: "example.com/from-cr", wantSource: SourceKubeVirt,
		},
		{
			name:    "the ConfigMap, as YAML, beats the default",
			kv:      kubeVirtCR(nil, nil),
			cm:      legacyConfigMap("parallelMigrationsPerCluster: 5\nnodeDrainTaintKey: example.com/from-cm\n"),
			wantKey: "example.com/from-cm", wantSource: SourceConfigMap,
		},
		{
			name:    "the ConfigMap as JSON",
			cm:      legacyConfigMap(`{"parallelMigrationsPerCluster": 5, "nodeDrainTaintKey": "example.com/json"}`),
			wantKey: "example.com/json", wantSource: SourceConfigMap,
		},
		{
			name:    "a CR with migrations but no key falls through to the ConfigMap",
			kv:      &kubevirtv1.KubeVirt{Spec: kubevirtv1.KubeVirtSpec{Configuration: kubevirtv1.KubeVirtConfiguration{MigrationConfiguration: &kubevirtv1.MigrationConfiguration{}}}},
			cm:      legacyConfigMap("nodeDrainTaintKey: example.com/from-cm"),
			wantKey: "example.com/from-cm", wantSource: SourceConfigMap,
		},
		{
			name:    "a ConfigMap without migrations, or without the key, gives the default",
			cm:      legacyConfigMap("parallelMigrationsPerNode: 2"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
		},
		{
			name:    "a ConfigMap whose migrations are blank gives the default",
			cm:      legacyConfigMap("  \n"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
		},
		{
			name:    "a ConfigMap without data gives the default",
			cm:      &corev1.ConfigMap{},
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
		},
		{
			name:    "an invalid flag is skipped and reported",
			flag:    "not a key!",
			kv:      kubeVirtCR(ptr("example.com/from-cr"), nil),
			wantKey: "example.com/from-cr", wantSource: SourceKubeVirt,
			wantErrs: []wantErr{{SourceFlag, `invalid taint key "not a key!"`}},
		},
		{
			name:    "an invalid CR key is skipped and reported",
			kv:      kubeVirtCR(ptr("-bad-/key/x"), nil),
			cm:      legacyConfigMap("nodeDrainTaintKey: example.com/from-cm"),
			wantKey: "example.com/from-cm", wantSource: SourceConfigMap,
			wantErrs: []wantErr{{SourceKubeVirt, "invalid taint key"}},
		},
		{
			name:    "an empty CR key is skipped and reported",
			kv:      kubeVirtCR(ptr(""), nil),
			cm:      legacyConfigMap("nodeDrainTaintKey: example.com/from-cm"),
			wantKey: "example.com/from-cm", wantSource: SourceConfigMap,
			wantErrs: []wantErr{{SourceKubeVirt, "nodeDrainTaintKey is empty"}},
		},
		{
			name:    "an invalid ConfigMap key is skipped and reported",
			cm:      legacyConfigMap("nodeDrainTaintKey: has spaces in it"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
			wantErrs: []wantErr{{SourceConfigMap, `invalid taint key "has spaces in it"`}},
		},
		{
			name:    "an empty ConfigMap key is an error",
			cm:      legacyConfigMap(`nodeDrainTaintKey: ""`),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
			wantErrs: []wantErr{{SourceConfigMap, "nodeDrainTaintKey is empty"}},
		},
		{
			name:    "a malformed ConfigMap is an error",
			cm:      legacyConfigMap("nodeDrainTaintKey: [unclosed\n  - {"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
			wantErrs: []wantErr{{SourceConfigMap, "neither YAML nor JSON"}},
		},
		{
			name:    "a ConfigMap key of the wrong type is an error",
			cm:      legacyConfigMap("nodeDrainTaintKey: [a, b]"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
			wantErrs: []wantErr{{SourceConfigMap, "neither YAML nor JSON"}},
		},
		{
			name:    "a malformed ConfigMap is reported even when the flag wins",
			flag:    "example.com/from-flag",
			cm:      legacyConfigMap("{not json"),
			wantKey: "example.com/from-flag", wantSource: SourceFlag,
			wantErrs: []wantErr{{SourceConfigMap, "neither YAML nor JSON"}},
		},
		{
			name:    "every bad source is reported, in order",
			flag:    "bad flag",
			kv:      kubeVirtCR(ptr("bad cr"), nil),
			cm:      legacyConfigMap("nodeDrainTaintKey: bad cm"),
			wantKey: DefaultDrainTaintKey, wantSource: SourceDefault,
			wantErrs: []wantErr{{SourceFlag, `"bad flag"`}, {SourceKubeVirt, `"bad cr"`}, {SourceConfigMap, `"bad cm"`}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := ResolveConfig(tt.flag, tt.kv, tt.cm)
			if cfg.DrainTaintKey != tt.wantKey || cfg.DrainTaintKeySource != tt.wantSource {
				t.Errorf("key %q from %q, want %q from %q", cfg.DrainTaintKey, cfg.DrainTaintKeySource, tt.wantKey, tt.wantSource)
			}
			got := configErrors(t, err)
			if len(got) != len(tt.wantErrs) {
				t.Fatalf("errors %v, want %d", err, len(tt.wantErrs))
			}
			for i, w := range tt.wantErrs {
				if got[i].Source != w.source || !strings.Contains(got[i].Error(), w.has) {
					t.Errorf("error %d = %q (source %q), want source %q and %q", i, got[i], got[i].Source, w.source, w.has)
				}
				if !strings.HasPrefix(got[i].Error(), w.source+": ") {
					t.Errorf("error %q does not name its source %q", got[i], w.source)
				}
			}
		})
	}
}

func TestResolveConfigClusterEvictionStrategy(t *testing.T) {
	live := kubevirtv1.EvictionStrategyLiveMigrate
	tests := []struct {
		name string
		kv   *kubevirtv1.KubeVirt
		want *kubevirtv1.EvictionStrategy
	}{
		{"no CR", nil, nil},
		{"unset in the CR", kubeVirtCR(nil, nil), nil},
		{"read from the CR", kubeVirtCR(nil, &live), &live},
		{"kept even when the CR's key is invalid", kubeVirtCR(ptr("bad key"), &live), &live},
		{"an unknown value is kept as read", kubeVirtCR(nil, ptr(kubevirtv1.EvictionStrategy("Teleport"))), ptr(kubevirtv1.EvictionStrategy("Teleport"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _ := ResolveConfig("", tt.kv, nil)
			if !reflect.DeepEqual(cfg.ClusterEvictionStrategy, tt.want) {
				t.Errorf("ClusterEvictionStrategy = %v, want %v", deref(cfg.ClusterEvictionStrategy), deref(tt.want))
			}
		})
	}
}

func deref(s *kubevirtv1.EvictionStrategy) string {
	if s == nil {
		return "<nil>"
	}
	return string(*s)
}

func TestValidateTaintKey(t *testing.T) {
	tests := []struct {
		key   string
		valid bool
	}{
		{DefaultDrainTaintKey, true},
		{"drain", true},
		{"example.com/node.drain-now_1", true},
		{"", false},
		{"has space", false},
		{"-leading-dash", false},
		{"a/b/c", false},
		{"Bad_Prefix!/drain", false},
		{"example.com/", false},
		{strings.Repeat("k", 64), false},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			err := ValidateTaintKey(tt.key)
			if (err == nil) != tt.valid {
				t.Fatalf("ValidateTaintKey(%q) = %v, want valid %v", tt.key, err, tt.valid)
			}
			if err != nil && !strings.Contains(err.Error(), "invalid taint key") {
				t.Errorf("error %q does not say the taint key is invalid", err)
			}
		})
	}
}

func TestConfigErrorUnwraps(t *testing.T) {
	inner := errors.New("boom")
	err := error(&ConfigError{Source: SourceKubeVirt, Err: inner})
	if !errors.Is(err, inner) {
		t.Errorf("errors.Is(%v, inner) = false", err)
	}
	if err.Error() != "KubeVirt CR: boom" {
		t.Errorf("Error() = %q", err)
	}
}

func TestOldestKubeVirtConfigures(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	kv := func(name string, age time.Duration) *kubevirtv1.KubeVirt {
		k := &kubevirtv1.KubeVirt{}
		k.Name, k.CreationTimestamp = name, metav1.NewTime(t0.Add(-age))
		return k
	}
	if got := OldestKubeVirt(nil); got != nil {
		t.Errorf("OldestKubeVirt(nil) = %v, want nil", got.Name)
	}
	if got := OldestKubeVirt([]*kubevirtv1.KubeVirt{kv("new", time.Minute), kv("old", time.Hour), kv("mid", 30*time.Minute)}); got == nil || got.Name != "old" {
		t.Errorf("OldestKubeVirt() = %v, want old", got)
	}
}

// KubeVirtDrainTaintKey is the key KubeVirt's evacuation controller acts on: the CR's,
// else the default; never the agent's flag nor the legacy ConfigMap, which KubeVirt
// does not read.
func TestResolveConfigKubeVirtsOwnKey(t *testing.T) {
	for _, tc := range []struct {
		name string
		flag string
		kv   *kubevirtv1.KubeVirt
		cm   *corev1.ConfigMap
		want string
	}{
		{name: "nothing set", want: DefaultDrainTaintKey},
		{name: "the agent's flag", flag: "example.com/agent", want: DefaultDrainTaintKey},
		{name: "the legacy ConfigMap", cm: legacyConfigMap("nodeDrainTaintKey: example.com/from-cm"), want: DefaultDrainTaintKey},
		{name: "the CR", flag: "example.com/agent", kv: kubeVirtCR(ptr("example.com/from-cr"), nil), want: "example.com/from-cr"},
		{name: "an invalid CR key", kv: kubeVirtCR(ptr("-bad-/key/x"), nil), want: DefaultDrainTaintKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := ResolveConfig(tc.flag, tc.kv, tc.cm)
			if cfg.KubeVirtDrainTaintKey != tc.want {
				t.Errorf("KubeVirtDrainTaintKey = %q, want %q", cfg.KubeVirtDrainTaintKey, tc.want)
			}
		})
	}
}
