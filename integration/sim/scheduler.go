package sim

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
)

// The scheduler's filters follow kube-scheduler's default plugins:
// NodeUnschedulable, NodeName, NodeAffinity (nodeSelector and required node
// affinity), TaintToleration, NodeResourcesFit, InterPodAffinity (required
// terms). Scoring is reduced to "fewest pods first". Not simulated: topology
// spread constraints, preemption, volume binding, host ports.

const taintNodeUnschedulable = "node.kubernetes.io/unschedulable"

// enqueuePendingPods requeues every pod waiting for a node.
func (s *Sim) enqueuePendingPods() {
	for _, obj := range s.pods.GetStore().List() {
		pod := obj.(*corev1.Pod)
		if pod.Spec.NodeName == "" && pod.DeletionTimestamp == nil && !podTerminal(pod) {
			if key, err := metaKey(pod); err == nil {
				s.schedQ.Add(key)
			}
		}
	}
}

func metaKey(pod *corev1.Pod) (string, error) {
	if pod.Namespace == "" {
		return pod.Name, nil
	}
	return pod.Namespace + "/" + pod.Name, nil
}

// placedPod is a pod that occupies a node, as the scheduler's cache sees it.
type placedPod struct {
	pod  *corev1.Pod
	node *corev1.Node
}

// schedule binds the pod key to a node, or marks it unschedulable.
func (s *Sim) schedule(ctx context.Context, key string) error {
	obj, exists, err := s.pods.GetStore().GetByKey(key)
	if err != nil || !exists {
		return err
	}
	pod := obj.(*corev1.Pod)
	if pod.Spec.NodeName != "" || pod.DeletionTimestamp != nil || podTerminal(pod) ||
		len(pod.Spec.SchedulingGates) > 0 {
		return nil
	}
	if name := pod.Spec.SchedulerName; name != "" && name != s.opts.SchedulerName {
		return nil
	}
	s.mu.Lock()
	_, assumed := s.assumed[pod.UID]
	s.mu.Unlock()
	if assumed {
		return nil
	}

	nodes := s.simulatedNodes()
	placed := s.placedPods(nodes)
	reasons := map[string]int{}
	var feasible []*corev1.Node
	for _, n := range nodes {
		if reason := s.fits(pod, n, placed); reason != "" {
			reasons[reason]++
			continue
		}
		feasible = append(feasible, n)
	}
	if len(feasible) == 0 {
		return s.markUnschedulable(ctx, pod, unschedulableMessage(len(nodes), reasons))
	}
	count := map[string]int{}
	for _, p := range placed {
		count[p.node.Name]++
	}
	sort.SliceStable(feasible, func(i, j int) bool {
		ci, cj := count[feasible[i].Name], count[feasible[j].Name]
		if ci != cj {
			return ci < cj
		}
		return feasible[i].Name < feasible[j].Name
	})
	target := feasible[0].Name
	binding := &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: target},
	}
	if err := s.kube.CoreV1().Pods(pod.Namespace).Bind(ctx, binding, metav1.CreateOptions{}); err != nil {
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil // gone or already bound; the informer will tell
		}
		return fmt.Errorf("binding pod %s to %s: %w", key, target, err)
	}
	s.mu.Lock()
	s.assumed[pod.UID] = target
	s.mu.Unlock()
	s.log.WithFields(map[string]any{"pod": key, "node": target}).Info("scheduler: bound pod")
	return nil
}

// simulatedNodes returns the simulated nodes the informer knows, by name.
func (s *Sim) simulatedNodes() []*corev1.Node {
	var nodes []*corev1.Node
	for _, obj := range s.nodes.GetStore().List() {
		n := obj.(*corev1.Node)
		if s.managed(n.Name) != nil && n.DeletionTimestamp == nil {
			nodes = append(nodes, n)
		}
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Name < nodes[j].Name })
	return nodes
}

