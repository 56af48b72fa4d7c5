package sim

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// domain is a simulated libvirt domain: the guest of a VMI, running in one
// virt-launcher pod.
type domain struct {
	vmiKey  string
	vmiUID  types.UID
	node    string
	podUID  types.UID
	podName string

	shuttingDown bool
	offAt        time.Time // when the guest is off
	forced       bool      // the guest did not power off in time: destroyed
}

// migrationRun is the simulator's memory of one live migration.
type migrationRun struct {
	vmiUID   types.UID
	attempt  int // 0-based count of this VMI's migrations
	failures int
	duration time.Duration
	started  time.Time
}

// guestInPodLocked reports whether a guest runs in the pod (virt-launcher then
// handles SIGTERM by shutting the guest down).
func (s *Sim) guestInPodLocked(podUID types.UID) bool {
	for _, d := range s.domains {
		if d.podUID == podUID {
			return true
		}
	}
	return false
}

// syncVMI is the virt-handler of node. It handles the VMIs whose node it is
// (vmiNode); a key it finds another node's now (a migration handed the VMI over)
// was queued there by the update that moved it. One VMI is synced by one node at a
// time (vmiLock): the source's sync that hands a migration over writes the VMI, then
// moves the guest to the target pod; the target's must not run in between.
func (s *Sim) syncVMI(ctx context.Context, node, key string) error {
	unlock := s.vmiLock(key)
	defer unlock()
	obj, exists, err := s.vmis.GetStore().GetByKey(key)
	if err != nil || !exists {
		return err
	}
	vmi := obj.(*kubevirtv1.VirtualMachineInstance)
	if s.vmiNode(vmi) != node {
		return nil
	}
	switch vmi.Status.Phase {
	case kubevirtv1.Scheduled:
		return s.startGuest(ctx, vmi)
	case kubevirtv1.Running:
		return s.runGuest(ctx, key, vmi)
	case kubevirtv1.Succeeded, kubevirtv1.Failed:
		s.guestGone(vmi)
	}
	return nil
}

// vmiLock locks the VMI of key against the other nodes' virt-handler workers (a
// queue already keeps a key from two of its own workers); it returns the unlock.
func (s *Sim) vmiLock(key string) func() {
	s.mu.Lock()
	mu := s.vmiLocks[key]
	if mu == nil {
		mu = &sync.Mutex{}
		s.vmiLocks[key] = mu
	}
	s.mu.Unlock()
	mu.Lock()
	return mu.Unlock
}

// startGuest starts the guest of a VMI that virt-controller handed over
// (phase Scheduled, status.nodeName set, virt-launcher pod running).
func (s *Sim) startGuest(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance) error {
	node := vmi.Status.NodeName
	if s.managed(node) == nil {
		return nil
	}
	pod := s.launcherPod(vmi, node)
	if pod == nil {
		return nil // virt-controller fails the VMI if its pod is really gone
	}
	started, exited := s.processes(pod)
	if vmi.DeletionTimestamp != nil || pod.DeletionTimestamp != nil || podTerminal(pod) || exited {
		// virt-launcher went away before the guest started.
		return s.updateVMI(ctx, vmi, func(v *kubevirtv1.VirtualMachineInstance) {
			setPhase(v, kubevirtv1.Failed)
		})
	}
	if !started {
		return nil // the kubelet has not started it yet; its pod event requeues us
	}
	s.mu.Lock()
	if s.domains[vmi.UID] == nil {
		key, _ := metaKeyVMI(vmi)
		s.domains[vmi.UID] = &domain{vmiKey: key, vmiUID: vmi.UID, node: node, podUID: pod.UID, podName: pod.Name}
	}
	s.mu.Unlock()
	err := s.updateVMI(ctx, vmi, func(v *kubevirtv1.VirtualMachineInstance) {
		setPhase(v, kubevirtv1.Running)
		if v.Labels == nil {
			v.Labels = map[string]string{}
		}
		v.Labels[kubevirtv1.NodeNameLabel] = node
		v.Status.NodeName = node
		v.Status.SelinuxContext = "none"
		refreshConditions(v)
	})
	if err == nil {
		s.log.WithFields(map[string]any{"vmi": vmi.Namespace + "/" + vmi.Name, "node": node}).Info("virt-handler: guest running")
	}
	return err
}

