package nodeinfo

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// Labels KubeVirt puts on what runs on a node.
const (
	// NodeNameLabel is on every VMI: the node it runs on.
	NodeNameLabel = kubevirtv1.NodeNameLabel
	// LauncherLabelSelector selects virt-launcher pods.
	LauncherLabelSelector = kubevirtv1.AppLabel + "=virt-launcher"
	// NotLauncherLabelSelector selects the other pods.
	NotLauncherLabelSelector = kubevirtv1.AppLabel + "!=virt-launcher"
)

// ViewOptions scope a View to one node.
type ViewOptions struct {
	// NodeName is the node the View watches.
	NodeName string
	// KubeVirtNamespace holds the KubeVirt CR and the legacy kubevirt-config ConfigMap.
	KubeVirtNamespace string
	// DrainTaintKey, when set, overrides the cluster's configuration (the flag).
	DrainTaintKey string
	// OnChange is called after every change to anything the View watches.
	OnChange func()
	// WithoutConfig leaves out the KubeVirt CR and the ConfigMap (for a caller that has
	// resolved the configuration already); Config then resolves from DrainTaintKey alone.
	WithoutConfig bool
}

// View is what is on one node and how the cluster configures node-agent, from
// informers scoped to that node: its Node object (field selector), its VMIs (the
// kubevirt.io/nodeName label), its virt-launcher pods (spec.nodeName and the
// kubevirt.io=virt-launcher label), the KubeVirt CR and the kubevirt-config
// ConfigMap in KubeVirt's namespace. Its traffic does not grow with the cluster. Its
// caches keep of a pod and a VMI only what the agent reads (keep.go).
type View struct {
	opts      ViewOptions
	kube      kubernetes.Interface
	kubevirt  rest.Interface
	informers map[string]cache.SharedIndexInformer

	mu       sync.Mutex
	listErrs map[string]error
	lastGood *Config
	handlers []func() // AddChangeHandler's
}

// NewView creates the informers; Run starts them.
func NewView(kube kubernetes.Interface, kubevirt rest.Interface, opts ViewOptions) *View {
	v := &View{opts: opts, kube: kube, kubevirt: kubevirt, informers: map[string]cache.SharedIndexInformer{}, listErrs: map[string]error{}}
	core := kube.CoreV1().RESTClient()
	byName := func(name string) func(*metav1.ListOptions) {
		return func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
		}
	}
	v.add("node", core, "nodes", "", &corev1.Node{}, stripManagedFields, byName(opts.NodeName))
	v.add("pods", core, "pods", "", &corev1.Pod{}, keepPodFields, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", opts.NodeName).String()
		o.LabelSelector = LauncherLabelSelector
	})
	if !opts.WithoutConfig {
		v.add("configmap", core, "configmaps", opts.KubeVirtNamespace, &corev1.ConfigMap{}, stripManagedFields, byName(LegacyConfigMapName))
	}
	v.add("vmis", kubevirt, ResourceVMIs, "", &kubevirtv1.VirtualMachineInstance{}, keepVMIFields, func(o *metav1.ListOptions) {
		o.LabelSelector = labels.SelectorFromSet(labels.Set{NodeNameLabel: opts.NodeName}).String()
	})
	if !opts.WithoutConfig {
		v.add("kubevirt", kubevirt, ResourceKubeVirts, opts.KubeVirtNamespace, &kubevirtv1.KubeVirt{}, stripManagedFields, func(*metav1.ListOptions) {})
	}
	return v
}

func (v *View) add(name string, client cache.Getter, resource, namespace string, obj runtime.Object, keep cache.TransformFunc, tweak func(*metav1.ListOptions)) {
	lw := cache.NewFilteredListWatchFromClient(client, resource, namespace, tweak)
	inf := cache.NewSharedIndexInformer(lw, obj, 0, cache.Indexers{})
	_ = inf.SetTransform(keep) // before Run: cannot fail
	_ = inf.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		v.mu.Lock()
		v.listErrs[name] = err
		v.mu.Unlock()
		v.notify()
	})
	changed := func() {
		v.mu.Lock()
		delete(v.listErrs, name)
		v.mu.Unlock()
		v.notify()
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { changed() },
		UpdateFunc: func(any, any) { changed() },
		DeleteFunc: func(any) { changed() },
	})
	v.informers[name] = inf
}

// AddChangeHandler has f called after every change to anything the View watches (as
// OnChange is). Add handlers before Run.
func (v *View) AddChangeHandler(f func()) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.handlers = append(v.handlers, f)
}