// placedPods returns the non-terminal pods on the given nodes, including pods
// bound by this scheduler that the informer does not show bound yet.
func (s *Sim) placedPods(nodes []*corev1.Node) []placedPod {
	byName := map[string]*corev1.Node{}
	for _, n := range nodes {
		byName[n.Name] = n
	}
	s.mu.Lock()
	assumed := make(map[types.UID]string, len(s.assumed))
	for k, v := range s.assumed {
		assumed[k] = v
	}
	s.mu.Unlock()
	var placed []placedPod
	for _, obj := range s.pods.GetStore().List() {
		p := obj.(*corev1.Pod)
		if podTerminal(p) {
			continue
		}
		nodeName := p.Spec.NodeName
		if nodeName == "" {
			nodeName = assumed[p.UID]
		}
		if n := byName[nodeName]; n != nil {
			placed = append(placed, placedPod{pod: p, node: n})
		}
	}
	return placed
}

func (s *Sim) markUnschedulable(ctx context.Context, pod *corev1.Pod, msg string) error {
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse &&
			c.Reason == corev1.PodReasonUnschedulable && c.Message == msg {
			return nil
		}
	}
	np := pod.DeepCopy()
	now := metav1.Now().Rfc3339Copy()
	setPodCondition(&np.Status, corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionFalse,
		Reason: corev1.PodReasonUnschedulable, Message: msg, LastTransitionTime: now, LastProbeTime: metav1.Time{}})
	if _, err := s.kube.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, np, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsNotFound(err) {
			return nil
		}
		return fmt.Errorf("marking pod %s/%s unschedulable: %w", pod.Namespace, pod.Name, err)
	}
	s.log.WithField("pod", pod.Namespace+"/"+pod.Name).Infof("scheduler: %s", msg)
	return nil
}

// unschedulableMessage words the reasons like kube-scheduler.
func unschedulableMessage(total int, reasons map[string]int) string {
	if total == 0 {
		return "0/0 nodes are available: no nodes available to schedule pods."
	}
	keys := make([]string, 0, len(reasons))
	for r := range reasons {
		keys = append(keys, r)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, r := range keys {
		parts = append(parts, fmt.Sprintf("%d %s", reasons[r], r))
	}
	return fmt.Sprintf("0/%d nodes are available: %s.", total, strings.Join(parts, ", "))
}

// fits returns why pod cannot run on node, or "".
func (s *Sim) fits(pod *corev1.Pod, node *corev1.Node, placed []placedPod) string {
	if node.Spec.Unschedulable && !tolerated(pod.Spec.Tolerations,
		corev1.Taint{Key: taintNodeUnschedulable, Effect: corev1.TaintEffectNoSchedule}) {
		return "node(s) were unschedulable"
	}
	if !labels.SelectorFromSet(pod.Spec.NodeSelector).Matches(labels.Set(node.Labels)) ||
		!matchesRequiredNodeAffinity(pod, node) {
		return "node(s) didn't match Pod's node affinity/selector"
	}
	for _, t := range node.Spec.Taints {
		if t.Effect != corev1.TaintEffectNoSchedule && t.Effect != corev1.TaintEffectNoExecute {
			continue
		}
		if !tolerated(pod.Spec.Tolerations, t) {
			return fmt.Sprintf("node(s) had untolerated taint {%s: %s}", t.Key, t.Value)
		}
	}
	if reason := resourcesFit(pod, node, placed); reason != "" {
		return reason
	}
	return s.interPodAffinity(pod, node, placed)
}

// tolerated reports whether a toleration tolerates taint.
func tolerated(tolerations []corev1.Toleration, taint corev1.Taint) bool {
	for _, t := range tolerations {
		if t.Effect != "" && t.Effect != taint.Effect {
			continue
		}
		switch t.Operator {
		case corev1.TolerationOpExists:
			if t.Key == "" || t.Key == taint.Key {
				return true
			}
		case corev1.TolerationOpEqual, "":
			if t.Key == taint.Key && t.Value == taint.Value {
				return true
			}
		}
	}
	return false
}

func matchesRequiredNodeAffinity(pod *corev1.Pod, node *corev1.Node) bool {
	a := pod.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return true
	}
	for _, term := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		if matchesNodeSelectorTerm(term, node) {
			return true
		}
	}
	return false
}

