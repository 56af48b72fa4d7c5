package systemd

import (
	"errors"
	"fmt"
	"time"

	"github.com/sirupsen/logrus"
	"k8s.io/utils/clock"
)

// Mode is how the Guard inhibits a shutdown.
type Mode string

const (
	// ModeDelay takes a logind delay lock: a shutdown waits until the lock is released, or at
	// most logind's InhibitDelayMaxSec.
	ModeDelay Mode = "delay"
	// ModeBlock takes a block lock as well as the delay lock while the consumer asks for it
	// (Guard.SetBlock, while VMs are on the node): logind refuses shutdown requests while it is
	// held, naming the reason given. systemd-logind up to at least v252 ignores a block lock for
	// a caller with the lock holder's UID (root's `systemctl poweroff` against a root agent), so
	// the delay lock is kept for those.
	ModeBlock Mode = "block"
)

// DropInName is the logind.conf.d file the Guard writes to raise InhibitDelayMaxSec. It sorts
// before the kubelet's 99-kubelet.conf, so a value the kubelet sets always wins over ours: we
// never lower it.
const DropInName = "90-node-agent.conf"

// EventType says what happened to a shutdown.
type EventType string

const (
	// ShutdownStarted: logind announced PrepareForShutdown(true). The node is going down once the
	// lock is released (Guard.Release) or at Event.Deadline.
	ShutdownStarted EventType = "ShutdownStarted"
	// ShutdownCancelled: the shutdown will not happen (PrepareForShutdown(false), or logind no
	// longer prepares one after a restart). The lock is held again.
	ShutdownCancelled EventType = "ShutdownCancelled"
)

// Event is a shutdown notice for the consumer.
type Event struct {
	Type EventType
	// At is when the Guard received the notice (Options.Clock).
	At time.Time
	// Deadline (ShutdownStarted only) is when logind stops waiting for the lock: At plus the
	// effective delay. Zero when logind's delay is unknown.
	Deadline time.Time
	// Held (ShutdownStarted only) is true when a lock of ours holds this shutdown. It is false
	// when the shutdown began while no lock of ours was held (this process connected while
	// logind was already preparing it: a lock holder restarted mid-shutdown; logind refuses
	// new locks then), and NotHeld says so.
	Held    bool
	NotHeld string
}

// Status is the Guard's state for readiness and metrics.
type Status struct {
	// Connected is true while the Guard has a system bus connection on which logind answers.
	Connected bool
	// LockHeld is true while the Guard holds its delay lock.
	LockHeld bool
	// BlockHeld is true while the Guard holds a block lock (ModeBlock), BlockWhy its reason.
	BlockHeld bool
	BlockWhy  string
	// Mode is the configured mode.
	Mode Mode
	// ShuttingDown is true from ShutdownStarted until ShutdownCancelled.
	ShuttingDown bool
	// Released is true once Release gave up the lock during the current shutdown.
	Released bool
	// NotHeld says why a shutdown under way is not held by a lock of ours (the lock was never
	// ours for it, or the system bus is gone so the hold cannot be confirmed); empty when no
	// shutdown is under way, when it is held, or once Release let it go.
	NotHeld string
	// Degraded says why the Guard cannot hold a shutdown now; empty when it can (or when a
	// shutdown it announced is under way).
	Degraded string
	// LogindDelay is logind's InhibitDelayMaxUSec as last read back; 0 when unknown.
	LogindDelay time.Duration
	// EffectiveDelay is how long a shutdown can be held: the smaller of Options.WantDelay and
	// LogindDelay (LogindDelay when WantDelay is 0).
	EffectiveDelay time.Duration
	// DelayProblem says why InhibitDelayMaxSec could not be raised to WantDelay; empty if it was
	// not needed or worked.
	DelayProblem string
	// Since is when Connected or Degraded last changed.
	Since time.Time
}

// Options configure a Guard.
type Options struct {
	// Who and Why label the lock in logind's list (systemd-inhibit --list).
	Who, Why string
	// Mode is ModeDelay (default) or ModeBlock.
	Mode Mode
	// WantDelay is how long the agent wants to hold a shutdown (--shutdown-timeout). When logind's
	// InhibitDelayMaxSec is smaller and DropInDir is set, the Guard raises it. 0: leave it.
	WantDelay time.Duration
	// DropInDir is a logind.conf.d folder logind reads (e.g. /etc/systemd/logind.conf.d, mounted
	// from the host). Empty: never write configuration.
	DropInDir string
	// RetryMin and RetryMax bound the reconnect backoff (defaults 500ms and 30s).
	RetryMin, RetryMax time.Duration
	// CallTimeout bounds each call to logind and systemd (default 25s, D-Bus's own default
	// reply timeout): a logind that does not answer (stopped, stuck, starved on a loaded
	// host) then makes the Guard report itself degraded and reconnect, not wait for ever.
	CallTimeout time.Duration
	// ReloadWait is how long to wait for logind to apply a raised InhibitDelayMaxSec (default 2s).
	// Signals are handled after it: it is spent at most once per Guard when a later drop-in keeps
	// the value lower.
	ReloadWait time.Duration
	// Clock defaults to the real clock.
	Clock clock.Clock
	// Log defaults to a new logrus logger.
	Log logrus.FieldLogger
}

func (o Options) withDefaults() Options {
	if o.Who == "" {
		o.Who = "node-agent"
	}
	if o.Why == "" {
		o.Why = "moving virtual machines off this node before it shuts down"
	}
	if o.Mode == "" {
		o.Mode = ModeDelay
	}
	if o.RetryMin <= 0 {
		o.RetryMin = 500 * time.Millisecond
	}
	if o.RetryMax <= 0 {
		o.RetryMax = 30 * time.Second
	}
	if o.RetryMax < o.RetryMin {
		o.RetryMax = o.RetryMin
	}
	if o.CallTimeout <= 0 {
		o.CallTimeout = 25 * time.Second
	}
	if o.ReloadWait <= 0 {
		o.ReloadWait = 2 * time.Second
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Log == nil {
		o.Log = logrus.New()
	}
	return o
}

func (o Options) validate() error {
	var errs []error
	if o.Mode != ModeDelay && o.Mode != ModeBlock {
		errs = append(errs, fmt.Errorf("inhibitor mode %q: want %q or %q", o.Mode, ModeDelay, ModeBlock))
	}
	if o.WantDelay < 0 {
		errs = append(errs, fmt.Errorf("shutdown delay %v is negative", o.WantDelay))
	}
	return errors.Join(errs...)
}
