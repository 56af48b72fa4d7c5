package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/node-agent/node-agent/systemd"
)

// runInhibit runs the shutdown lock holder (`node-agent inhibit`) until stopping is closed
// (the first SIGTERM) or ctx ends (the second). It takes logind's delay lock at start and on
// every reconnection; on a host shutdown it keeps the lock until the drain engine says the
// node is safe, or until the deadline counted from when logind began the shutdown. A SIGTERM
// during a held shutdown is held too, until then. It has no Kubernetes client: it is the part
// that must not crash.
func runInhibit(parent context.Context, stopping <-chan struct{}, a inhibitArgs, logOut io.Writer) error {
	ctx, stop := context.WithCancel(parent)
	defer stop()
	logger, err := newLogger(a.LogFormat, a.LogLevel, logOut)
	if err != nil {
		return err
	}
	log := logger.WithField("node", a.NodeName).WithField("component", "lock-holder")
	guard := newLockGuard(a.NodeName, a.InhibitMode, a.ShutdownTimeout, a.LogindDropInDir, log)
	engine := systemd.NewEngineClient(a.EngineURL)
	holder := systemd.NewHolder(guard, engine, systemd.HolderOptions{Node: a.NodeName, Block: engine, Log: log})

	listener, err := net.Listen("tcp", a.ListenAddress)
	if err != nil {
		return fmt.Errorf("--listen-address: %w", err)
	}
	server := &http.Server{Handler: holder.Handler(), ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- server.Serve(listener) }()
	holderDone := make(chan error, 1)
	go func() { holderDone <- holder.Run(ctx) }()
	log.WithField("listen", listener.Addr().String()).WithField("engine", a.EngineURL).Info("shutdown lock holder started")

	select {
	case <-ctx.Done():
	case <-stopping:
		if st, _ := holder.State(); st.ShuttingDown && st.Held && !st.Released {
			log.Info("SIGTERM during a held host shutdown: holding it until the node is safe or the deadline")
			holder.HoldWhileShuttingDown(parent)
		}
		stop()
	case err := <-serveErr:
		return fmt.Errorf("serving HTTP: %w", err)
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	_ = server.Shutdown(shutdownCtx)
	if err := <-holderDone; err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	log.Info("shutdown lock holder stopped")
	return nil
}