// runGuest keeps a running VMI's status, shuts its guest down when asked and
// drives its migration.
func (s *Sim) runGuest(ctx context.Context, key string, vmi *kubevirtv1.VirtualMachineInstance) error {
	node := vmi.Status.NodeName
	if s.managed(node) == nil {
		return nil
	}
	s.mu.Lock()
	var d domain
	dp := s.domains[vmi.UID]
	if dp != nil {
		d = *dp
	}
	s.mu.Unlock()
	log := s.log.WithField("vmi", key)
	if dp == nil {
		// No guest on the node (it rebooted): virt-handler finds no domain for a
		// Running VMI and reports it Failed.
		log.Info("virt-handler: guest is gone, VMI failed")
		return s.updateVMI(ctx, vmi, func(v *kubevirtv1.VirtualMachineInstance) { setPhase(v, kubevirtv1.Failed) })
	}
	pod := s.getPod(vmi.Namespace, d.podName)
	running := false
	if pod != nil && pod.UID == d.podUID {
		started, exited := s.processes(pod)
		running = started && !exited
	}
	if !running {
		// virt-launcher died under the guest.
		log.Info("virt-handler: virt-launcher is gone, VMI failed")
		s.dropDomain(vmi.UID)
		return s.updateVMI(ctx, vmi, func(v *kubevirtv1.VirtualMachineInstance) { setPhase(v, kubevirtv1.Failed) })
	}

	var requeue time.Duration
	var after func()
	nv := vmi.DeepCopy()
	if vmi.DeletionTimestamp != nil || pod.DeletionTimestamp != nil {
		offAt, forced := s.shutdown(vmi, dp)
		if ms := nv.Status.MigrationState; migrationActive(ms) && ms.StartTimestamp != nil {
			failMigration(ms, "Live migration failed: the source virt-launcher is shutting down")
		}
		if left := time.Until(offAt); left > 0 {
			requeue = left
		} else {
			phase := kubevirtv1.Succeeded
			if forced {
				phase = kubevirtv1.Failed
			}
			setPhase(nv, phase)
			podUID := d.podUID
			after = func() {
				log.Infof("virt-handler: guest powered off, VMI %s", phase)
				s.dropDomain(vmi.UID)
				s.launcherExited(podUID, 0, reasonCompleted)
			}
		}
	} else {
		requeue, after = s.migrate(nv, d)
		refreshConditions(nv)
	}
	if !equality.Semantic.DeepEqual(vmi, nv) {
		if err := s.putVMI(ctx, nv); err != nil {
			return err
		}
	}
	if after != nil {
		after()
	}
	if requeue > 0 {
		s.toHandler(vmi, key, requeue)
	}
	return nil
}

// shutdown starts the guest's ACPI shutdown if needed and says when the guest
// is off, and whether it had to be destroyed.
func (s *Sim) shutdown(vmi *kubevirtv1.VirtualMachineInstance, d *domain) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !d.shuttingDown {
		grace := time.Duration(kubevirtv1.DefaultGracePeriodSeconds) * time.Second
		if g := vmi.Spec.TerminationGracePeriodSeconds; g != nil {
			grace = time.Duration(*g) * time.Second
		}
		dur := min(s.opts.ShutdownDuration, grace)
		if v, err := time.ParseDuration(vmi.Annotations[AnnotationShutdownDuration]); err == nil {
			dur = v
		}
		if dur > grace {
			dur, d.forced = grace, true
		}
		d.shuttingDown = true
		d.offAt = time.Now().Add(dur)
		s.log.WithField("vmi", d.vmiKey).Infof("virt-handler: shutting the guest down (%s)", dur)
	}
	return d.offAt, d.forced
}

// guestGone cleans up after a VMI that ended: its virt-launcher processes exit.
func (s *Sim) guestGone(vmi *kubevirtv1.VirtualMachineInstance) {
	s.dropDomain(vmi.UID)
	for _, pod := range s.vmiPods(vmi) {
		if s.managed(pod.Spec.NodeName) == nil || podTerminal(pod) {
			continue
		}
		if started, exited := s.processes(pod); started && !exited {
			s.launcherExited(pod.UID, 0, reasonCompleted)
		}
	}
}

func (s *Sim) dropDomain(uid types.UID) {
	s.mu.Lock()
	delete(s.domains, uid)
	s.mu.Unlock()
}

