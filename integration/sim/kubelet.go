package sim

import (
	"context"
	"crypto/sha256"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
)

// podRuntime is the simulated container runtime's state of one pod.
type podRuntime struct {
	key      string
	uid      types.UID
	node     string
	ip       string
	started  metav1.Time
	restarts int32

	// exited: every container has terminated with exitCode/reason.
	exited     bool
	exitCode   int32
	exitReason string
	exitMsg    string
	finished   metav1.Time

	// lost: the node rebooted and the containers are gone.
	lost bool
}

// Container exit reasons as the kubelet reports them.
const (
	reasonCompleted = "Completed"
	reasonError     = "Error"
	reasonUnknown   = "ContainerStatusUnknown"
)

// syncPod is the kubelet of node: it runs the pods bound to it.
func (s *Sim) syncPod(ctx context.Context, node, key string) error {
	obj, exists, err := s.pods.GetStore().GetByKey(key)
	if err != nil || !exists {
		return err
	}
	pod := obj.(*corev1.Pod)
	if pod.Spec.NodeName != node || !s.kubeletRuns(node) {
		return nil // not simulated here, or its kubelet is stopped
	}
	if podTerminal(pod) {
		if pod.DeletionTimestamp != nil {
			return s.finalizePod(ctx, pod)
		}
		return nil
	}

	rt := s.runtime(pod)
	if rt == nil {
		if pod.DeletionTimestamp != nil {
			// Deleted before it ever ran.
			return s.finalizePod(ctx, pod)
		}
		if rt, err = s.startPod(pod); err != nil {
			return err
		}
	}

	s.mu.Lock()
	if rt.lost {
		rt.lost = false
		if pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			s.exitLocked(rt, 137, reasonUnknown, "The container could not be located when the pod was terminated")
		} else {
			rt.restarts++
			rt.started = metav1.Now().Rfc3339Copy()
		}
	}
	if pod.DeletionTimestamp != nil && !rt.exited {
		if s.guestInPodLocked(pod.UID) {
			// virt-launcher shuts the guest down and exits by itself; the kubelet
			// kills it when the grace period ends.
			if left := time.Until(pod.DeletionTimestamp.Time); left > 0 {
				s.toKubeletLocked(node, key, left+50*time.Millisecond)
			} else {
				s.exitLocked(rt, 137, reasonError, "")
			}
		} else {
			// Other processes exit on SIGTERM.
			s.exitLocked(rt, 0, reasonCompleted, "")
		}
	}
	exited := rt.exited
	np := pod.DeepCopy()
	s.fillStatusLocked(np, rt)
	s.mu.Unlock()

	if !equality.Semantic.DeepEqual(pod.Status, np.Status) {
		if _, err := s.kube.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, np, metav1.UpdateOptions{}); err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("writing the status of pod %s: %w", key, err)
		}
	}
	if exited && pod.DeletionTimestamp != nil {
		return s.finalizePod(ctx, pod)
	}
	return nil
}

// finalizePod deletes a terminated pod with grace 0, as the kubelet does once
// its containers are gone.
func (s *Sim) finalizePod(ctx context.Context, pod *corev1.Pod) error {
	err := s.kube.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To[int64](0),
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("deleting pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	if err == nil {
		s.log.WithField("pod", pod.Namespace+"/"+pod.Name).Debug("kubelet: pod finalized")
	}
	return nil
}

func (s *Sim) runtime(pod *corev1.Pod) *podRuntime {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.runtimes[pod.UID]
}

// processes reports whether the kubelet started the pod's containers and
// whether they have all exited since.
func (s *Sim) processes(pod *corev1.Pod) (started, exited bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rt := s.runtimes[pod.UID]
	if rt == nil {
		return false, false
	}
	return true, rt.exited
}

// startPod starts the pod's containers (no image is pulled) and gives it an IP.
func (s *Sim) startPod(pod *corev1.Pod) (*podRuntime, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sn := s.simNodes[pod.Spec.NodeName]
	if sn == nil {
		return nil, fmt.Errorf("node %s is not simulated", pod.Spec.NodeName)
	}
	ip := ""
	if pod.Spec.HostNetwork {
		ip = sn.internalIP
	} else {
		for range 253 {
			sn.nextHost = sn.nextHost%253 + 1
			candidate := fmt.Sprintf("10.244.%d.%d", sn.index, sn.nextHost+1)
			if !sn.usedIPs[candidate] {
				ip = candidate
				sn.usedIPs[ip] = true
				break
			}
		}
		if ip == "" {
			return nil, fmt.Errorf("node %s has no free pod IP", sn.name)
		}
	}
	key, _ := cache.MetaNamespaceKeyFunc(pod)
	rt := &podRuntime{key: key, uid: pod.UID, node: sn.name, ip: ip, started: metav1.Now().Rfc3339Copy()}
	s.runtimes[pod.UID] = rt
	s.log.WithFields(map[string]any{"pod": key, "node": sn.name, "ip": ip}).Debug("kubelet: pod started")
	return rt, nil
}

// launcherExited records that the processes of a pod exited (virt-launcher ends
// with its guest) and lets the kubelet report it.
func (s *Sim) launcherExited(podUID types.UID, code int32, reason string) {
	s.mu.Lock()
	rt := s.runtimes[podUID]
	if rt != nil && !rt.exited {
		s.exitLocked(rt, code, reason, "")
	}
	s.mu.Unlock()
	if rt != nil {
		s.toKubelet(rt.node, rt.key, 0)
	}
}

