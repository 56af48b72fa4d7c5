package nodeinfo

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// The fuzz targets below run their seeds (and testdata/fuzz/<target>) as unit tests in
// `go test`; hack/test.sh also fuzzes each for a few seconds (NODE_AGENT_FUZZTIME).

// checkKeyInForce asserts what holds for every resolved configuration: the keys in
// force are valid taint keys, and every error is a *ConfigError naming its source.
func checkKeyInForce(t *testing.T, cfg Config, err error) {
	t.Helper()
	if verr := ValidateTaintKey(cfg.DrainTaintKey); verr != nil {
		t.Fatalf("the key in force is invalid (source %s): %v", cfg.DrainTaintKeySource, verr)
	}
	if verr := ValidateTaintKey(cfg.KubeVirtDrainTaintKey); verr != nil {
		t.Fatalf("KubeVirt's key is invalid: %v", verr)
	}
	switch cfg.DrainTaintKeySource {
	case SourceFlag, SourceKubeVirt, SourceConfigMap:
	case SourceDefault:
		if cfg.DrainTaintKey != DefaultDrainTaintKey {
			t.Fatalf("source default with key %q", cfg.DrainTaintKey)
		}
	default:
		t.Fatalf("unknown source %q", cfg.DrainTaintKeySource)
	}
	if err == nil {
		return
	}
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("error %v (%T) is not a join of *ConfigError", err, err)
	}
	for _, e := range joined.Unwrap() {
		var ce *ConfigError
		if !errors.As(e, &ce) || ce.Source == "" || ce.Err == nil {
			t.Fatalf("error %v (%T) is not a *ConfigError with a source", e, e)
		}
		if ce.Source == cfg.DrainTaintKeySource {
			t.Fatalf("source %s is both in force and in error: %v", ce.Source, ce)
		}
	}
}

// FuzzLegacyMigrations feeds the legacy kubevirt-config ConfigMap's data.migrations
// (YAML or JSON). Properties: no panic; a value that does not parse, or whose
// nodeDrainTaintKey is empty or invalid, is a *ConfigError for the ConfigMap and the
// default stays in force; a valid key is in force from the ConfigMap, and written back
// as JSON or YAML it reads as the same key; KubeVirt's own key is never taken from the
// ConfigMap.
func FuzzLegacyMigrations(f *testing.F) {
	for _, s := range []string{
		"",
		"   \n",
		"nodeDrainTaintKey: example.com/drain\n",
		`{"nodeDrainTaintKey": "example.com/drain"}`,
		`{"nodeDrainTaintKey": ""}`,
		`{"nodeDrainTaintKey": null}`,
		`{"nodeDrainTaintKey": 42}`,
		`{"nodeDrainTaintKey": ["a"]}`,
		"nodeDrainTaintKey: [unclosed",
		"nodeDrainTaintKey: 'bad key!'\n",
		"parallelMigrationsPerCluster: 5\nbandwidthPerMigration: 64Mi\n",
		"- a\n- b\n",
		"just a string",
		"nodeDrainTaintKey: &a example.com/drain\nother: *a\n",
		"nodeDrainTaintKey: example.com/drain\nnodeDrainTaintKey: other.io/drain\n",
		"NodeDrainTaintKey: example.com/drain\n",
		"nodeDrainTaintKey: 123\n",
		"nodeDrainTaintKey: true\n",
		"nodeDrainTaintKey: ~\n",
		"\t{nodeDrainTaintKey: x}",
		"nodeDrainTaintKey: a/b/c\n",
		"nodeDrainTaintKey: example.com/" + strings.Repeat("a", 64) + "\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, migrations string) {
		cm := legacyConfigMap(migrations)
		key, readErr := legacyDrainKey(cm)
		cfg, err := ResolveConfig("", nil, cm)
		checkKeyInForce(t, cfg, err)
		if cfg.KubeVirtDrainTaintKey != DefaultDrainTaintKey {
			t.Fatalf("KubeVirt's key %q taken from the ConfigMap", cfg.KubeVirtDrainTaintKey)
		}
		valid := readErr == nil && key != "" && ValidateTaintKey(key) == nil
		switch {
		case valid:
			if err != nil || cfg.DrainTaintKey != key || cfg.DrainTaintKeySource != SourceConfigMap {
				t.Fatalf("valid key %q: in force %q from %s, error %v", key, cfg.DrainTaintKey, cfg.DrainTaintKeySource, err)
			}
		case readErr == nil && key == "":
			if err != nil || cfg.DrainTaintKeySource != SourceDefault {
				t.Fatalf("no key: in force %q from %s, error %v", cfg.DrainTaintKey, cfg.DrainTaintKeySource, err)
			}
		default:
			var ce *ConfigError
			if !errors.As(err, &ce) || ce.Source != SourceConfigMap || cfg.DrainTaintKeySource != SourceDefault {
				t.Fatalf("unusable value (key %q, read error %v): in force %q from %s, error %v", key, readErr, cfg.DrainTaintKey, cfg.DrainTaintKeySource, err)
			}
		}
		if !valid {
			return
		}
		// Written back by an operator in either form, the key reads the same.
		doc := map[string]string{"nodeDrainTaintKey": key}
		asJSON, jerr := json.Marshal(doc)
		asYAML, yerr := yaml.Marshal(doc)
		if jerr != nil || yerr != nil {
			t.Fatalf("cannot write key %q back: %v %v", key, jerr, yerr)
		}
		for _, back := range []string{string(asJSON), string(asYAML)} {
			if got, err := legacyDrainKey(legacyConfigMap(back)); err != nil || got != key {
				t.Fatalf("key %q written back as %q reads %q, %v", key, back, got, err)
			}
		}
	})
}

