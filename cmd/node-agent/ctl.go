package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// ctlArgs are the flags the workstation commands (drain, undrain, status) share.
type ctlArgs struct {
	Kubeconfig        string
	Context           string
	KubeVirtNamespace string
	DrainTaintKey     string
}

func (a *ctlArgs) register(fs *flag.FlagSet) {
	fs.StringVar(&a.Kubeconfig, "kubeconfig", "", "kubeconfig file; default: $KUBECONFIG, else ~/.kube/config")
	fs.StringVar(&a.Context, "context", "", "kubeconfig context; default: the current one")
	fs.StringVar(&a.KubeVirtNamespace, "kubevirt-namespace", "kubevirt", "namespace of the KubeVirt CR and the legacy kubevirt-config ConfigMap")
	fs.StringVar(&a.DrainTaintKey, "drain-taint-key", "", "drain taint key; default: as the agents resolve it (KubeVirt CR, legacy ConfigMap, kubevirt.io/drain)")
}

// parseCtl parses a workstation command's flags and its one NODE argument.
func parseCtl(name string, args []string, out io.Writer, register func(*flag.FlagSet)) (ctlArgs, string, error) {
	var a ctlArgs
	fs := flag.NewFlagSet("node-agent "+name, flag.ContinueOnError)
	fs.SetOutput(out)
	a.register(fs)
	if register != nil {
		register(fs)
	}
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: node-agent %s NODE [flags]\n", name)
		fs.PrintDefaults()
	}
	// Flags may come before or after NODE, as kubectl allows.
	var node string
	for {
		if err := fs.Parse(args); err != nil {
			return a, "", err
		}
		if fs.NArg() == 0 {
			break
		}
		if node != "" {
			return a, "", fmt.Errorf("one node at a time: got %q and %q", node, fs.Arg(0))
		}
		node, args = fs.Arg(0), fs.Args()[1:]
	}
	if node == "" {
		return a, "", fmt.Errorf("which node? usage: node-agent %s NODE", name)
	}
	if a.DrainTaintKey != "" {
		if err := nodeinfo.ValidateTaintKey(a.DrainTaintKey); err != nil {
			return a, "", fmt.Errorf("--drain-taint-key: %w", err)
		}
	}
	return a, node, nil
}

// ctl is a workstation's connection to the cluster.
type ctl struct {
	args         ctlArgs
	kube         kubernetes.Interface
	kubevirt     rest.Interface
	subresources rest.Interface
}

func newCtl(a ctlArgs) (*ctl, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if a.Kubeconfig != "" {
		rules.ExplicitPath = a.Kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: a.Context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("loading the kubeconfig: %w", err)
	}
	cfg.UserAgent = "node-agent-ctl"
	c := &ctl{args: a}
	if c.kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	if c.kubevirt, err = nodeinfo.NewKubeVirtClient(cfg); err != nil {
		return nil, err
	}
	if c.subresources, err = nodeinfo.NewKubeVirtSubresourceClient(cfg); err != nil {
		return nil, err
	}
	return c, nil
}

// config resolves the drain taint key and the cluster's eviction strategy as the
// agents do. A configuration error is returned along with the configuration used.
func (c *ctl) config(ctx context.Context) (nodeinfo.Config, error) {
	kvs := &kubevirtv1.KubeVirtList{}
	if err := c.kubevirt.Get().Namespace(c.args.KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Do(ctx).Into(kvs); err != nil && !apierrors.IsNotFound(err) {
		return nodeinfo.Config{}, fmt.Errorf("reading the KubeVirt CR: %w", err)
	}
	var kv *kubevirtv1.KubeVirt
	for i := range kvs.Items {
		if kv == nil || kvs.Items[i].CreationTimestamp.Before(&kv.CreationTimestamp) {
			kv = &kvs.Items[i]
		}
	}
	cm, err := c.kube.CoreV1().ConfigMaps(c.args.KubeVirtNamespace).Get(ctx, nodeinfo.LegacyConfigMapName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		cm, err = nil, nil
	}
	if err != nil {
		return nodeinfo.Config{}, fmt.Errorf("reading the %s ConfigMap: %w", nodeinfo.LegacyConfigMapName, err)
	}
	return nodeinfo.ResolveConfig(c.args.DrainTaintKey, kv, cm)
}

// onNode lists the node's VMIs and virt-launcher pods, scoped as the agent's informers are.
func (c *ctl) onNode(ctx context.Context, node string) ([]*kubevirtv1.VirtualMachineInstance, []*corev1.Pod, error) {
	vmiList := &kubevirtv1.VirtualMachineInstanceList{}
	err := c.kubevirt.Get().Resource(nodeinfo.ResourceVMIs).
		Param("labelSelector", labels.SelectorFromSet(labels.Set{nodeinfo.NodeNameLabel: node}).String()).
		Do(ctx).Into(vmiList)
	if err != nil {
		return nil, nil, fmt.Errorf("listing the VMIs of node %s: %w", node, err)
	}
	podList, err := c.kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String(),
		LabelSelector: nodeinfo.LauncherLabelSelector,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("listing the virt-launcher pods of node %s: %w", node, err)
	}
	vmis := make([]*kubevirtv1.VirtualMachineInstance, len(vmiList.Items))
	for i := range vmiList.Items {
		vmis[i] = &vmiList.Items[i]
	}
	pods := make([]*corev1.Pod, len(podList.Items))
	for i := range podList.Items {
		pods[i] = &podList.Items[i]
	}
	return vmis, pods, nil
}

