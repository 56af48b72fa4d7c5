package e2e

// Reading manifests/ as `kubectl apply -k` does, and applying it server-side, for the
// deployment tests (deploy_test.go). kubectl is not available here; its `-k` is
// cli-runtime's KustomizeVisitor, which runs kustomize's krusty with the default options
// and the legacy resource order and decodes the YAML it renders. loadKustomization does
// the same with the same library (sigs.k8s.io/kustomize/api, pinned in go.mod at the
// version k8s.io/cli-runtime and k8s.io/kubectl v0.37.2 build with), so every field of
// a kustomization works here as with kubectl.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// loadKustomization returns the objects that `kubectl apply -k dir` applies, in the
// order it applies them.
func loadKustomization(dir string) ([]*unstructured.Unstructured, error) {
	opts := krusty.MakeDefaultOptions()
	opts.Reorder = krusty.ReorderOptionLegacy // as kubectl's -k
	m, err := krusty.MakeKustomizer(opts).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	rendered, err := m.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build %s: %w", dir, err)
	}
	return readObjects(dir, rendered)
}

func objectID(o *unstructured.Unstructured) string {
	return o.GroupVersionKind().GroupKind().String() + " " + o.GetNamespace() + "/" + o.GetName()
}

// readObjects decodes every YAML document of raw (from source) that holds an object.
func readObjects(source string, raw []byte) ([]*unstructured.Unstructured, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	var objs []*unstructured.Unstructured
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", source, err)
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", source, err)
		}
		if s := strings.TrimSpace(string(js)); s == "null" || s == "" {
			continue // only comments
		}
		o := &unstructured.Unstructured{}
		if err := o.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("%s: %w", source, err)
		}
		objs = append(objs, o)
	}
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
