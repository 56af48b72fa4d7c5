package sim

import (
	"context"
	"fmt"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// ContainerDiskImage is the containerDisk the helpers' VMs boot; no image is
// ever pulled.
const ContainerDiskImage = "quay.io/kubevirt/cirros-container-disk-demo:v1.8.0"

// LabelVMIRS selects the VMIs of a VMIRS made by NewVMIRS.
const LabelVMIRS = "sim.node-agent.test/vmirs"

// VMOption configures the VMI (or the VMI template) built by NewVMI, NewVM and
// NewVMIRS.
type VMOption func(*vmConfig)

type vmConfig struct {
	labels      map[string]string
	annotations map[string]string
	spec        kubevirtv1.VirtualMachineInstanceSpec
	runStrategy kubevirtv1.VirtualMachineRunStrategy
}

// WithRunStrategy sets a VM's runStrategy (default Always). Ignored by NewVMI
// and NewVMIRS.
func WithRunStrategy(rs kubevirtv1.VirtualMachineRunStrategy) VMOption {
	return func(c *vmConfig) { c.runStrategy = rs }
}

// WithEvictionStrategy sets spec.evictionStrategy.
func WithEvictionStrategy(es kubevirtv1.EvictionStrategy) VMOption {
	return func(c *vmConfig) { c.spec.EvictionStrategy = ptr.To(es) }
}

// WithNodeSelector adds to spec.nodeSelector (e.g. the pool label of the
// test's nodes).
func WithNodeSelector(sel map[string]string) VMOption {
	return func(c *vmConfig) {
		if c.spec.NodeSelector == nil {
			c.spec.NodeSelector = map[string]string{}
		}
		for k, v := range sel {
			c.spec.NodeSelector[k] = v
		}
	}
}

// WithTolerations adds to spec.tolerations.
func WithTolerations(t ...corev1.Toleration) VMOption {
	return func(c *vmConfig) { c.spec.Tolerations = append(c.spec.Tolerations, t...) }
}

// WithLabels adds labels to the VMI (the template's, for VMs and VMIRSs).
func WithLabels(l map[string]string) VMOption {
	return func(c *vmConfig) {
		for k, v := range l {
			c.labels[k] = v
		}
	}
}

// WithAnnotations adds annotations to the VMI (the template's, for VMs and VMIRSs).
func WithAnnotations(a map[string]string) VMOption {
	return func(c *vmConfig) {
		for k, v := range a {
			c.annotations[k] = v
		}
	}
}

// WithMigrationDuration sets the AnnotationMigrationDuration knob.
func WithMigrationDuration(d time.Duration) VMOption {
	return WithAnnotations(map[string]string{AnnotationMigrationDuration: d.String()})
}

// WithMigrationFailures sets the AnnotationMigrationFailures knob: the first n
// migrations of the VMI fail.
func WithMigrationFailures(n int) VMOption {
	return WithAnnotations(map[string]string{AnnotationMigrationFailures: strconv.Itoa(n)})
}

// WithShutdownDuration sets the AnnotationShutdownDuration knob.
func WithShutdownDuration(d time.Duration) VMOption {
	return WithAnnotations(map[string]string{AnnotationShutdownDuration: d.String()})
}

// WithTerminationGracePeriod sets spec.terminationGracePeriodSeconds (default 1).
func WithTerminationGracePeriod(seconds int64) VMOption {
	return func(c *vmConfig) { c.spec.TerminationGracePeriodSeconds = ptr.To(seconds) }
}

// WithHostDevice adds a PCI host device (spec.domain.devices.hostDevices):
// virt-launcher then requests resourceName, which a node must advertise (see
// WithAllocatable), and the VMI is not live-migratable
// (HostDeviceNotLiveMigratable). KubeVirt's HostDevices feature gate must be on
// if virt-api validates VMIs.
func WithHostDevice(name, resourceName string) VMOption {
	return func(c *vmConfig) {
		c.spec.Domain.Devices.HostDevices = append(c.spec.Domain.Devices.HostDevices,
			kubevirtv1.HostDevice{Name: name, DeviceName: resourceName})
	}
}

// WithBridgeInterface connects the pod network with a bridge instead of
// masquerade: the VMI is not live-migratable (InterfaceNotLiveMigratable).
func WithBridgeInterface() VMOption {
	return func(c *vmConfig) {
		for i := range c.spec.Domain.Devices.Interfaces {
			c.spec.Domain.Devices.Interfaces[i].InterfaceBindingMethod =
				kubevirtv1.InterfaceBindingMethod{Bridge: &kubevirtv1.InterfaceBridge{}}
		}
	}
}

func newVMConfig(opts []VMOption) *vmConfig {
	c := &vmConfig{
		labels:      map[string]string{},
		annotations: map[string]string{},
		runStrategy: kubevirtv1.RunStrategyAlways,
		spec: kubevirtv1.VirtualMachineInstanceSpec{
			Domain: kubevirtv1.DomainSpec{
				Resources: kubevirtv1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("64Mi")},
				},
				Devices: kubevirtv1.Devices{
					Disks: []kubevirtv1.Disk{{
						Name:       "containerdisk",
						DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusVirtio}},
					}},
					Interfaces: []kubevirtv1.Interface{{
						Name:                   "default",
						InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}},
					}},
				},
			},
			Networks: []kubevirtv1.Network{{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}},
			Volumes: []kubevirtv1.Volume{{
				Name: "containerdisk",
				VolumeSource: kubevirtv1.VolumeSource{ContainerDisk: &kubevirtv1.ContainerDiskSource{
					Image: ContainerDiskImage,
				}},
			}},
			TerminationGracePeriodSeconds: ptr.To[int64](1),
		},
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// NewVMI builds a bare VMI: 64Mi of memory, a containerDisk, masquerade on the
// pod network, terminationGracePeriodSeconds 1.
func NewVMI(ns, name string, opts ...VMOption) *kubevirtv1.VirtualMachineInstance {
	c := newVMConfig(opts)
	return &kubevirtv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: c.labels, Annotations: c.annotations},
		Spec:       c.spec,
	}
}