// notify calls OnChange and the change handlers.
func (v *View) notify() {
	if v.opts.OnChange != nil {
		v.opts.OnChange()
	}
	v.mu.Lock()
	handlers := v.handlers
	v.mu.Unlock()
	for _, f := range handlers {
		f()
	}
}

// Run starts the informers; they stop when ctx ends.
func (v *View) Run(ctx context.Context) {
	for _, inf := range v.informers {
		go inf.RunWithContext(ctx)
	}
}

// Synced says whether every informer has its first full list; when not, why not
// (for example the KubeVirt CRDs are not installed).
func (v *View) Synced() (bool, string) {
	var waiting []string
	for name, inf := range v.informers {
		if inf.HasSynced() {
			continue
		}
		v.mu.Lock()
		err := v.listErrs[name]
		v.mu.Unlock()
		if err != nil {
			waiting = append(waiting, fmt.Sprintf("%s: %v", name, err))
		} else {
			waiting = append(waiting, name+": not listed yet")
		}
	}
	if len(waiting) == 0 {
		return true, ""
	}
	sort.Strings(waiting)
	return false, fmt.Sprintf("waiting for the first list of %v", waiting)
}

// WaitForSync waits until every informer has synced or ctx ends.
func (v *View) WaitForSync(ctx context.Context) error {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, why := v.Synced()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", why, ctx.Err())
		case <-tick.C:
		}
	}
}

// LauncherPodsListed reports whether the virt-launcher pods of this node have been listed:
// then LauncherPods is complete even while other informers (the VMIs, refused by RBAC or
// without KubeVirt's CRD) are not.
func (v *View) LauncherPodsListed() bool { return v.informers["pods"].HasSynced() }

// Node returns this node's object.
func (v *View) Node() (*corev1.Node, error) {
	objs := v.informers["node"].GetStore().List()
	if len(objs) == 0 {
		return nil, apierrors.NewNotFound(corev1.Resource("nodes"), v.opts.NodeName)
	}
	return objs[0].(*corev1.Node), nil
}

// NodeName is the node this View watches.
func (v *View) NodeName() string { return v.opts.NodeName }

// VMIs returns the VMIs labelled as running on this node, sorted by namespace/name.
func (v *View) VMIs() []*kubevirtv1.VirtualMachineInstance {
	var out []*kubevirtv1.VirtualMachineInstance
	for _, obj := range v.informers["vmis"].GetStore().List() {
		out = append(out, obj.(*kubevirtv1.VirtualMachineInstance))
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name
	})
	return out
}

// LauncherPods returns the virt-launcher pods scheduled on this node.
func (v *View) LauncherPods() []*corev1.Pod {
	var out []*corev1.Pod
	for _, obj := range v.informers["pods"].GetStore().List() {
		out = append(out, obj.(*corev1.Pod))
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name
	})
	return out
}

// Config resolves the configuration from what the View holds. When a source is
// unusable, the last good configuration is kept and the error is returned with it.
func (v *View) Config() (Config, error) {
	var kvs []*kubevirtv1.KubeVirt
	var cm *corev1.ConfigMap
	if !v.opts.WithoutConfig {
		for _, obj := range v.informers["kubevirt"].GetStore().List() {
			kvs = append(kvs, obj.(*kubevirtv1.KubeVirt))
		}
		if objs := v.informers["configmap"].GetStore().List(); len(objs) > 0 {
			cm = objs[0].(*corev1.ConfigMap)
		}
	}
	kv := OldestKubeVirt(kvs)
	cfg, err := ResolveConfig(v.opts.DrainTaintKey, kv, cm)
	v.mu.Lock()
	defer v.mu.Unlock()
	var use Config
	use, v.lastGood = keepLastGood(cfg, err, v.lastGood)
	return use, err
}

// keepLastGood decides which configuration to use when err says some source is
// unusable: when that source would decide the key (it comes before the one the key was
// taken from), the last good key stays in force; the cluster's eviction strategy is
// taken as it is now (it is checked per VM). It returns the configuration to use and
// the new last good one.
func keepLastGood(cfg Config, err error, lastGood *Config) (Config, *Config) {
	if err == nil || !Outranks(err, cfg.DrainTaintKeySource) {
		return cfg, &cfg
	}
	if lastGood == nil {
		return cfg, nil
	}
	kept := *lastGood
	kept.ClusterEvictionStrategy = cfg.ClusterEvictionStrategy
	return kept, lastGood
}

// sourceRank orders the configuration sources, the first winning.
func sourceRank(source string) int {
	switch source {
	case SourceFlag:
		return 0
	case SourceKubeVirt:
		return 1
	case SourceConfigMap:
		return 2
	default:
		return 3
	}
}