// migrationActive: handed over to virt-handler and not finished.
func migrationActive(ms *kubevirtv1.VirtualMachineInstanceMigrationState) bool {
	return ms != nil && ms.MigrationUID != "" && !ms.Completed && !ms.Failed
}

func failMigration(ms *kubevirtv1.VirtualMachineInstanceMigrationState, reason string) {
	ms.Failed = true
	ms.FailureReason = reason
	if ms.EndTimestamp == nil {
		ms.EndTimestamp = ptr.To(metav1.Now())
	}
}

// migrate takes the next step of a live migration, as the source and target
// virt-handlers do (pkg/virt-handler/migration-source.go, migration-target.go),
// one VMI write per step: prepare the target and start, transfer, hand the VMI
// over to the target, clean up once finished. It returns when to look again and
// what to do once the step is written.
func (s *Sim) migrate(v *kubevirtv1.VirtualMachineInstance, d domain) (time.Duration, func()) {
	ms := v.Status.MigrationState
	if ms == nil || ms.MigrationUID == "" {
		return 0, nil
	}
	log := s.log.WithFields(map[string]any{"vmi": d.vmiKey, "migration": ms.MigrationUID})
	if ms.SourceState != nil || ms.TargetState != nil {
		s.mu.Lock()
		warned := s.warned[v.UID]
		s.warned[v.UID] = true
		s.mu.Unlock()
		if !warned {
			log.Warn("virt-handler: decentralized migrations are not simulated")
		}
		return 0, nil
	}
	// Finished (by us, or by virt-controller when the target pod died before the
	// start).
	if ms.Completed || (ms.Failed && ms.EndTimestamp != nil) {
		s.migrationCleanup(v, log)
		return 0, nil
	}
	if ms.TargetNode == "" || v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] != ms.TargetNode {
		return 0, nil // not handed over to the handlers (yet)
	}
	if ms.EndTimestamp == nil && ms.SourceNode != v.Status.NodeName {
		return 0, nil // not our source
	}
	run := s.migrationRun(v, ms.MigrationUID)
	if ms.AbortRequested && ms.AbortStatus == "" {
		ms.AbortStatus = kubevirtv1.MigrationAbortSucceeded
		failMigration(ms, "Live migration aborted ")
		log.Info("virt-handler: migration aborted")
		return 0, nil
	}
	if !s.handlerRuns(ms.TargetNode) {
		return 0, nil // no virt-handler there, or it is stopped
	}
	target := s.getPod(v.Namespace, ms.TargetPod)
	targetUp := false
	if target != nil && target.DeletionTimestamp == nil && !podTerminal(target) {
		started, exited := s.processes(target)
		targetUp = started && !exited
	}
	if ms.TargetNodeAddress == "" || ms.StartTimestamp == nil {
		s.migrationStart(ms, run, targetUp, log)
		return 0, nil
	}
	if wait, busy := s.migrationTransfer(ms, run, targetUp, log); busy {
		return wait, nil
	}
	return 0, s.migrationHandover(v, d, target, log)
}

// migrationStart prepares the target (its migration proxy listens) and then,
// once that is written, starts the transfer on the source.
func (s *Sim) migrationStart(ms *kubevirtv1.VirtualMachineInstanceMigrationState, run *migrationRun, targetUp bool, log logrus.FieldLogger) {
	if !targetUp {
		return // the target's virt-launcher does not run (yet)
	}
	if ms.TargetNodeAddress == "" {
		ms.TargetNodeAddress = s.nodeIP(ms.TargetNode)
		ms.TargetDirectMigrationNodePorts = map[string]int{"40111": 0, "40112": 49152, "40113": 49153}
		log.Info("virt-handler: migration target prepared")
		return
	}
	ms.StartTimestamp = ptr.To(metav1.Now())
	ms.Mode = kubevirtv1.MigrationPreCopy
	s.mu.Lock()
	run.started = time.Now()
	s.mu.Unlock()
	log.Infof("virt-handler: migration started (attempt %d, %s)", run.attempt+1, run.duration)
}

