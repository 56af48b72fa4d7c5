package nodeinfo

import (
	"errors"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func TestKeepLastGood(t *testing.T) {
	good := &Config{DrainTaintKey: "a.example/drain", DrainTaintKeySource: SourceKubeVirt}
	crBroken := errors.Join(&ConfigError{Source: SourceKubeVirt, Err: errors.New("invalid")})
	cmBroken := errors.Join(&ConfigError{Source: SourceConfigMap, Err: errors.New("not YAML")})
	live := ptr(kubevirtv1.EvictionStrategyLiveMigrate)
	for _, tc := range []struct {
		name     string
		cfg      Config
		err      error
		lastGood *Config
		wantKey  string
		wantLast string
	}{
		{"no error: use it and remember it", Config{DrainTaintKey: "b/drain", DrainTaintKeySource: SourceKubeVirt}, nil, good, "b/drain", "b/drain"},
		{"the CR broken, the key fell back to the default: keep the last good",
			Config{DrainTaintKey: DefaultDrainTaintKey, DrainTaintKeySource: SourceDefault, ClusterEvictionStrategy: live}, crBroken, good, "a.example/drain", "a.example/drain"},
		{"the ConfigMap broken but the CR decides: use the CR's key",
			Config{DrainTaintKey: "c/drain", DrainTaintKeySource: SourceKubeVirt}, cmBroken, good, "c/drain", "c/drain"},
		{"broken at start: the fallback, nothing remembered",
			Config{DrainTaintKey: DefaultDrainTaintKey, DrainTaintKeySource: SourceDefault}, crBroken, nil, DefaultDrainTaintKey, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			use, last := keepLastGood(tc.cfg, tc.err, tc.lastGood)
			if use.DrainTaintKey != tc.wantKey {
				t.Errorf("key in use %q, want %q", use.DrainTaintKey, tc.wantKey)
			}
			if use.ClusterEvictionStrategy != tc.cfg.ClusterEvictionStrategy {
				t.Errorf("the cluster's eviction strategy was not taken as it is now")
			}
			gotLast := ""
			if last != nil {
				gotLast = last.DrainTaintKey
			}
			if gotLast != tc.wantLast {
				t.Errorf("last good %q, want %q", gotLast, tc.wantLast)
			}
		})
	}
}

// The cache keeps no managedFields (the agent reads none); what is not an object (a
// deletion's tombstone) passes unchanged.
func TestStripManagedFields(t *testing.T) {
	vmi := &kubevirtv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Name: "vm", Namespace: "ns",
		ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "virt-controller", Operation: metav1.ManagedFieldsOperationUpdate}}}}
	got, err := stripManagedFields(vmi)
	if err != nil {
		t.Fatal(err)
	}
	if kept := got.(*kubevirtv1.VirtualMachineInstance); kept.ManagedFields != nil || kept.Name != "vm" || kept.Namespace != "ns" {
		t.Errorf("after the transform: %+v, want the VMI without managedFields", kept.ObjectMeta)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "ns/vm", Obj: vmi}
	if got, err := stripManagedFields(tomb); err != nil || got != tomb {
		t.Errorf("a tombstone became %v (error %v), want it unchanged", got, err)
	}
}
