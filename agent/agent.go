package agent

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/record"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/fleet"
	"github.com/node-agent/node-agent/nodeinfo"
	"github.com/node-agent/node-agent/systemd"
)

// Config is what an Agent needs besides the engine's Options: the API server, where
// the cluster keeps node-agent's configuration, and how host shutdowns are held.
type Config struct {
	REST *rest.Config
	// KubeVirtNamespace holds the KubeVirt CR and the legacy kubevirt-config ConfigMap.
	KubeVirtNamespace string
	// DrainTaintKey, when set, overrides the key the cluster configures.
	DrainTaintKey string
	// Shutdown, when set, has the agent follow (and hold) the host's shutdowns.
	Shutdown *ShutdownConfig
	// Turns, when set, has a host shutdown's drain wait for its turn across the cluster.
	Turns *TurnsConfig
}

// TurnsConfig is the cluster's queue of host-shutdown drains (fleet.Turns).
type TurnsConfig struct {
	// Namespace holds the queue's Leases (the agent's own).
	Namespace string
	// Slots is how many nodes drain for a host shutdown at once.
	Slots int
}

// ShutdownConfig says who holds logind's inhibitor lock for the agent.
type ShutdownConfig struct {
	// LockHolder is the address of `node-agent inhibit`, which holds the lock beside
	// the engine: a crash or restart of the engine does not drop it. Empty: Guard holds
	// it in this process.
	LockHolder string
	// Guard is the lock held in this process (no LockHolder).
	Guard *systemd.Guard
	// Timeout is a shutdown's deadline when the holder knows none (--shutdown-timeout).
	Timeout time.Duration
}

// Agent is node-agent on its node: the view of the node, the drain engine and, with a
// ShutdownConfig, the host shutdown it follows. NewAgent, then Run.
type Agent struct {
	// Engine is the drain engine (its status, its SIGTERM hold).
	Engine      *Engine
	view        *nodeinfo.View
	broadcaster record.EventBroadcaster
	kube        kubernetes.Interface
	shutdown    shutdownRunner
	turns       *fleet.Turns
	timeout     time.Duration
	checks      []ReadinessCheck
}

// shutdownRunner is a ShutdownSource that runs until its context ends.
type shutdownRunner interface {
	ShutdownSource
	Run(context.Context)
}

// holderClient and inProcessHolder give the two shutdown sources one Run.
type holderClient struct{ *systemd.HolderClient }

type inProcessHolder struct {
	*systemd.Holder
	log logrus.FieldLogger
}

func (h inProcessHolder) Run(ctx context.Context) {
	if err := h.Holder.Run(ctx); err != nil {
		h.log.WithError(err).Error("the logind inhibitor stopped")
	}
}

// NewAgent connects to the API server and builds the agent; nothing runs before Run.
func NewAgent(cfg Config, opts Options) (*Agent, error) {
	// Every response names the API priority level of the request: the agent's clients
	// record it (Options.PriorityLevel).
	level := nodeinfo.NewPriorityLevel()
	rc := rest.CopyConfig(cfg.REST)
	rc.Wrap(level.Wrap)
	// The Kubernetes client speaks protobuf, as the kubelet and the controllers do: its
	// answers and watch events decode with a fraction of JSON's allocations. KubeVirt's
	// resources (CRDs) are served as JSON only: their clients keep rc.
	kubeCfg := rest.CopyConfig(rc)
	kubeCfg.ContentType = runtime.ContentTypeProtobuf
	kubeCfg.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	kube, err := kubernetes.NewForConfig(kubeCfg)
	if err != nil {
		return nil, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	level.SetClient(kube.FlowcontrolV1().PriorityLevelConfigurations())
	if opts.PriorityLevel == nil {
		opts.PriorityLevel = level
	}
	kv, err := nodeinfo.NewKubeVirtClient(rc)
	if err != nil {
		return nil, err
	}
	subresources, err := nodeinfo.NewKubeVirtSubresourceClient(rc)
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("building the event scheme: %w", err)
	}
	if err := kubevirtv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("building the event scheme: %w", err)
	}
	if opts.Log == nil {
		opts.Log = logrus.StandardLogger()
	}
	log := opts.Log.WithField("node", opts.NodeName)
	a := &Agent{broadcaster: record.NewBroadcaster(), kube: kube}
	recorder := a.broadcaster.NewRecorder(scheme, corev1.EventSource{Component: "node-agent", Host: opts.NodeName})
	a.view = nodeinfo.NewView(kube, kv, nodeinfo.ViewOptions{
		NodeName:          opts.NodeName,
		KubeVirtNamespace: cfg.KubeVirtNamespace,
		DrainTaintKey:     cfg.DrainTaintKey,
	})
	metrics := NewMetrics(opts.NodeName)
	if opts.ProbeAPI == nil {
		// A read of its own Node (without a resourceVersion: a consistent read), which
		// the agent's credentials always allow. (With etcd paused for 30 s these were
		// still answered: docs/RELIABILITY.md.)
		node := opts.NodeName
		opts.ProbeAPI = func(ctx context.Context) error {
			_, err := kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
			return err
		}
	}
	var turns *fleet.Turns
	if cfg.Turns != nil {
		turns = fleet.New(kube, fleet.Options{Namespace: cfg.Turns.Namespace, Node: opts.NodeName, Slots: cfg.Turns.Slots, Clock: opts.Clock, Log: log})
		opts.Turns, a.turns = turns, turns
	}
	a.Engine = New(a.view, Clients{Kube: kube, KubeVirt: kv, Subresources: subresources}, recorder, metrics, opts)

	if sd := cfg.Shutdown; sd != nil {
		a.timeout = sd.Timeout
		if sd.LockHolder != "" {
			a.shutdown = holderClient{systemd.NewHolderClient(sd.LockHolder, nil, log)}
			log.WithField("lockHolder", sd.LockHolder).Info("following the shutdown lock holder")
		} else {
			a.shutdown = inProcessHolder{
				Holder: systemd.NewHolder(sd.Guard, a.Engine, systemd.HolderOptions{Node: opts.NodeName, Block: a.Engine, Log: log}),
				log:    log,
			}
			log.Warn("holding the shutdown lock in this process (no --lock-holder): a crash of this process drops it")
		}
		src := a.shutdown
		metrics.RegisterInhibitor(func() (bool, bool, time.Duration) {
			st, _ := src.State()
			return st.LockHeld, st.Connected, time.Duration(st.EffectiveDelay * float64(time.Second))
		})
		a.checks = append(a.checks, func() string {
			if st, _ := src.State(); st.Degraded != "" && !st.ShuttingDown {
				return "shutdown inhibitor degraded: " + st.Degraded
			}
			return ""
		})
	}
	return a, nil
}

// Handler serves the agent's endpoints (/safe-to-shutdown, /healthz, /readyz,
// /metrics); with a ShutdownConfig, a degraded inhibitor makes it not ready.
func (a *Agent) Handler() http.Handler { return a.Engine.Handler(a.checks...) }

// Run sends events, follows the host's shutdowns, starts the informers and works the
// engine's queue until ctx ends.
func (a *Agent) Run(ctx context.Context) error {
	a.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.kube.CoreV1().Events("")})
	defer a.broadcaster.Shutdown()
	if a.shutdown != nil {
		go a.shutdown.Run(ctx)
		go a.Engine.RunShutdown(ctx, a.shutdown, a.timeout)
	}
	a.view.Run(ctx)
	if a.turns != nil {
		a.turns.Run(ctx)
	}
	return a.Engine.Run(ctx)
}