// FuzzResolveConfig feeds every source of the configuration at once: the flag, the
// KubeVirt CR's migrations.nodeDrainTaintKey (set or not) and evictionStrategy (set
// or not), the legacy ConfigMap. Properties: no panic; the key in force is always a
// valid taint key, from the first source (flag, KubeVirt CR, ConfigMap) whose key is
// valid, else the default; an invalid key is reported and never in force; KubeVirt's
// own key is the CR's when valid, else the default; the cluster's evictionStrategy is
// kept exactly as read, unknown values included (the decision refuses them).
func FuzzResolveConfig(f *testing.F) {
	f.Add("", "", false, "", false, "")
	f.Add("example.com/drain", "", false, "", false, "")
	f.Add("bad key", "kv.io/drain", true, "LiveMigrate", true, "nodeDrainTaintKey: cm.io/drain")
	f.Add("", "", true, "None", true, "nodeDrainTaintKey: cm.io/drain")
	f.Add("", "in valid", true, "Bogus", true, `{"nodeDrainTaintKey": "cm.io/drain"}`)
	f.Add("", "kv.io/drain", true, "", true, "nodeDrainTaintKey: [")
	f.Add("-x", "x-", true, "External", true, `{"nodeDrainTaintKey": ""}`)
	f.Add("", "", false, "LiveMigrateIfPossible", true, "")
	f.Fuzz(func(t *testing.T, flagKey, kvKey string, kvKeySet bool, strategy string, strategySet bool, migrations string) {
		var key *string
		if kvKeySet {
			key = &kvKey
		}
		var es *kubevirtv1.EvictionStrategy
		if strategySet {
			s := kubevirtv1.EvictionStrategy(strategy)
			es = &s
		}
		kv := kubeVirtCR(key, es)
		cm := legacyConfigMap(migrations)
		cfg, err := ResolveConfig(flagKey, kv, cm)
		checkKeyInForce(t, cfg, err)

		cmKey, cmErr := legacyDrainKey(cm)
		usable := func(k string) bool { return k != "" && ValidateTaintKey(k) == nil }
		want, wantSource := DefaultDrainTaintKey, SourceDefault
		switch {
		case usable(flagKey):
			want, wantSource = flagKey, SourceFlag
		case kvKeySet && usable(kvKey):
			want, wantSource = kvKey, SourceKubeVirt
		case cmErr == nil && usable(cmKey):
			want, wantSource = cmKey, SourceConfigMap
		}
		if cfg.DrainTaintKey != want || cfg.DrainTaintKeySource != wantSource {
			t.Fatalf("in force %q from %s, want %q from %s (error %v)", cfg.DrainTaintKey, cfg.DrainTaintKeySource, want, wantSource, err)
		}
		wantErrs := 0
		if flagKey != "" && !usable(flagKey) {
			wantErrs++
		}
		if kvKeySet && !usable(kvKey) {
			wantErrs++
		}
		if cmErr != nil || (cmKey != "" && !usable(cmKey)) {
			wantErrs++
		}
		gotErrs := 0
		if err != nil {
			gotErrs = len(err.(interface{ Unwrap() []error }).Unwrap())
		}
		if gotErrs != wantErrs {
			t.Fatalf("%d errors, want %d: %v", gotErrs, wantErrs, err)
		}
		wantKV := DefaultDrainTaintKey
		if kvKeySet && usable(kvKey) {
			wantKV = kvKey
		}
		if cfg.KubeVirtDrainTaintKey != wantKV {
			t.Fatalf("KubeVirt's key %q, want %q", cfg.KubeVirtDrainTaintKey, wantKV)
		}
		if (cfg.ClusterEvictionStrategy == nil) != !strategySet || (strategySet && string(*cfg.ClusterEvictionStrategy) != strategy) {
			t.Fatalf("cluster evictionStrategy %s, want %q (set %v)", deref(cfg.ClusterEvictionStrategy), strategy, strategySet)
		}
	})
}

