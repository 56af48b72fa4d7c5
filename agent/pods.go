package agent

import (
	"context"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/flowcontrol"
	"k8s.io/kubectl/pkg/drain"
	"k8s.io/utils/clock"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// hotplugDiskLabel is the kubevirt.io label value of KubeVirt's hotplug attachment
// pods, which a virt-launcher pod owns.
const hotplugDiskLabel = "hotplug-disk"

// PodDrainer evicts a node's other pods (--all-pods) as
// `kubectl drain --ignore-daemonsets --delete-emptydir-data --force` would, with
// kubectl's own drain helper choosing the pods. virt-launcher pods are left to the
// engine, which decides per VM, and so are KubeVirt's hotplug attachment pods while the
// virt-launcher pod that owns them is on the node. Each pod is evicted at most once per
// its backoff, in a single request (no client-side retries): a refused eviction (a
// budget's 429, a pod under two budgets' 500, an admission webhook's denial) is retried
// with a per-pod exponential backoff, never in a loop, and reported once per pod and
// cause. The agent's engine drives it from its sync; `node-agent drain --all-pods`
// (drainctl) from its follow loop, so both evict by the same rule.
type PodDrainer struct {
	helper   *drain.Helper
	node     string
	log      logrus.FieldLogger
	recorder record.EventRecorder
	metrics  *Metrics
	backoff  *flowcontrol.Backoff

	mu     sync.Mutex
	warned map[types.UID]sets // causes reported, per pod
}

// DefaultPodEvictionRetry is the first pause before a refused eviction of another pod
// is tried again; it doubles up to the engine's EvictionBackoffMax.
const DefaultPodEvictionRetry = 5 * time.Second

// otherPodsHelper is kubectl's drain helper set up as a drain evicts a node's other
// pods: as `kubectl drain --ignore-daemonsets --delete-emptydir-data --force`, each
// pod's own grace period, virt-launcher pods left out (a drain decides per VM). It
// only lists: PodDrainer evicts. Set Ctx before use.
func otherPodsHelper(kube kubernetes.Interface, out, errOut io.Writer) *drain.Helper {
	return &drain.Helper{
		Client:              kube,
		Force:               true,
		IgnoreAllDaemonSets: true,
		DeleteEmptyDirData:  true,
		GracePeriodSeconds:  -1,
		PodSelector:         nodeinfo.NotLauncherLabelSelector,
		Out:                 out,
		ErrOut:              errOut,
	}
}

// PodDrainerOptions configure a PodDrainer.
type PodDrainerOptions struct {
	// Node is the node whose pods are evicted.
	Node string
	// Retry is the first pause after a refused eviction (DefaultPodEvictionRetry when
	// zero); it doubles up to RetryMax.
	Retry, RetryMax time.Duration
	// Clock is the backoff's clock (the real one when nil).
	Clock clock.Clock
	// Log receives a line per eviction and per refusal (once per pod and cause).
	Log logrus.FieldLogger
	// Recorder, when set, gets a Warning EvictionRefused event on the pod once per
	// pod and cause.
	Recorder record.EventRecorder
	// Metrics, when set, counts the requests (node_agent_eviction_requests_total).
	Metrics *Metrics
}

// NewPodDrainer returns a PodDrainer for the node's other pods.
func NewPodDrainer(kube kubernetes.Interface, opts PodDrainerOptions) *PodDrainer {
	if opts.Retry <= 0 {
		opts.Retry = DefaultPodEvictionRetry
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	b := flowcontrol.NewBackOff(opts.Retry, max(opts.Retry, opts.RetryMax))
	b.Clock = opts.Clock
	log := opts.Log.WithField("drain", "pods")
	return &PodDrainer{
		node:     opts.Node,
		log:      log,
		recorder: opts.Recorder,
		metrics:  opts.Metrics,
		backoff:  b,
		warned:   map[types.UID]sets{},
		helper:   otherPodsHelper(kube, log.WriterLevel(logrus.InfoLevel), log.WriterLevel(logrus.WarnLevel)),
	}
}

// Ensure returns how many evictable pods are on the node; with evict, it first asks
// for the eviction of each one that is not terminating and not backing off, once.
// launchers are the node's virt-launcher pods (a hotplug pod whose owner runs among
// them stays). It fails only when the pods cannot be listed.
func (p *PodDrainer) Ensure(ctx context.Context, launchers []*corev1.Pod, evict bool) (int, error) {
	pods, err := p.evictable(ctx, launchers)
	if err != nil {
		return 0, fmt.Errorf("listing the other pods of node %s: %w", p.node, err)
	}
	present := map[types.UID]bool{}
	for _, pod := range pods {
		present[pod.UID] = true
	}
	p.forget(present)
	if !evict {
		return len(pods), nil
	}
	now := p.backoff.Clock.Now()
	for _, pod := range pods {
		if pod.DeletionTimestamp != nil || p.backoff.IsInBackOffSinceUpdate(string(pod.UID), now) {
			continue
		}
		p.evict(ctx, pod)
	}
	return len(pods), nil
}

// evictable lists, through kubectl's drain filters, the pods a drain evicts.
func (p *PodDrainer) evictable(ctx context.Context, launchers []*corev1.Pod) ([]corev1.Pod, error) {
	running := map[string]bool{}
	for _, l := range launchers {
		if l.Spec.NodeName == p.node && l.Status.Phase != corev1.PodSucceeded && l.Status.Phase != corev1.PodFailed {
			running[l.Namespace+"/"+l.Name] = true
		}
	}
	h := *p.helper
	h.Ctx = ctx
	h.AdditionalFilters = []drain.PodFilter{func(pod corev1.Pod) drain.PodDeleteStatus {
		if owner := hotplugOwner(&pod); owner != "" && running[pod.Namespace+"/"+owner] {
			return drain.MakePodDeleteStatusSkip()
		}
		return drain.MakePodDeleteStatusOkay()
	}}
	list, errs := h.GetPodsForDeletion(p.node)
	if len(errs) > 0 {
		return nil, errs[0]
	}
	return list.Pods(), nil
}

// hotplugOwner is the name of the virt-launcher pod that owns a KubeVirt hotplug
// attachment pod; "" for any other pod.
func hotplugOwner(pod *corev1.Pod) string {
	if pod.Labels[kubevirtv1.AppLabel] != hotplugDiskLabel {
		return ""
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind == "Pod" && ref.APIVersion == "v1" {
			return ref.Name
		}
	}
	return ""
}

// evict asks for one pod's eviction, once; a refusal starts or lengthens its backoff.
func (p *PodDrainer) evict(ctx context.Context, pod corev1.Pod) {
	// Not the helper's EvictPod: its client retries a 429 itself, as long as the
	// answer's Retry-After says (a budget's is 10 s, ten times over), which would hold
	// the engine's sync (or the workstation's follow loop) for minutes.
	a := apiEvictor{kube: p.helper.Client}.evict(ctx, &pod, false)
	log := p.log.WithFields(logrus.Fields{"namespace": pod.Namespace, "pod": pod.Name})
	if a.result == evicted || a.result == gone {
		p.backoff.DeleteEntry(string(pod.UID))
		if a.result == evicted {
			p.count("evicted")
			log.Info("pod evicted")
		}
		return
	}
	p.backoff.Next(string(pod.UID), p.backoff.Clock.Now())
	outcome := "refused"
	if a.result == failed {
		outcome = "error"
	}
	p.count(outcome)
	p.mu.Lock()
	causes := p.warned[pod.UID]
	if causes == nil {
		causes = sets{}
		p.warned[pod.UID] = causes
	}
	_, done := causes[a.cause]
	causes[a.cause] = struct{}{}
	p.mu.Unlock()
	if done {
		log.WithField("cause", a.cause).Debug("eviction refused again; backing off")
		return
	}
	if p.recorder != nil {
		p.recorder.Eventf(&pod, corev1.EventTypeWarning, ReasonEvictionRefused, "Eviction from node %s refused, retrying with a backoff: %s", p.node, a.msg)
	}
	log.WithFields(logrus.Fields{"cause": a.cause, "reason": a.msg}).Warn("pod eviction refused; retrying with a backoff")
}

// count counts an eviction request of another pod by outcome.
func (p *PodDrainer) count(outcome string) {
	if p.metrics != nil {
		p.metrics.Requests.WithLabelValues("pod", outcome).Inc()
	}
}

// forget drops what is kept about pods that are gone.
func (p *PodDrainer) forget(present map[types.UID]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for uid := range p.warned {
		if !present[uid] {
			delete(p.warned, uid)
			p.backoff.DeleteEntry(string(uid))
		}
	}
}

// Stop forgets the drain's backoffs and reports (the drain ended or was withdrawn).
func (p *PodDrainer) Stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for uid := range p.warned {
		p.backoff.DeleteEntry(string(uid))
	}
	p.warned = map[types.UID]sets{}
	p.backoff.GC()
}