// migrationTransfer runs the transfer: the incoming domain appears on the
// target, the memory is copied for the run's duration, and an injected failure
// ends it. It reports whether the transfer still runs (and when to look again);
// false means the target may take the VMI over.
func (s *Sim) migrationTransfer(ms *kubevirtv1.VirtualMachineInstanceMigrationState, run *migrationRun, targetUp bool, log logrus.FieldLogger) (time.Duration, bool) {
	switch {
	case !targetUp:
		failMigration(ms, "Live migration failed: the target virt-launcher pod went away")
		log.Info("virt-handler: migration failed, target pod gone")
		return 0, true
	case !ms.TargetNodeDomainDetected:
		ms.TargetNodeDomainDetected = true
		return 0, true
	}
	s.mu.Lock()
	started := run.started
	s.mu.Unlock()
	if started.IsZero() {
		started = ms.StartTimestamp.Time
	}
	if left := time.Until(started.Add(run.duration)); left > 0 {
		return left, true
	}
	if run.attempt < run.failures {
		failMigration(ms, fmt.Sprintf("Live migration failed: sim: injected failure (attempt %d of %d failing)",
			run.attempt+1, run.failures))
		log.Infof("virt-handler: migration failed as injected (attempt %d)", run.attempt+1)
		return 0, true
	}
	return 0, false
}

// migrationHandover moves the VMI to the target once the transfer is done: the
// domain runs there, the target takes the VMI over (node, labels), the source's
// virt-launcher exits, and the target marks the migration completed.
func (s *Sim) migrationHandover(v *kubevirtv1.VirtualMachineInstance, d domain, target *corev1.Pod, log logrus.FieldLogger) func() {
	ms := v.Status.MigrationState
	switch {
	case ms.TargetNodeDomainReadyTimestamp == nil:
		ms.TargetNodeDomainReadyTimestamp = ptr.To(metav1.Now())
		return nil
	case ms.EndTimestamp == nil:
		ms.EndTimestamp = ptr.To(metav1.Now())
		v.Labels[kubevirtv1.NodeNameLabel] = ms.TargetNode
		delete(v.Annotations, kubevirtv1.EvictionSourceAnnotation)
		v.Status.NodeName = ms.TargetNode
		v.Status.EvacuationNodeName = ""
		v.Status.MigrationTransport = kubevirtv1.MigrationTransportUnix
		v.Status.LauncherContainerImageVersion = ""
		targetNode, targetUID, targetName, sourceUID := ms.TargetNode, target.UID, target.Name, d.podUID
		return func() {
			s.mu.Lock()
			if dp := s.domains[v.UID]; dp != nil {
				dp.node, dp.podUID, dp.podName = targetNode, targetUID, targetName
			}
			s.mu.Unlock()
			log.Infof("virt-handler: migrated to %s", targetNode)
			// The source domain is gone: its virt-launcher exits.
			s.launcherExited(sourceUID, 0, reasonCompleted)
		}
	default:
		ms.Completed = true
		return nil
	}
}

// migrationCleanup is the target's clean-up after a finished migration
// (migration-target.go finalizeMigration): after a failure it signals its
// virt-launcher to exit; then it removes the VMI's migration-target label and
// annotation. The label goes only once the target pod is seen terminated, so
// that the VMI write that follows finds one active pod: KubeVirt's evacuation
// controller, which requeues a node on VMI and migration events but not on pod
// events, then creates the retry of a failed evacuation at once.
func (s *Sim) migrationCleanup(v *kubevirtv1.VirtualMachineInstance, log logrus.FieldLogger) {
	ms := v.Status.MigrationState
	if v.Labels[kubevirtv1.MigrationTargetNodeNameLabel] == "" {
		return
	}
	if ms.Failed {
		if p := s.getPod(v.Namespace, ms.TargetPod); p != nil && !podTerminal(p) {
			if started, exited := s.processes(p); started {
				if !exited {
					log.Info("virt-handler: migration failed, target virt-launcher told to clean up")
					s.launcherExited(p.UID, 0, reasonCompleted)
				}
				return // the pod's event requeues the VMI once the kubelet reported it
			}
		}
	}
	delete(v.Labels, kubevirtv1.MigrationTargetNodeNameLabel)
	delete(v.Annotations, kubevirtv1.CreateMigrationTarget)
}

// migrationRun returns the run of migration uid, counting a new attempt for
// the VMI the first time.
func (s *Sim) migrationRun(v *kubevirtv1.VirtualMachineInstance, uid types.UID) *migrationRun {
	s.mu.Lock()
	defer s.mu.Unlock()
	if run := s.migrations[uid]; run != nil {
		return run
	}
	run := &migrationRun{vmiUID: v.UID, attempt: s.attempts[v.UID], duration: s.opts.MigrationDuration}
	s.attempts[v.UID]++
	if d, err := time.ParseDuration(v.Annotations[AnnotationMigrationDuration]); err == nil && d >= 0 {
		run.duration = d
	}
	if n, err := strconv.Atoi(v.Annotations[AnnotationMigrationFailures]); err == nil {
		run.failures = n
	}
	s.migrations[uid] = run
	return run
}