// NewVM builds a VM (runStrategy Always unless WithRunStrategy) whose template
// is NewVMI's.
func NewVM(ns, name string, opts ...VMOption) *kubevirtv1.VirtualMachine {
	c := newVMConfig(opts)
	return &kubevirtv1.VirtualMachine{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: kubevirtv1.VirtualMachineSpec{
			RunStrategy: ptr.To(c.runStrategy),
			Template: &kubevirtv1.VirtualMachineInstanceTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: c.labels, Annotations: c.annotations},
				Spec:       c.spec,
			},
		},
	}
}

// NewVMIRS builds a VirtualMachineInstanceReplicaSet of replicas NewVMI-like
// VMIs, selected by LabelVMIRS=name.
func NewVMIRS(ns, name string, replicas int32, opts ...VMOption) *kubevirtv1.VirtualMachineInstanceReplicaSet {
	c := newVMConfig(opts)
	c.labels[LabelVMIRS] = name
	return &kubevirtv1.VirtualMachineInstanceReplicaSet{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: kubevirtv1.VirtualMachineInstanceReplicaSetSpec{
			Replicas: ptr.To(replicas),
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{LabelVMIRS: name}},
			Template: &kubevirtv1.VirtualMachineInstanceTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: c.labels, Annotations: c.annotations},
				Spec:       c.spec,
			},
		},
	}
}

// NewMigration builds a VirtualMachineInstanceMigration of the VMI vmiName; an
// empty name makes the API server generate one. virt-api's migration mutating
// webhook adds its finalizer and kubevirt.io/vmi-name label, as in a real cluster.
func NewMigration(ns, name, vmiName string) *kubevirtv1.VirtualMachineInstanceMigration {
	m := &kubevirtv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       kubevirtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmiName},
	}
	if name == "" {
		m.GenerateName = "sim-migration-"
	}
	return m
}