// view is what the workstation commands show of a node.
type view struct {
	Node     string           `json:"node"`
	TaintKey string           `json:"taintKey"`
	Draining bool             `json:"draining"`
	Cordoned bool             `json:"cordoned"`
	VMs      []agent.VMStatus `json:"vms"`
	// Predicted, per namespace/name, is how each VM ends up after a drain.
	Predicted map[string]string `json:"predicted,omitempty"`
	// PodsLeft counts the other evictable pods, when they are followed (--all-pods).
	PodsLeft int    `json:"podsLeft,omitempty"`
	Agent    string `json:"agentState,omitempty"`
}

// look reads the node and what is on it, with migration details for migrating VMs and,
// when predict is set, each VM's predicted end.
func (c *ctl) look(ctx context.Context, node string, cfg nodeinfo.Config, predict bool) (view, error) {
	n, err := c.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return view{}, fmt.Errorf("reading node %s: %w", node, err)
	}
	v := view{Node: node, TaintKey: cfg.DrainTaintKey, Cordoned: n.Spec.Unschedulable, Agent: n.Annotations[agent.AnnotationState]}
	for _, t := range n.Spec.Taints {
		if t.Key == cfg.DrainTaintKey && t.Effect == corev1.TaintEffectNoSchedule {
			v.Draining = true
		}
	}
	vmis, pods, err := c.onNode(ctx, node)
	if err != nil {
		return view{}, err
	}
	v.VMs = agent.Snapshot(node, v.Draining, cfg, vmis, pods)
	byKey := map[string]*kubevirtv1.VirtualMachineInstance{}
	for _, vmi := range vmis {
		byKey[vmi.Namespace+"/"+vmi.Name] = vmi
	}
	for i := range v.VMs {
		vm := &v.VMs[i]
		if vm.State == agent.StateMigrating {
			if m := c.activeMigration(ctx, vm.Namespace, vm.Name); m != nil {
				target := ""
				if vmi := byKey[vm.Namespace+"/"+vm.Name]; vmi != nil && vmi.Status.MigrationState != nil {
					target = vmi.Status.MigrationState.TargetNode
				}
				vm.Detail = fmt.Sprintf("migration %s %s", m.Name, m.Status.Phase)
				if target != "" {
					vm.Detail += " to " + target
				}
			}
		}
	}
	if predict {
		v.Predicted = map[string]string{}
		for _, vm := range v.VMs {
			vmi := byKey[vm.Namespace+"/"+vm.Name]
			if vmi == nil {
				continue
			}
			v.Predicted[vm.Namespace+"/"+vm.Name] = agent.PredictEnd(agent.Decide(vmi, cfg.ClusterEvictionStrategy), c.owner(ctx, vmi))
		}
	}
	return v, nil
}

func (c *ctl) owner(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) agent.Owner {
	kind, name := agent.OwnerOf(vmi)
	o := agent.Owner{Kind: kind}
	if kind == "VirtualMachine" {
		vm := &kubevirtv1.VirtualMachine{}
		if err := c.kubevirt.Get().Namespace(vmi.Namespace).Resource(nodeinfo.ResourceVMs).Name(name).Do(ctx).Into(vm); err == nil {
			if rs, err := vm.RunStrategy(); err == nil {
				o.RunStrategy = rs
			}
		}
	}
	return o
}

// activeMigration returns the VMI's unfinished migration, if any.
func (c *ctl) activeMigration(ctx context.Context, namespace, vmi string) *kubevirtv1.VirtualMachineInstanceMigration {
	list := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := c.kubevirt.Get().Namespace(namespace).Resource(nodeinfo.ResourceMigrations).Do(ctx).Into(list); err != nil {
		return nil
	}
	var found *kubevirtv1.VirtualMachineInstanceMigration
	for i := range list.Items {
		m := &list.Items[i]
		if m.Spec.VMIName == vmi && !m.IsFinal() && (found == nil || found.CreationTimestamp.Before(&m.CreationTimestamp)) {
			found = m
		}
	}
	return found
}

// setDrain taints and cordons the node (on), or removes the drain taint and the cordon.
func (c *ctl) setDrain(ctx context.Context, node, key string, on bool) error {
	return wait.ExponentialBackoffWithContext(ctx, wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: 6}, func(ctx context.Context) (bool, error) {
		n, err := c.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Errorf("reading node %s: %w", node, err)
		}
		var taints []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key != key {
				taints = append(taints, t)
			}
		}
		if on {
			taints = append(taints, corev1.Taint{Key: key, Value: "draining", Effect: corev1.TaintEffectNoSchedule})
		}
		n.Spec.Taints = taints
		n.Spec.Unschedulable = on
		_, err = c.kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("updating node %s: %w", node, err)
		}
		return true, nil
	})
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
