package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/node-agent/node-agent/agent"
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
	config := agent.Config{REST: cfg, KubeVirtNamespace: a.KubeVirtNamespace, DrainTaintKey: a.DrainTaintKey}
	if a.ShutdownInhibitor {
		config.Shutdown = &agent.ShutdownConfig{LockHolder: a.LockHolder, Timeout: a.ShutdownTimeout}
		if a.LockHolder == "" {
			config.Shutdown.Guard = newLockGuard(a.NodeName, a.InhibitMode, a.ShutdownTimeout, a.LogindDropInDir, log)
		}
	}
	if a.ShutdownInhibitor && a.MaxDrains > 0 {
		config.Turns = &agent.TurnsConfig{Namespace: a.Namespace, Slots: a.MaxDrains}
	}
	ag, err := agent.NewAgent(config, agent.Options{
		NodeName:              a.NodeName,
		AllPods:               a.AllPods,
		ShutdownAllPods:       a.ShutdownAllPods,
		Resync:                a.Resync,
		MigrationStallTimeout: a.MigrationStall,
		PodEvictionRetry:      a.PodEvictionRetry,
		MaxConcurrentDrains:   a.MaxDrains,
		MaxTurnWait:           a.MaxTurnWait,
		Log:                   logger,
	})
	if err != nil {
		return err
	}
	err = serve(ctx, stop, stopping, service{
		name: "node-agent", address: a.ListenAddress, handler: withProfiling(ag.Handler(), a.Profiling), log: log, grace: 5 * time.Second,
		run: ag.Run,
		holdOnSIGTERM: func() {
			if ag.Engine.ShuttingDown() {
				log.Info("SIGTERM during a host shutdown: holding it until the node is safe or the deadline")
				ag.Engine.HoldWhileShuttingDown(parent)
			}
		},
	})
	if err != nil {
		return err
	}
	log.Info("node-agent stopped")
	return nil
}

// withProfiling adds Go's profiles (net/http/pprof) at /debug/pprof/ to h when on.
func withProfiling(h http.Handler, on bool) http.Handler {
	if !on {
		return h
	}
	mux := http.NewServeMux()
	mux.Handle("/", h)
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
