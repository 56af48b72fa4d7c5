package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
	"github.com/node-agent/node-agent/systemd"
)

// newLogger builds the logger the flags ask for.
func newLogger(format, level string, out io.Writer) (*logrus.Logger, error) {
	log := logrus.New()
	log.SetOutput(out)
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	log.SetLevel(lvl)
	if format == "json" {
		log.SetFormatter(&logrus.JSONFormatter{TimestampFormat: time.RFC3339Nano})
	} else {
		log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano})
	}
	return log, nil
}

// restConfig is the kubeconfig's configuration, or the in-cluster one.
func restConfig(kubeconfig string, qps float64, burst int) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig != "" {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("loading the API server configuration: %w", err)
	}
	cfg.QPS, cfg.Burst = float32(qps), burst
	cfg.UserAgent = "node-agent"
	return cfg, nil
}

// holderClient and inProcessHolder give the two shutdown sources one Run.
type holderClient struct{ *systemd.HolderClient }

type inProcessHolder struct{ *systemd.Holder }

func (h inProcessHolder) Run(ctx context.Context) {
	if err := h.Holder.Run(ctx); err != nil {
		logrus.WithError(err).Error("the logind inhibitor stopped")
	}
}

// newLockGuard is the logind Guard of `node-agent inhibit` (and of `run` without
// --lock-holder).
func newLockGuard(node, mode string, timeout time.Duration, dropInDir string, log logrus.FieldLogger) *systemd.Guard {
	return systemd.New(systemd.Options{
		Who:       "node-agent",
		Why:       "Draining the VMs of node " + node + " before the host goes down",
		Mode:      systemd.Mode(mode),
		WantDelay: timeout,
		DropInDir: dropInDir,
		Log:       log,
	})
}

// runAgent runs the drain engine and its HTTP endpoints until stopping is closed (the
// first SIGTERM) or ctx ends (the second). A SIGTERM that comes while a host shutdown
// is being held (the kubelet's graceful node shutdown stopping the agent's pod) is held
// too, until the node is safe or the shutdown's deadline: the kubelet then waits on the
// agent before it reaches the VMs' pods.
func runAgent(parent context.Context, stopping <-chan struct{}, a runArgs, logOut io.Writer) error {
	ctx, stop := context.WithCancel(parent)
	defer stop()
	logger, err := newLogger(a.LogFormat, a.LogLevel, logOut)
	if err != nil {
		return err
	}
	log := logger.WithField("node", a.NodeName)
	routeKlog(log)
	cfg, err := restConfig(a.Kubeconfig, a.QPS, a.Burst)
	if err != nil {
		return err
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	kv, err := nodeinfo.NewKubeVirtClient(cfg)
	if err != nil {
		return err
	}
	subresources, err := nodeinfo.NewKubeVirtSubresourceClient(cfg)
	if err != nil {
		return err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return fmt.Errorf("building the event scheme: %w", err)
	}
	if err := kubevirtv1.AddToScheme(scheme); err != nil {
		return fmt.Errorf("building the event scheme: %w", err)
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme, corev1.EventSource{Component: "node-agent", Host: a.NodeName})

	var engine *agent.Engine
	view := nodeinfo.NewView(kube, kv, nodeinfo.ViewOptions{
		NodeName:          a.NodeName,
		KubeVirtNamespace: a.KubeVirtNamespace,
		DrainTaintKey:     a.DrainTaintKey,
		OnChange:          func() { engine.Enqueue() },
	})
	metrics := agent.NewMetrics(a.NodeName)
	engine = agent.New(view, agent.Clients{Kube: kube, KubeVirt: kv, Subresources: subresources}, recorder, metrics, agent.Options{
		NodeName:         a.NodeName,
		AllPods:          a.AllPods,
		ShutdownAllPods:  a.ShutdownAllPods,
		Resync:           a.Resync,
		PodEvictionRetry: a.PodEvictionRetry,
		Log:              logger,
	})

	var checks []agent.ReadinessCheck
	if a.ShutdownInhibitor {
		var src interface {
			agent.ShutdownSource
			Run(context.Context)
		}
		if a.LockHolder != "" {
			// The lock is held by `node-agent inhibit` beside the engine: a crash or restart
			// of the engine does not drop it, and the engine picks a shutdown up where it is.
			src = holderClient{systemd.NewHolderClient(a.LockHolder, nil, log)}
			log.WithField("lockHolder", a.LockHolder).Info("following the shutdown lock holder")
		} else {
			guard := newLockGuard(a.NodeName, a.InhibitMode, a.ShutdownTimeout, a.LogindDropInDir, log)
			src = inProcessHolder{systemd.NewHolder(guard, engine, systemd.HolderOptions{Node: a.NodeName, Block: engine, Log: log})}
			log.Warn("holding the shutdown lock in this process (no --lock-holder): a crash of this process drops it")
		}
		go src.Run(ctx)
		go engine.RunShutdown(ctx, src, a.ShutdownTimeout)
		metrics.RegisterInhibitor(func() (bool, bool, time.Duration) {
			st, _ := src.State()
			return st.LockHeld, st.Connected, time.Duration(st.EffectiveDelay * float64(time.Second))
		})
		checks = append(checks, func() string {
			if st, _ := src.State(); st.Degraded != "" && !st.ShuttingDown {
				return "shutdown inhibitor degraded: " + st.Degraded
			}
			return ""
		})
	}

	view.Run(ctx)
	err = serve(ctx, stop, stopping, service{
		name: "node-agent", address: a.ListenAddress, handler: engine.Handler(checks...), log: log, grace: 5 * time.Second,
		run: engine.Run,
		holdOnSIGTERM: func() {
			if engine.ShuttingDown() {
				log.Info("SIGTERM during a host shutdown: holding it until the node is safe or the deadline")
				engine.HoldWhileShuttingDown(parent)
			}
		},
	})
	if err != nil {
		return err
	}
	log.Info("node-agent stopped")
	return nil
}
