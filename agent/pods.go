package agent

import (
	"context"
	"io"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/client-go/kubernetes"
	"k8s.io/kubectl/pkg/drain"

	"github.com/node-agent/node-agent/nodeinfo"
)

// podDrainer evicts the node's other pods (--all-pods) as
// `kubectl drain --ignore-daemonsets --delete-emptydir-data --force` would, through
// kubectl's own drain helper, in the background: the helper waits for each pod.
// virt-launcher pods are left to the engine, which decides per VM.
type podDrainer struct {
	helper *drain.Helper
	node   string
	log    logrus.FieldLogger
	notify func()

	mu      sync.Mutex
	cancel  context.CancelFunc
	running bool
}

// DefaultPodEvictionRetry is the pause before a refused eviction of another pod is
// tried again (a PodDisruptionBudget's 429).
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

func newPodDrainer(kube kubernetes.Interface, node string, retry time.Duration, log logrus.FieldLogger, notify func()) *podDrainer {
	return &podDrainer{
		node:   node,
		log:    log,
		notify: notify,
		helper: OtherPodsHelper(kube, retry,
			log.WithField("drain", "pods").WriterLevel(logrus.InfoLevel),
			log.WithField("drain", "pods").WriterLevel(logrus.WarnLevel)),
	}
}

// ensure starts the eviction of the other pods if it is not running, and returns how
// many evictable pods are still on the node.
func (p *podDrainer) ensure(ctx context.Context) int {
	p.helper.Ctx = ctx
	list, errs := p.helper.GetPodsForDeletion(p.node)
	if len(errs) > 0 {
		p.log.WithField("errors", errs).Warn("cannot list the node's other pods")
		return 1
	}
	pods := list.Pods()
	if len(pods) == 0 {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.running {
		return len(pods)
	}
	runCtx, cancel := context.WithCancel(ctx)
	p.cancel, p.running = cancel, true
	helper := *p.helper
	helper.Ctx = runCtx
	go func() {
		err := helper.DeleteOrEvictPods(pods)
		if err != nil {
			p.log.WithError(err).Warn("evicting the node's other pods did not finish")
		}
		p.mu.Lock()
		p.running = false
		p.mu.Unlock()
		p.notify()
	}()
	return len(pods)
}

// stop ends an eviction in progress (the drain was withdrawn).
func (p *podDrainer) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cancel != nil {
		p.cancel()
	}
}
