package agent

import (
	"context"
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

// podDrainer evicts the node's other pods (--all-pods) as
// `kubectl drain --ignore-daemonsets --delete-emptydir-data --force` would, with
// kubectl's own drain helper choosing the pods. virt-launcher pods are left to the
// engine, which decides per VM, and so are KubeVirt's hotplug attachment pods while the
// virt-launcher pod that owns them is on the node. It evicts from the engine's sync,
// each pod at most once per its backoff: a refused eviction (a budget's 429, a pod
// under two budgets' 500, an admission webhook's denial) is retried with a per-pod
// exponential backoff, never in a loop, and reported once per pod and cause.
type podDrainer struct {
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

// OtherPodsHelper is kubectl's drain helper set up as the agent evicts a node's other
// pods (--all-pods): as `kubectl drain --ignore-daemonsets --delete-emptydir-data
// --force`, each pod's own grace period, virt-launcher pods left out (a drain decides
// per VM), a refused eviction retried after retry. `node-agent drain --all-pods` uses
// the same helper. Set Ctx before use.
func OtherPodsHelper(kube kubernetes.Interface, retry time.Duration, out, errOut io.Writer) *drain.Helper {
	if retry <= 0 {
		retry = DefaultPodEvictionRetry
	}
	return &drain.Helper{
		Client:              kube,
		Force:               true,
		IgnoreAllDaemonSets: true,
		DeleteEmptyDirData:  true,
		GracePeriodSeconds:  -1,
		PodSelector:         nodeinfo.NotLauncherLabelSelector,
		// Zero would retry a refused eviction in a busy loop.
		EvictErrorRetryDelay: retry,
		Out:                  out,
		ErrOut:               errOut,
	}
}

func newPodDrainer(kube kubernetes.Interface, node string, retry, retryMax time.Duration, clk clock.Clock, log logrus.FieldLogger, recorder record.EventRecorder, metrics *Metrics) *podDrainer {
	b := flowcontrol.NewBackOff(retry, max(retry, retryMax))
	b.Clock = clk
	return &podDrainer{
		node:     node,
		log:      log.WithField("drain", "pods"),
		recorder: recorder,
		metrics:  metrics,
		backoff:  b,
		warned:   map[types.UID]sets{},
		// The drainer evicts each pod itself, with a backoff, from the helper's list.
		helper: OtherPodsHelper(kube, retry,
			log.WithField("drain", "pods").WriterLevel(logrus.InfoLevel),
			log.WithField("drain", "pods").WriterLevel(logrus.WarnLevel)),
	}
}

// ensure returns how many evictable pods are on the node; with evict, it first asks
// for the eviction of each one that is not terminating and not backing off. launchers
// are the node's virt-launcher pods (a hotplug pod whose owner runs among them stays).
func (p *podDrainer) ensure(ctx context.Context, launchers []*corev1.Pod, evict bool) int {
	pods, err := p.evictable(ctx, launchers)
	if err != nil {
		p.log.WithError(err).Warn("cannot list the node's other pods")
		return 1
	}
	present := map[types.UID]bool{}
	for _, pod := range pods {
		present[pod.UID] = true
	}
	p.forget(present)
	if !evict {
		return len(pods)
	}
	now := p.backoff.Clock.Now()
	for _, pod := range pods {
		if pod.DeletionTimestamp != nil || p.backoff.IsInBackOffSinceUpdate(string(pod.UID), now) {
			continue
		}
		p.evict(ctx, pod)
	}
	return len(pods)
}

// evictable lists, through kubectl's drain filters, the pods a drain evicts.
func (p *podDrainer) evictable(ctx context.Context, launchers []*corev1.Pod) ([]corev1.Pod, error) {
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
func (p *podDrainer) evict(ctx context.Context, pod corev1.Pod) {
	// Not the helper's EvictPod: its client retries a 429 itself, as long as the
	// answer's Retry-After says (a budget's is 10 s, ten times over), which would hold
	// the engine's sync for minutes.
	a := apiEvictor{kube: p.helper.Client}.evict(ctx, &pod, false)
	log := p.log.WithFields(logrus.Fields{"namespace": pod.Namespace, "pod": pod.Name})
	if a.result == evicted || a.result == gone {
		p.backoff.DeleteEntry(string(pod.UID))
		if a.result == evicted {
			p.metrics.Requests.WithLabelValues("pod", "evicted").Inc()
			log.Info("pod evicted")
		}
		return
	}
	p.backoff.Next(string(pod.UID), p.backoff.Clock.Now())
	outcome := "refused"
	if a.result == failed {
		outcome = "error"
	}
	p.metrics.Requests.WithLabelValues("pod", outcome).Inc()
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
	p.recorder.Eventf(&pod, corev1.EventTypeWarning, ReasonEvictionRefused, "Eviction from node %s refused, retrying with a backoff: %s", p.node, a.msg)
	log.WithFields(logrus.Fields{"cause": a.cause, "reason": a.msg}).Warn("pod eviction refused; retrying with a backoff")
}

// forget drops what is kept about pods that are gone.
func (p *podDrainer) forget(present map[types.UID]bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for uid := range p.warned {
		if !present[uid] {
			delete(p.warned, uid)
			p.backoff.DeleteEntry(string(uid))
		}
	}
}

// stop forgets the drain's backoffs and reports (the drain ended or was withdrawn).
func (p *podDrainer) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for uid := range p.warned {
		p.backoff.DeleteEntry(string(uid))
	}
	p.warned = map[types.UID]sets{}
	p.backoff.GC()
}
