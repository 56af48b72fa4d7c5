package main

import (
	"context"
	"io"
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

	err = serve(ctx, stop, stopping, service{
		name: "shutdown lock holder", address: a.ListenAddress, handler: holder.Handler(), log: log.WithField("engine", a.EngineURL), grace: 2 * time.Second,
		run: holder.Run,
		holdOnSIGTERM: func() {
			if st, _ := holder.State(); st.ShuttingDown && st.Held && !st.Released {
				log.Info("SIGTERM during a held host shutdown: holding it until the node is safe or the deadline")
				holder.HoldWhileShuttingDown(parent)
			}
		},
	})
	if err != nil {
		return err
	}
	log.Info("shutdown lock holder stopped")
	return nil
}