// Create creates a VM, VMI, VMIRS or VMIM and stores the created object in obj.
func (s *Sim) Create(ctx context.Context, obj runtime.Object) error {
	var res string
	switch obj.(type) {
	case *kubevirtv1.VirtualMachine:
		res = nodeinfo.ResourceVMs
	case *kubevirtv1.VirtualMachineInstance:
		res = nodeinfo.ResourceVMIs
	case *kubevirtv1.VirtualMachineInstanceReplicaSet:
		res = nodeinfo.ResourceVMIRSs
	case *kubevirtv1.VirtualMachineInstanceMigration:
		res = nodeinfo.ResourceMigrations
	default:
		return fmt.Errorf("sim.Create: unsupported type %T", obj)
	}
	meta, ok := obj.(metav1.Object)
	if !ok {
		return fmt.Errorf("sim.Create: %T has no metadata", obj)
	}
	if err := s.kv.Post().Namespace(meta.GetNamespace()).Resource(res).Body(obj).Do(ctx).Into(obj); err != nil {
		return fmt.Errorf("creating %s %s/%s: %w", res, meta.GetNamespace(), meta.GetName()+meta.GetGenerateName(), err)
	}
	return nil
}

// waitCtx applies Options.WaitTimeout when ctx has no deadline.
func (s *Sim) waitCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, s.opts.WaitTimeout)
}

// WaitForVMI waits until the VMI ns/name, as the simulator's informer sees it,
// satisfies cond; what describes cond in the error.
func (s *Sim) WaitForVMI(ctx context.Context, ns, name, what string,
	cond func(*kubevirtv1.VirtualMachineInstance) bool) (*kubevirtv1.VirtualMachineInstance, error) {
	ctx, cancel := s.waitCtx(ctx)
	defer cancel()
	var last *kubevirtv1.VirtualMachineInstance
	err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(context.Context) (bool, error) {
		obj, exists, err := s.vmis.GetStore().GetByKey(ns + "/" + name)
		if err != nil {
			return false, err
		}
		last = nil
		if exists {
			last = obj.(*kubevirtv1.VirtualMachineInstance)
		}
		return cond(last), nil
	})
	if err != nil {
		return nil, fmt.Errorf("waiting for VMI %s/%s to be %s (last seen: %s): %w", ns, name, what, describeVMI(last), err)
	}
	return last, nil
}

func describeVMI(v *kubevirtv1.VirtualMachineInstance) string {
	if v == nil {
		return "absent"
	}
	s := fmt.Sprintf("uid %s phase %q node %q", v.UID, v.Status.Phase, v.Status.NodeName)
	if ms := v.Status.MigrationState; ms != nil {
		s += fmt.Sprintf(" migration{target %q completed %t failed %t}", ms.TargetNode, ms.Completed, ms.Failed)
	}
	return s
}

// WaitForVMIRunning waits until the VMI is Running.
func (s *Sim) WaitForVMIRunning(ctx context.Context, ns, name string) (*kubevirtv1.VirtualMachineInstance, error) {
	return s.WaitForVMI(ctx, ns, name, "Running", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == kubevirtv1.Running
	})
}

// WaitForVMIPhase waits until the VMI is in phase.
func (s *Sim) WaitForVMIPhase(ctx context.Context, ns, name string, phase kubevirtv1.VirtualMachineInstancePhase) (*kubevirtv1.VirtualMachineInstance, error) {
	return s.WaitForVMI(ctx, ns, name, string(phase), func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == phase
	})
}

// WaitForVMIOnNode waits until the VMI runs on node with no migration under way.
func (s *Sim) WaitForVMIOnNode(ctx context.Context, ns, name, node string) (*kubevirtv1.VirtualMachineInstance, error) {
	return s.WaitForVMI(ctx, ns, name, "Running on "+node, func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.Phase == kubevirtv1.Running && v.Status.NodeName == node &&
			!migrationActive(v.Status.MigrationState)
	})
}

// WaitForNewVMI waits until a VMI ns/name other than oldUID (a VM's or VMIRS's
// replacement) is Running.
func (s *Sim) WaitForNewVMI(ctx context.Context, ns, name string, oldUID types.UID) (*kubevirtv1.VirtualMachineInstance, error) {
	return s.WaitForVMI(ctx, ns, name, "replaced and Running", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.UID != oldUID && v.Status.Phase == kubevirtv1.Running
	})
}

// WaitForVMIGone waits until the VMI does not exist.
func (s *Sim) WaitForVMIGone(ctx context.Context, ns, name string) error {
	_, err := s.WaitForVMI(ctx, ns, name, "gone", func(v *kubevirtv1.VirtualMachineInstance) bool { return v == nil })
	return err
}