// matchesNodeSelectorTerm ANDs a term's requirements; an empty term matches nothing.
func matchesNodeSelectorTerm(term corev1.NodeSelectorTerm, node *corev1.Node) bool {
	if len(term.MatchExpressions) == 0 && len(term.MatchFields) == 0 {
		return false
	}
	for _, r := range term.MatchExpressions {
		if !matchesNodeRequirement(r, node.Labels) {
			return false
		}
	}
	for _, r := range term.MatchFields {
		if r.Key != "metadata.name" || !matchesNodeRequirement(r, map[string]string{"metadata.name": node.Name}) {
			return false
		}
	}
	return true
}

func matchesNodeRequirement(r corev1.NodeSelectorRequirement, set map[string]string) bool {
	v, has := set[r.Key]
	switch r.Operator {
	case corev1.NodeSelectorOpIn:
		return has && contains(r.Values, v)
	case corev1.NodeSelectorOpNotIn:
		return !has || !contains(r.Values, v)
	case corev1.NodeSelectorOpExists:
		return has
	case corev1.NodeSelectorOpDoesNotExist:
		return !has
	case corev1.NodeSelectorOpGt, corev1.NodeSelectorOpLt:
		if !has || len(r.Values) != 1 {
			return false
		}
		have, err1 := strconv.ParseInt(v, 10, 64)
		want, err2 := strconv.ParseInt(r.Values[0], 10, 64)
		if err1 != nil || err2 != nil {
			return false
		}
		if r.Operator == corev1.NodeSelectorOpGt {
			return have > want
		}
		return have < want
	}
	return false
}

func contains(values []string, v string) bool {
	for _, x := range values {
		if x == v {
			return true
		}
	}
	return false
}

// podRequests is what kube-scheduler's NodeResourcesFit counts for a pod: the
// larger of the containers' sum and the largest init container, plus overhead.
func podRequests(pod *corev1.Pod) corev1.ResourceList {
	sum := corev1.ResourceList{}
	for _, c := range pod.Spec.Containers {
		addResources(sum, c.Resources.Requests)
	}
	for _, c := range pod.Spec.InitContainers {
		for name, q := range c.Resources.Requests {
			if cur, ok := sum[name]; !ok || q.Cmp(cur) > 0 {
				sum[name] = q.DeepCopy()
			}
		}
	}
	addResources(sum, pod.Spec.Overhead)
	return sum
}

func addResources(into, add corev1.ResourceList) {
	for name, q := range add {
		cur := into[name]
		cur.Add(q)
		into[name] = cur
	}
}

func resourcesFit(pod *corev1.Pod, node *corev1.Node, placed []placedPod) string {
	used := corev1.ResourceList{}
	count := 0
	for _, p := range placed {
		if p.node.Name == node.Name && p.pod.UID != pod.UID {
			addResources(used, podRequests(p.pod))
			count++
		}
	}
	if maxPods, ok := node.Status.Allocatable[corev1.ResourcePods]; ok && int64(count+1) > maxPods.Value() {
		return "Too many pods"
	}
	want := podRequests(pod)
	names := make([]string, 0, len(want))
	for name := range want {
		names = append(names, string(name))
	}
	sort.Strings(names)
	for _, n := range names {
		name := corev1.ResourceName(n)
		q := want[name]
		if q.IsZero() {
			continue
		}
		alloc, ok := node.Status.Allocatable[name]
		if !ok {
			alloc = resource.Quantity{}
		}
		total := used[name].DeepCopy()
		total.Add(q)
		if total.Cmp(alloc) > 0 {
			return "Insufficient " + n
		}
	}
	return ""
}

