package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the agent's Prometheus metrics, on a registry of their own.
type Metrics struct {
	Registry *prometheus.Registry

	VMs              *prometheus.GaugeVec
	Draining         prometheus.Gauge
	SafeToShutdown   prometheus.Gauge
	PodsLeft         prometheus.Gauge
	Requests         *prometheus.CounterVec
	DrainsStarted    *prometheus.CounterVec
	DrainDuration    *prometheus.HistogramVec
	ConfigErrors     *prometheus.CounterVec
	ShutdownDelay    prometheus.Histogram
	ShutdownReleases *prometheus.CounterVec
	// NodeUpdateFailures counts failed writes of the Node, by write.
	NodeUpdateFailures *prometheus.CounterVec
	// ReenableFailing is 1 while giving the node back keeps failing.
	ReenableFailing prometheus.Gauge
	// Withdrawals counts what withdrawing a drain did, by object and outcome.
	Withdrawals     *prometheus.CounterVec
	ShutdownNotHeld prometheus.Gauge
	ViewSynced      prometheus.Gauge
	// TurnWaiting is 1 while a host shutdown's drain waits for its turn.
	TurnWaiting prometheus.Gauge

	reg prometheus.Registerer // registers with the node label
}

// NewMetrics registers the agent's metrics, labelled with the node's name, and the Go
// and process collectors.
func NewMetrics(node string) *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		VMs: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "node_agent_vms",
			Help: "VMs on this node, by effective eviction strategy and by what is happening to them (running, pending, migrating, shutting-down, waiting-external, blocked, incoming-migration, starting).",
		}, []string{"strategy", "state"}),
		Draining: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "node_agent_draining",
			Help: "1 while this node is being drained (drain taint or host shutdown), else 0.",
		}),
		SafeToShutdown: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "node_agent_safe_to_shutdown",
			Help: "1 when no VM (and with --all-pods no evictable pod) is left on this node, else 0.",
		}),
		PodsLeft: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "node_agent_pods_left",
			Help: "Other pods still to evict from this node during a drain with --all-pods.",
		}),
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_agent_eviction_requests_total",
			Help: "Evictions and migrations the agent requested, by action (migrate, shutdown, external, evict) and outcome (evacuation, evicted, migration-created, refused, not-migratable, error).",
		}, []string{"action", "outcome"}),
		DrainsStarted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_agent_drains_started_total",
			Help: "Drains started, by trigger (taint, shutdown).",
		}, []string{"trigger"}),
		DrainDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "node_agent_drain_duration_seconds",
			Help:    "Time from the start of a drain until no VM was left on the node, by trigger.",
			Buckets: []float64{5, 15, 30, 60, 120, 300, 600, 1200, 3600},
		}, []string{"trigger"}),
		ConfigErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "node_agent_config_errors_total",
			Help: "Configuration problems met (an invalid taint key, a malformed ConfigMap or annotation), by source.",
		}, []string{"source"}),
	}
	m.ShutdownDelay = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "node_agent_shutdown_delay_seconds",
		Help:    "How long the agent held a host shutdown (from PrepareForShutdown until it released its inhibitor lock).",
		Buckets: []float64{1, 5, 15, 30, 60, 120, 300, 600, 1200},
	})
	m.ShutdownReleases = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_agent_shutdown_releases_total",
		Help: "Host shutdowns the agent let go, by outcome: safe (no VM left), deadline (VMs were left on the node) or unheld (no lock of ours held it).",
	}, []string{"outcome"})
	m.NodeUpdateFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_agent_node_update_failures_total",
		Help: "Writes of the agent's own Node that the API server refused or that failed, by write: reenable (giving the node back after a cancelled shutdown or a reboot), take-out-of-service (taint and cordon for a host shutdown), cancel-mark (recording a cancelled shutdown). Each is retried with a backoff.",
	}, []string{"write"})
	m.ReenableFailing = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "node_agent_reenable_failing",
		Help: "1 while the agent cannot give its node back (remove its own taint and cordon after a cancelled shutdown or a reboot) and keeps retrying, else 0.",
	})
	m.Withdrawals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "node_agent_withdraw_actions_total",
		Help: "What withdrawing a drain did to what it had started, by object (evacuation, migration) and outcome (cancelled, deleted, failed: left to KubeVirt, named in a DrainWithdrawn Warning event).",
	}, []string{"object", "outcome"})
	m.ShutdownNotHeld = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "node_agent_shutdown_not_held",
		Help: "1 while a host shutdown is under way that no lock of node-agent holds (the lock holder is gone or restarted mid-shutdown, the bus is gone): the host does not wait for the drain.",
	})
	m.ViewSynced = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "node_agent_view_synced",
		Help: "1 when the agent has read everything it watches (its Node, the virt-launcher pods and VMIs on it, the KubeVirt CR); 0 while something is refused or missing (RBAC, KubeVirt's CRD): /readyz says what.",
	})
	m.TurnWaiting = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "node_agent_drain_turn_waiting",
		Help: "1 while a host shutdown is held and its drain waits for its turn across the cluster (--max-concurrent-drains), else 0.",
	})
	m.reg = prometheus.WrapRegistererWith(prometheus.Labels{"node": node}, m.Registry)
	m.reg.MustRegister(m.ShutdownDelay, m.ShutdownReleases, m.ShutdownNotHeld, m.ViewSynced, m.VMs, m.Draining, m.SafeToShutdown, m.PodsLeft, m.Requests,
		m.DrainsStarted, m.DrainDuration, m.ConfigErrors, m.NodeUpdateFailures, m.ReenableFailing, m.Withdrawals, m.TurnWaiting)
	m.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *Metrics) observe(s NodeStatus) {
	m.VMs.Reset()
	for _, v := range s.VMs {
		m.VMs.WithLabelValues(v.Strategy, string(v.State)).Inc()
	}
	m.Draining.Set(boolFloat(s.Draining))
	m.SafeToShutdown.Set(boolFloat(s.Safe))
	m.PodsLeft.Set(float64(s.PodsLeft))
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// RegisterInhibitor exposes the logind inhibitor's state.
func (m *Metrics) RegisterInhibitor(status func() (held, connected bool, delay time.Duration)) {
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "node_agent_inhibitor_lock_held",
			Help: "1 while the agent holds its logind shutdown inhibitor lock, else 0 (no D-Bus, logind down, or released for a shutdown).",
		}, func() float64 { held, _, _ := status(); return boolFloat(held) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "node_agent_logind_connected",
			Help: "1 while the agent is connected to logind over the system D-Bus, else 0 (degraded mode).",
		}, func() float64 { _, connected, _ := status(); return boolFloat(connected) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "node_agent_shutdown_delay_max_seconds",
			Help: "How long a host shutdown can be held: the smaller of --shutdown-timeout and logind's InhibitDelayMaxSec.",
		}, func() float64 { _, _, d := status(); return d.Seconds() }),
	)
}
