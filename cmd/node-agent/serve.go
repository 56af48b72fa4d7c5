package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/sirupsen/logrus"
)

// service is one of the binary's long-running processes (`run`, `inhibit`): its HTTP
// endpoints and its work loop.
type service struct {
	name    string
	address string
	handler http.Handler
	log     logrus.FieldLogger
	// grace bounds the HTTP server's shutdown.
	grace time.Duration
	// run is the work loop; it returns when its context ends.
	run func(context.Context) error
	// holdOnSIGTERM is called on the first SIGTERM before the work stops: it blocks
	// while a held host shutdown must be waited for.
	holdOnSIGTERM func()
}

// serve serves s's endpoints and runs its work until ctx ends or stopping is closed
// (the first SIGTERM, after holdOnSIGTERM); stop ends ctx. It returns when the work has
// returned.
func serve(ctx context.Context, stop context.CancelFunc, stopping <-chan struct{}, s service) error {
	listener, err := net.Listen("tcp", s.address)
	if err != nil {
		return fmt.Errorf("--listen-address: %w", err)
	}
	server := &http.Server{Handler: s.handler, ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- server.Serve(listener) }()
	s.log.WithField("listen", listener.Addr().String()).Info(s.name + " started")
	workDone := make(chan error, 1)
	go func() { workDone <- s.run(ctx) }()

	select {
	case <-ctx.Done():
	case <-stopping:
		s.holdOnSIGTERM()
		stop()
	case err := <-serveErr:
		stop()
		<-workDone
		return fmt.Errorf("serving HTTP: %w", err)
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.grace)
	defer cancel()
	_ = server.Shutdown(shutdownCtx)
	if err := <-workDone; err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	s.log.Info(s.name + " stopped")
	return nil
}