func (s *Sim) exitLocked(rt *podRuntime, code int32, reason, msg string) {
	rt.exited, rt.exitCode, rt.exitReason, rt.exitMsg = true, code, reason, msg
	rt.finished = metav1.Now().Rfc3339Copy()
}

// fillStatusLocked writes the kubelet's view of the pod into its status,
// keeping conditions others own (readiness gates, DisruptionTarget).
func (s *Sim) fillStatusLocked(pod *corev1.Pod, rt *podRuntime) {
	st := &pod.Status
	sn := s.simNodes[rt.node]
	if rt.exited {
		st.Phase = corev1.PodSucceeded
		if rt.exitCode != 0 {
			st.Phase = corev1.PodFailed
		}
	} else {
		st.Phase = corev1.PodRunning
	}
	if sn != nil {
		st.HostIP = sn.internalIP
		st.HostIPs = []corev1.HostIP{{IP: sn.internalIP}}
	}
	st.PodIP = rt.ip
	st.PodIPs = []corev1.PodIP{{IP: rt.ip}}
	if st.StartTime == nil {
		st.StartTime = ptr.To(rt.started)
	}
	st.ObservedGeneration = pod.Generation

	id := func(name string, restarts int32) string {
		sum := sha256.Sum256([]byte(fmt.Sprintf("%s/%s/%d", rt.uid, name, restarts)))
		return fmt.Sprintf("containerd://%x", sum)
	}
	st.InitContainerStatuses = nil
	for _, c := range pod.Spec.InitContainers {
		st.InitContainerStatuses = append(st.InitContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: imageID(c.Image), ContainerID: id(c.Name, 0),
			Ready: true, Started: ptr.To(false),
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
				ExitCode: 0, Reason: reasonCompleted, StartedAt: rt.started, FinishedAt: rt.started,
				ContainerID: id(c.Name, 0)}},
		})
	}
	st.ContainerStatuses = nil
	for _, c := range pod.Spec.Containers {
		cs := corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: imageID(c.Image), ContainerID: id(c.Name, rt.restarts),
			RestartCount: rt.restarts,
		}
		if rt.exited {
			cs.Started = ptr.To(false)
			cs.State.Terminated = &corev1.ContainerStateTerminated{
				ExitCode: rt.exitCode, Reason: rt.exitReason, Message: rt.exitMsg,
				StartedAt: rt.started, FinishedAt: rt.finished, ContainerID: cs.ContainerID,
			}
		} else {
			cs.Ready, cs.Started = true, ptr.To(true)
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: rt.started}
		}
		st.ContainerStatuses = append(st.ContainerStatuses, cs)
	}

	now := metav1.Now().Rfc3339Copy()
	cond := func(t corev1.PodConditionType, ok bool, reason, msg string) {
		c := corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now,
			ObservedGeneration: pod.Generation}
		if !ok {
			c.Status, c.Reason, c.Message = corev1.ConditionFalse, reason, msg
		}
		setPodCondition(st, c)
	}
	running := !rt.exited
	cond(corev1.PodReadyToStartContainers, running, "", "")
	cond(corev1.PodInitialized, true, "", "")
	if running {
		cond(corev1.ContainersReady, true, "", "")
		gatesOK, gateMsg := readinessGatesReady(pod)
		cond(corev1.PodReady, gatesOK, "ReadinessGatesNotReady", gateMsg)
	} else {
		cond(corev1.ContainersReady, false, "PodCompleted", "")
		cond(corev1.PodReady, false, "PodCompleted", "")
	}
	cond(corev1.PodScheduled, true, "", "")
}

// readinessGatesReady reports whether every readiness gate's condition is True
// (virt-launcher pods carry kubevirt.io/virtual-machine-unpaused, which
// virt-controller sets).
func readinessGatesReady(pod *corev1.Pod) (bool, string) {
	for _, g := range pod.Spec.ReadinessGates {
		found := false
		for _, c := range pod.Status.Conditions {
			if c.Type == g.ConditionType {
				found = true
				if c.Status != corev1.ConditionTrue {
					return false, fmt.Sprintf("the status of pod readiness gate %q is not \"True\", but %s", g.ConditionType, c.Status)
				}
			}
		}
		if !found {
			return false, fmt.Sprintf("corresponding condition of pod readiness gate %q does not exist.", g.ConditionType)
		}
	}
	return true, ""
}

func imageID(image string) string {
	sum := sha256.Sum256([]byte(image))
	return fmt.Sprintf("%s@sha256:%x", image, sum)
}

// setPodCondition replaces or appends a condition, keeping its transition time
// when its status does not change.
func setPodCondition(status *corev1.PodStatus, c corev1.PodCondition) {
	for i := range status.Conditions {
		if status.Conditions[i].Type != c.Type {
			continue
		}
		if status.Conditions[i].Status == c.Status && !status.Conditions[i].LastTransitionTime.IsZero() {
			c.LastTransitionTime = status.Conditions[i].LastTransitionTime
		}
		status.Conditions[i] = c
		return
	}
	status.Conditions = append(status.Conditions, c)
}
