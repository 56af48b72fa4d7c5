package main

import (
	"fmt"

	"github.com/go-logr/logr"
	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"
)

// routeKlog sends what client-go logs through klog to the agent's logger, so that the
// log stays one format (JSON lines with --log-format=json).
func routeKlog(log logrus.FieldLogger) {
	klog.SetLogger(logr.New(&klogSink{log: log}))
}

// klogSink is a logr.LogSink writing to logrus: klog's verbosity 0 at info, higher
// verbosity at debug.
type klogSink struct {
	log  logrus.FieldLogger
	name string
}

var _ logr.LogSink = (*klogSink)(nil)

func (s *klogSink) Init(logr.RuntimeInfo) {}

func (s *klogSink) Enabled(level int) bool { return level <= 2 }

func (s *klogSink) entry(kv []any) *logrus.Entry {
	e := s.log.WithField("source", "client-go")
	if s.name != "" {
		e = e.WithField("logger", s.name)
	}
	for i := 0; i+1 < len(kv); i += 2 {
		e = e.WithField(fmt.Sprint(kv[i]), kv[i+1])
	}
	return e
}

func (s *klogSink) Info(level int, msg string, kv ...any) {
	if level == 0 {
		s.entry(kv).Info(msg)
		return
	}
	s.entry(kv).Debug(msg)
}

func (s *klogSink) Error(err error, msg string, kv ...any) {
	s.entry(kv).WithError(err).Error(msg)
}

func (s *klogSink) WithValues(kv ...any) logr.LogSink {
	return &klogSink{log: s.entry(kv), name: s.name}
}

func (s *klogSink) WithName(name string) logr.LogSink {
	if s.name != "" {
		name = s.name + "/" + name
	}
	return &klogSink{log: s.log, name: name}
}