// WaitForMigrationPhase waits until the VMIM ns/name reaches one of phases,
// reading it from the API server.
func (s *Sim) WaitForMigrationPhase(ctx context.Context, ns, name string,
	phases ...kubevirtv1.VirtualMachineInstanceMigrationPhase) (*kubevirtv1.VirtualMachineInstanceMigration, error) {
	ctx, cancel := s.waitCtx(ctx)
	defer cancel()
	var last kubevirtv1.VirtualMachineInstanceMigration
	err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		var m kubevirtv1.VirtualMachineInstanceMigration
		err := s.kv.Get().Namespace(ns).Resource(nodeinfo.ResourceMigrations).Name(name).Do(ctx).Into(&m)
		if apierrors.IsNotFound(err) || ctx.Err() != nil {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		last = m
		for _, p := range phases {
			if m.Status.Phase == p {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("waiting for migration %s/%s to reach %v (last phase %q): %w", ns, name, phases, last.Status.Phase, err)
	}
	return &last, nil
}

// LauncherPod returns the virt-launcher pod the VMI runs in (the newest of its
// pods on status.nodeName).
func (s *Sim) LauncherPod(ns, vmiName string) (*corev1.Pod, error) {
	obj, exists, err := s.vmis.GetStore().GetByKey(ns + "/" + vmiName)
	if err != nil {
		return nil, fmt.Errorf("reading VMI %s/%s: %w", ns, vmiName, err)
	}
	if !exists {
		return nil, fmt.Errorf("VMI %s/%s not found", ns, vmiName)
	}
	vmi := obj.(*kubevirtv1.VirtualMachineInstance)
	pod := s.launcherPod(vmi, vmi.Status.NodeName)
	if pod == nil {
		return nil, fmt.Errorf("no virt-launcher pod of VMI %s/%s on node %q", ns, vmiName, vmi.Status.NodeName)
	}
	return pod, nil
}

// WaitForPod waits until the pod ns/name, as the simulator's informer sees it
// (nil when absent), satisfies cond.
func (s *Sim) WaitForPod(ctx context.Context, ns, name, what string, cond func(*corev1.Pod) bool) (*corev1.Pod, error) {
	ctx, cancel := s.waitCtx(ctx)
	defer cancel()
	var last *corev1.Pod
	err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(context.Context) (bool, error) {
		last = s.getPod(ns, name)
		return cond(last), nil
	})
	if err != nil {
		state := "absent"
		if last != nil {
			state = fmt.Sprintf("phase %q node %q", last.Status.Phase, last.Spec.NodeName)
		}
		return nil, fmt.Errorf("waiting for pod %s/%s to be %s (last seen: %s): %w", ns, name, what, state, err)
	}
	return last, nil
}

// WaitForVMIs waits until the VMIs of namespace ns matching selector (a label
// selector such as LabelVMIRS+"=name"; empty for all) satisfy cond, and returns
// them.
func (s *Sim) WaitForVMIs(ctx context.Context, ns, selector, what string,
	cond func([]*kubevirtv1.VirtualMachineInstance) bool) ([]*kubevirtv1.VirtualMachineInstance, error) {
	sel, err := labels.Parse(selector)
	if err != nil {
		return nil, fmt.Errorf("parsing selector %q: %w", selector, err)
	}
	ctx, cancel := s.waitCtx(ctx)
	defer cancel()
	var last []*kubevirtv1.VirtualMachineInstance
	err = wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(context.Context) (bool, error) {
		objs, err := s.vmis.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
		if err != nil {
			return false, err
		}
		last = last[:0]
		for _, obj := range objs {
			v := obj.(*kubevirtv1.VirtualMachineInstance)
			if sel.Matches(labels.Set(v.Labels)) {
				last = append(last, v)
			}
		}
		return cond(last), nil
	})
	if err != nil {
		var seen []string
		for _, v := range last {
			seen = append(seen, v.Name+": "+describeVMI(v))
		}
		return nil, fmt.Errorf("waiting for VMIs %q in %s to be %s (last seen: %v): %w", selector, ns, what, seen, err)
	}
	return last, nil
}