// FuzzKubeVirtCR decodes a KubeVirt CR as the informer would (JSON) and resolves the
// configuration from it: missing, null or absurd fields (no configuration, migrations
// null, a key of the wrong type) are errors of the decoding or of the resolution,
// never a panic, and never an invalid key in force.
func FuzzKubeVirtCR(f *testing.F) {
	for _, s := range []string{
		`{}`,
		`null`,
		`{"spec": null}`,
		`{"spec": {"configuration": null}}`,
		`{"spec": {"configuration": {"migrations": null}}}`,
		`{"spec": {"configuration": {"migrations": {"nodeDrainTaintKey": null}}}}`,
		`{"spec": {"configuration": {"migrations": {"nodeDrainTaintKey": ""}}}}`,
		`{"spec": {"configuration": {"migrations": {"nodeDrainTaintKey": "example.com/drain"}}}}`,
		`{"spec": {"configuration": {"migrations": {"nodeDrainTaintKey": "not a key"}}}}`,
		`{"spec": {"configuration": {"migrations": {"nodeDrainTaintKey": 7}}}}`,
		`{"spec": {"configuration": {"evictionStrategy": "LiveMigrate"}}}`,
		`{"spec": {"configuration": {"evictionStrategy": ""}}}`,
		`{"spec": {"configuration": {"evictionStrategy": "Sometimes"}}}`,
		`{"spec": {"configuration": {"evictionStrategy": null, "migrations": {"nodeDrainTaintKey": "a.io/b", "bandwidthPerMigration": "bogus"}}}}`,
		`{"metadata": {"creationTimestamp": "not a time"}, "spec": {}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		var kv kubevirtv1.KubeVirt
		if err := json.Unmarshal(raw, &kv); err != nil {
			return // the informer never hands the agent an object that does not decode
		}
		cfg, err := ResolveConfig("", &kv, nil)
		checkKeyInForce(t, cfg, err)
		key, keyErr := kubeVirtDrainKey(&kv)
		if keyErr == nil && key != "" && ValidateTaintKey(key) == nil {
			if cfg.DrainTaintKey != key || cfg.KubeVirtDrainTaintKey != key || err != nil {
				t.Fatalf("valid CR key %q: in force %q, KubeVirt's %q, error %v", key, cfg.DrainTaintKey, cfg.KubeVirtDrainTaintKey, err)
			}
		} else if cfg.DrainTaintKeySource != SourceDefault || cfg.KubeVirtDrainTaintKey != DefaultDrainTaintKey {
			t.Fatalf("no usable CR key (%q, %v): in force %q from %s, KubeVirt's %q", key, keyErr, cfg.DrainTaintKey, cfg.DrainTaintKeySource, cfg.KubeVirtDrainTaintKey)
		}
		if (cfg.ClusterEvictionStrategy == nil) != (kv.Spec.Configuration.EvictionStrategy == nil) ||
			(cfg.ClusterEvictionStrategy != nil && *cfg.ClusterEvictionStrategy != *kv.Spec.Configuration.EvictionStrategy) {
			t.Fatalf("cluster evictionStrategy %s, CR says %s", deref(cfg.ClusterEvictionStrategy), deref(kv.Spec.Configuration.EvictionStrategy))
		}
	})
}
