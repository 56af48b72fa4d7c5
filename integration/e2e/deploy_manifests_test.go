package e2e

// Reading manifests/ as `kubectl apply -k` would, and applying it server-side, for the
// deployment tests (deploy_test.go). kubectl is not available here, and the agent's
// go.mod does not carry kustomize: this reader implements the kustomization features
// the manifests use (resources: files and folders; patches: strategic merge patches by
// path) and refuses every other field, so that a feature it does not implement fails
// the test instead of being silently skipped.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"
)

// kustomization is the part of kustomize's Kustomization that the manifests use.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Patches    []struct {
		Path string `json:"path"`
	} `json:"patches"`
}

// loadKustomization returns the objects that `kubectl apply -k dir` would apply, in order.
func loadKustomization(dir string) ([]*unstructured.Unstructured, error) {
	path := filepath.Join(dir, "kustomization.yaml")
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(raw, &k); err != nil {
		return nil, fmt.Errorf("%s: %w (this test reads only apiVersion, kind, resources and patches[].path)", path, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		return nil, fmt.Errorf("%s: apiVersion %q kind %q, want kustomize.config.k8s.io/v1beta1 Kustomization", path, k.APIVersion, k.Kind)
	}
	var objs []*unstructured.Unstructured
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("%s: resource %s: %w", path, r, err)
		}
		var more []*unstructured.Unstructured
		if fi.IsDir() {
			more, err = loadKustomization(p)
		} else {
			more, err = readObjects(p)
		}
		if err != nil {
			return nil, err
		}
		objs = append(objs, more...)
	}
	seen := map[string]bool{}
	for _, o := range objs {
		id := objectID(o)
		if seen[id] {
			return nil, fmt.Errorf("%s: %s is defined twice", path, id)
		}
		seen[id] = true
	}
	for _, p := range k.Patches {
		patches, err := readObjects(filepath.Join(dir, p.Path))
		if err != nil {
			return nil, err
		}
		for _, patch := range patches {
			if err := applyStrategicPatch(objs, patch); err != nil {
				return nil, fmt.Errorf("%s: patch %s: %w", path, p.Path, err)
			}
		}
	}
	return objs, nil
}

func objectID(o *unstructured.Unstructured) string {
	return o.GroupVersionKind().GroupKind().String() + " " + o.GetNamespace() + "/" + o.GetName()
}

// readObjects reads every YAML document of a file that holds an object.
func readObjects(path string) ([]*unstructured.Unstructured, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var objs []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		if s := strings.TrimSpace(string(js)); s == "null" || s == "" {
			continue // only comments
		}
		o := &unstructured.Unstructured{}
		if err := o.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		objs = append(objs, o)
	}
}

// applyStrategicPatch patches the object that patch names (kind, namespace, name), as
// kustomize's patchesStrategicMerge does, with the Go type's patch strategy.
func applyStrategicPatch(objs []*unstructured.Unstructured, patch *unstructured.Unstructured) error {
	for i, o := range objs {
		if objectID(o) != objectID(patch) {
			continue
		}
		typed, err := scheme.Scheme.New(o.GroupVersionKind())
		if err != nil {
			return fmt.Errorf("%s: %w", objectID(o), err)
		}
		orig, err := o.MarshalJSON()
		if err != nil {
			return err
		}
		p, err := patch.MarshalJSON()
		if err != nil {
			return err
		}
		merged, err := strategicpatch.StrategicMergePatch(orig, p, typed)
		if err != nil {
			return fmt.Errorf("%s: %w", objectID(o), err)
		}
		out := &unstructured.Unstructured{}
		if err := out.UnmarshalJSON(merged); err != nil {
			return err
		}
		objs[i] = out
		return nil
	}
	return fmt.Errorf("no object %s to patch", objectID(patch))
}

// fieldManager is the server-side apply field manager of the deployment tests.
const fieldManager = "node-agent-deploy-test"

// applyServerSide applies each object with server-side apply (force), so that the API
// server validates every object, the admission policy's CEL included. Namespaced
// objects must name their namespace: the kustomization sets none, and kubectl would put
// them in the namespace of the user's context instead.
func applyServerSide(ctx context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, dryRun bool) error {
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(kube.Discovery()))
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("%s: %w", objectID(o), err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		switch {
		case m.Scope.Name() == meta.RESTScopeNameNamespace && o.GetNamespace() == "":
			return fmt.Errorf("%s is namespaced but names no namespace", objectID(o))
		case m.Scope.Name() == meta.RESTScopeNameNamespace:
			ri = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
		case o.GetNamespace() != "":
			return fmt.Errorf("%s is cluster-scoped but names a namespace", objectID(o))
		}
		opts := metav1.ApplyOptions{FieldManager: fieldManager, Force: true}
		if dryRun {
			opts.DryRun = []string{metav1.DryRunAll}
		}
		if _, err := ri.Apply(ctx, o.GetName(), o, opts); err != nil {
			return fmt.Errorf("applying %s: %w", objectID(o), err)
		}
	}
	return nil
}

// findObject returns the object of a kind and name, converted to its Go type.
func findObject[T any](objs []*unstructured.Unstructured, kind, name string) (*T, error) {
	for _, o := range objs {
		if o.GetKind() != kind || o.GetName() != name {
			continue
		}
		out := new(T)
		if err := decodeStrict(o, out); err != nil {
			return nil, fmt.Errorf("%s: %w", objectID(o), err)
		}
		return out, nil
	}
	return nil, fmt.Errorf("no %s %s in the manifests", kind, name)
}

func decodeStrict(o *unstructured.Unstructured, out any) error {
	js, err := o.MarshalJSON()
	if err != nil {
		return err
	}
	return yaml.UnmarshalStrict(js, out)
}