// Outranks says whether an unusable source in err comes before the source the key was
// taken from: then the key in use is a fallback the operator did not ask for.
func Outranks(err error, used string) bool {
	var joined interface{ Unwrap() []error }
	errs := []error{err}
	if errors.As(err, &joined) {
		errs = joined.Unwrap()
	}
	for _, e := range errs {
		var ce *ConfigError
		if errors.As(e, &ce) && sourceRank(ce.Source) < sourceRank(used) {
			return true
		}
	}
	return false
}

// NamespaceMigrations lists the migrations of a namespace. The engine reads them once
// per sync, for the VMs it is about to migrate, not once per VM: there is no selector
// that scopes migrations to a node (KubeVirt labels them with kubevirt.io/vmi-name only
// once its controller saw them), and a watch of every namespace's migrations would grow
// with the cluster.
func (v *View) NamespaceMigrations(ctx context.Context, namespace string) ([]kubevirtv1.VirtualMachineInstanceMigration, error) {
	list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := v.kubevirt.Get().Namespace(namespace).Resource(ResourceMigrations).Do(ctx).Into(list); err != nil {
		return nil, fmt.Errorf("listing the migrations in %s: %w", namespace, err)
	}
	return list.Items, nil
}

// VMIMigrations lists the migrations of VMIs of one namespace (MigrationsOf).
func (v *View) VMIMigrations(ctx context.Context, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
	return MigrationsOf(ctx, v.kubevirt, namespace, vmis)
}

// MigrationTargetPods lists the target pods of one migration (MigrationTargetPodsOf).
func (v *View) MigrationTargetPods(ctx context.Context, namespace string, migration types.UID) ([]corev1.Pod, error) {
	return MigrationTargetPodsOf(ctx, v.kube, namespace, migration)
}

// MigrationTargetPodsOf lists the target pods of one migration: the virt-launcher pods
// KubeVirt's migration controller labels kubevirt.io/migrationJobUID with the
// migration's UID. A target pod waiting for a node is on no node, out of the
// informers' sight: it is read only while a migration of the node waits for it.
func MigrationTargetPodsOf(ctx context.Context, kube kubernetes.Interface, namespace string, migration types.UID) ([]corev1.Pod, error) {
	list, err := kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{
		LabelSelector: labels.SelectorFromSet(labels.Set{kubevirtv1.MigrationJobLabel: string(migration)}).String(),
	})
	if err != nil {
		return nil, fmt.Errorf("listing the target pods of migration %s in %s: %w", migration, namespace, err)
	}
	return list.Items, nil
}

// maxNamesPerList bounds the VMI names in one label selector of MigrationsOf: a node
// with hundreds of migrating VMs in one namespace asks in a few requests of a bounded
// URL (63 characters a name at most).
const maxNamesPerList = 100

// MigrationsOf lists the migrations of VMIs of one namespace with a kubevirt.io/v1
// client, by VMI name: selected by the kubevirt.io/vmi-name label that KubeVirt puts on
// every migration (virt-api's mutating webhook at creation, virt-controller's migration
// controller otherwise; `virtctl migrate-cancel` finds them the same way), the VMIs of
// the namespace in one request (`kubevirt.io/vmi-name in (...)`, maxNamesPerList names
// a request), and checked against spec.vmiName. A name that cannot be a label value
// (over 63 characters) can be on no migration's label: it is left out of the selector
// and has none.
func MigrationsOf(ctx context.Context, kubevirt rest.Interface, namespace string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
	out := map[string][]kubevirtv1.VirtualMachineInstanceMigration{}
	var names []string
	for _, name := range vmis {
		if len(validation.IsValidLabelValue(name)) == 0 {
			names = append(names, name)
		}
	}
	for chunk := range slices.Chunk(names, maxNamesPerList) {
		req, err := labels.NewRequirement(kubevirtv1.MigrationSelectorLabel, selection.In, chunk)
		if err != nil {
			return nil, fmt.Errorf("selecting the migrations of %d VMIs in %s: %w", len(chunk), namespace, err)
		}
		list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
		if err := kubevirt.Get().Namespace(namespace).Resource(ResourceMigrations).
			Param("labelSelector", labels.NewSelector().Add(*req).String()).
			Do(ctx).Into(list); err != nil {
			return nil, fmt.Errorf("listing the migrations of %d VMIs in %s: %w", len(chunk), namespace, err)
		}
		for _, m := range list.Items {
			if m.Spec.VMIName == m.Labels[kubevirtv1.MigrationSelectorLabel] {
				out[m.Spec.VMIName] = append(out[m.Spec.VMIName], m)
			}
		}
	}
	return out, nil
}

// ErrNotSynced is returned while the View has not listed everything yet.
var ErrNotSynced = errors.New("the node's view is not synced yet")