// refreshConditions sets the conditions virt-handler owns.
func refreshConditions(v *kubevirtv1.VirtualMachineInstance) {
	cond, block := liveMigratable(v)
	setVMICondition(v, cond)
	setVMICondition(v, storageLiveMigratable(v))
	if block {
		v.Status.MigrationMethod = kubevirtv1.BlockMigration
	} else {
		v.Status.MigrationMethod = kubevirtv1.LiveMigration
	}
}

func setVMICondition(v *kubevirtv1.VirtualMachineInstance, c kubevirtv1.VirtualMachineInstanceCondition) {
	for i, old := range v.Status.Conditions {
		if old.Type != c.Type {
			continue
		}
		if old.Status != c.Status || old.Reason != c.Reason || old.Message != c.Message {
			v.Status.Conditions[i] = c
		}
		return
	}
	v.Status.Conditions = append(v.Status.Conditions, c)
}

func setPhase(v *kubevirtv1.VirtualMachineInstance, p kubevirtv1.VirtualMachineInstancePhase) {
	if v.Status.Phase == p {
		return
	}
	v.Status.Phase = p
	for _, t := range v.Status.PhaseTransitionTimestamps {
		if t.Phase == p {
			return
		}
	}
	v.Status.PhaseTransitionTimestamps = append(v.Status.PhaseTransitionTimestamps,
		kubevirtv1.VirtualMachineInstancePhaseTransitionTimestamp{Phase: p, PhaseTransitionTimestamp: metav1.Now()})
}

// updateVMI applies change to a copy of vmi and writes it if it changed. The
// VMI CRD has no status subresource: status is written with a plain update, as
// virt-handler's service account (KubeVirt's VMI mutator drops anyone else's
// status change).
func (s *Sim) updateVMI(ctx context.Context, vmi *kubevirtv1.VirtualMachineInstance,
	change func(*kubevirtv1.VirtualMachineInstance)) error {
	nv := vmi.DeepCopy()
	change(nv)
	if equality.Semantic.DeepEqual(vmi, nv) {
		return nil
	}
	return s.putVMI(ctx, nv)
}

func (s *Sim) putVMI(ctx context.Context, v *kubevirtv1.VirtualMachineInstance) error {
	err := s.handlerKV.Put().Namespace(v.Namespace).Resource(nodeinfo.ResourceVMIs).Name(v.Name).
		Body(v).Do(ctx).Error()
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("updating VMI %s/%s: %w", v.Namespace, v.Name, err)
	}
	return nil
}

func (s *Sim) getPod(ns, name string) *corev1.Pod {
	if name == "" {
		return nil
	}
	obj, exists, err := s.pods.GetStore().GetByKey(ns + "/" + name)
	if err != nil || !exists {
		return nil
	}
	return obj.(*corev1.Pod)
}

// vmiPods returns the pods the VMI controls.
func (s *Sim) vmiPods(vmi *kubevirtv1.VirtualMachineInstance) []*corev1.Pod {
	objs, err := s.pods.GetIndexer().ByIndex(cache.NamespaceIndex, vmi.Namespace)
	if err != nil {
		return nil
	}
	var pods []*corev1.Pod
	for _, obj := range objs {
		pod := obj.(*corev1.Pod)
		if metav1.IsControlledBy(pod, vmi) {
			pods = append(pods, pod)
		}
	}
	return pods
}

// launcherPod returns the VMI's newest pod on node, as virt-controller's
// CurrentVMIPod picks it.
func (s *Sim) launcherPod(vmi *kubevirtv1.VirtualMachineInstance, node string) *corev1.Pod {
	var cur *corev1.Pod
	for _, pod := range s.vmiPods(vmi) {
		if pod.Spec.NodeName != node {
			continue
		}
		if cur == nil || cur.CreationTimestamp.Before(&pod.CreationTimestamp) {
			cur = pod
		}
	}
	return cur
}

func metaKeyVMI(vmi *kubevirtv1.VirtualMachineInstance) (string, error) {
	return vmi.Namespace + "/" + vmi.Name, nil
}