// interPodAffinity checks required pod affinity and anti-affinity of the pod,
// and the required anti-affinity of the pods already placed.
func (s *Sim) interPodAffinity(pod *corev1.Pod, node *corev1.Node, placed []placedPod) string {
	sameTopology := func(key string, other *corev1.Node) bool {
		v, ok := node.Labels[key]
		ov, ook := other.Labels[key]
		return ok && ook && v == ov
	}
	if a := pod.Spec.Affinity; a != nil && a.PodAntiAffinity != nil {
		for _, term := range a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution {
			for _, p := range placed {
				if p.pod.UID != pod.UID && sameTopology(term.TopologyKey, p.node) && s.termMatches(term, pod, p.pod) {
					return "node(s) didn't match pod anti-affinity rules"
				}
			}
		}
	}
	for _, p := range placed {
		a := p.pod.Spec.Affinity
		if a == nil || a.PodAntiAffinity == nil || p.pod.UID == pod.UID {
			continue
		}
		for _, term := range a.PodAntiAffinity.RequiredDuringSchedulingIgnoredDuringExecution {
			if sameTopology(term.TopologyKey, p.node) && s.termMatches(term, p.pod, pod) {
				return "node(s) didn't satisfy existing pods anti-affinity rules"
			}
		}
	}
	if a := pod.Spec.Affinity; a != nil && a.PodAffinity != nil {
		for _, term := range a.PodAffinity.RequiredDuringSchedulingIgnoredDuringExecution {
			found, anywhere := false, false
			for _, p := range placed {
				if p.pod.UID == pod.UID || !s.termMatches(term, pod, p.pod) {
					continue
				}
				anywhere = true
				if sameTopology(term.TopologyKey, p.node) {
					found = true
					break
				}
			}
			// The first pod of a group that matches its own term may go anywhere.
			if !found && (anywhere || !s.termMatches(term, pod, pod)) {
				return "node(s) didn't match pod affinity rules"
			}
		}
	}
	return ""
}

// termMatches reports whether other is selected by term, a term of owner.
func (s *Sim) termMatches(term corev1.PodAffinityTerm, owner, other *corev1.Pod) bool {
	if !s.termNamespaceMatches(term, owner, other.Namespace) {
		return false
	}
	sel := labels.Nothing()
	if term.LabelSelector != nil {
		var err error
		if sel, err = metav1.LabelSelectorAsSelector(term.LabelSelector); err != nil {
			return false
		}
	}
	for _, k := range term.MatchLabelKeys {
		if v, ok := owner.Labels[k]; ok {
			if r, err := labels.NewRequirement(k, selection.In, []string{v}); err == nil {
				sel = sel.Add(*r)
			}
		}
	}
	for _, k := range term.MismatchLabelKeys {
		if v, ok := owner.Labels[k]; ok {
			if r, err := labels.NewRequirement(k, selection.NotIn, []string{v}); err == nil {
				sel = sel.Add(*r)
			}
		}
	}
	return sel.Matches(labels.Set(other.Labels))
}

func (s *Sim) termNamespaceMatches(term corev1.PodAffinityTerm, owner *corev1.Pod, ns string) bool {
	if len(term.Namespaces) == 0 && term.NamespaceSelector == nil {
		return ns == owner.Namespace
	}
	if contains(term.Namespaces, ns) {
		return true
	}
	if term.NamespaceSelector == nil {
		return false
	}
	sel, err := metav1.LabelSelectorAsSelector(term.NamespaceSelector)
	if err != nil {
		return false
	}
	if sel.Empty() {
		return true
	}
	obj, exists, err := s.namespaces.GetStore().GetByKey(ns)
	if err != nil || !exists {
		return false
	}
	return sel.Matches(labels.Set(obj.(*corev1.Namespace).Labels))
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
