package agent

import (
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/record"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

func TestSummary(t *testing.T) {
	vms := func(states ...VMState) []VMStatus {
		var out []VMStatus
		for _, s := range states {
			out = append(out, VMStatus{Namespace: "ns", Name: string(s), State: s})
		}
		return out
	}
	tests := []struct {
		name string
		st   NodeStatus
		want string
	}{
		{"idle, empty", NodeStatus{}, "idle: 0 VMs on the node"},
		{"idle with VMs", NodeStatus{VMs: vms(StateRunning, StateRunning)}, "idle: 2 VMs on the node"},
		{"drained", NodeStatus{Draining: true, Trigger: TriggerTaint, Safe: true}, "drained: no VM left, safe to power off"},
		{
			"draining, counts by state in a fixed order",
			NodeStatus{Draining: true, Trigger: TriggerTaint, VMs: vms(StateBlocked, StateMigrating, StatePending, StateMigrating, StateShuttingDown, StateWaitingExternal, StateIncoming)},
			"draining (taint): 7 VMs left (1 pending, 2 migrating, 1 shutting-down, 1 waiting-external, 1 blocked, 1 incoming-migration)",
		},
		{
			"draining with other pods left",
			NodeStatus{Draining: true, Trigger: TriggerShutdown, VMs: vms(StateMigrating), PodsLeft: 3},
			"draining (shutdown): 1 VM left (1 migrating, 3 other pods)",
		},
		{
			"draining, only other pods left",
			NodeStatus{Draining: true, Trigger: TriggerShutdown, PodsLeft: 2},
			"draining (shutdown): 0 VMs left (2 other pods)",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.st.Summary(); got != tt.want {
				t.Errorf("Summary() = %q, want %q", got, tt.want)
			}
		})
	}
}

// fakeView is a NodeView with nothing on the node; the handler tests drive the
// engine's status directly.
type fakeView struct{}

var _ NodeView = fakeView{}

func (fakeView) Synced() (bool, string)                     { return true, "" }
func (fakeView) LauncherPodsListed() bool                   { return true }
func (fakeView) Node() (*corev1.Node, error)                { return &corev1.Node{}, nil }
func (fakeView) VMIs() []*kubevirtv1.VirtualMachineInstance { return nil }
func (fakeView) LauncherPods() []*corev1.Pod                { return nil }
func (fakeView) AddChangeHandler(func())                    {}
func (fakeView) Config() (nodeinfo.Config, error) {
	return nodeinfo.Config{DrainTaintKey: nodeinfo.DefaultDrainTaintKey, DrainTaintKeySource: nodeinfo.SourceDefault}, nil
}
func (fakeView) VMIMigrations(context.Context, string, []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
	return nil, nil
}
func (fakeView) NamespaceMigrations(context.Context, string) ([]kubevirtv1.VirtualMachineInstanceMigration, error) {
	return nil, nil
}
func (fakeView) MigrationTargetPods(context.Context, string, types.UID) ([]corev1.Pod, error) {
	return nil, nil
}

func newTestEngine(t *testing.T) *Engine {
	t.Helper()
	e := New(fakeView{}, Clients{}, record.NewFakeRecorder(16), nil, Options{NodeName: thisNode})
	t.Cleanup(e.queue.ShutDown)
	return e
}

var since0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// leftStatus is a drain with two VMs left.
func leftStatus(s *NodeStatus) {
	*s = NodeStatus{
		Node: thisNode, Ready: true, Draining: true, Trigger: TriggerTaint, TaintKey: nodeinfo.DefaultDrainTaintKey,
		VMs: []VMStatus{
			{Namespace: "ns1", Name: "db", Strategy: string(kubevirtv1.EvictionStrategyLiveMigrate), Action: ActionMigrate, State: StateMigrating, Detail: "to " + otherNode, Since: since0},
			{Namespace: "ns2", Name: "gpu", Strategy: string(kubevirtv1.EvictionStrategyLiveMigrate), Action: ActionNone, State: StateBlocked, Detail: "not live-migratable: HostDeviceNotLiveMigratable", Since: since0.Add(time.Minute)},
		},
	}
}

// safeStatus is a finished drain.
func safeStatus(s *NodeStatus) {
	*s = NodeStatus{Node: thisNode, Ready: true, Draining: true, Trigger: TriggerTaint, TaintKey: nodeinfo.DefaultDrainTaintKey, Safe: true, VMs: []VMStatus{}}
}

type response struct {
	code        int
	contentType string
	body        string
}

func get(t *testing.T, h http.Handler, target string) response {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, target, nil))
	return response{rec.Code, rec.Header().Get("Content-Type"), rec.Body.String()}
}

func TestSafeToShutdownListsTheVMsLeft(t *testing.T) {
	e := newTestEngine(t)
	e.setStatus(leftStatus)
	r := get(t, e.Handler(), "/safe-to-shutdown")
	if r.code != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503; body %s", r.code, r.body)
	}
	if r.contentType != "application/json" {
		t.Errorf("Content-Type %q, want application/json", r.contentType)
	}
	var body struct {
		Node     string           `json:"node"`
		Draining bool             `json:"draining"`
		Safe     bool             `json:"safe"`
		VMs      []map[string]any `json:"vms"`
	}
	if err := json.Unmarshal([]byte(r.body), &body); err != nil {
		t.Fatalf("body is not JSON: %v\n%s", err, r.body)
	}
	if body.Node != thisNode || !body.Draining || body.Safe {
		t.Errorf("node %q draining %v safe %v, want %q true false", body.Node, body.Draining, body.Safe, thisNode)
	}
	want := []map[string]any{
		{"namespace": "ns1", "name": "db", "strategy": "LiveMigrate", "action": "migrate", "state": "migrating", "detail": "to " + otherNode, "since": "2030-01-02T03:04:05Z"},
		{"namespace": "ns2", "name": "gpu", "strategy": "LiveMigrate", "action": "none", "state": "blocked", "detail": "not live-migratable: HostDeviceNotLiveMigratable", "since": "2030-01-02T03:05:05Z"},
	}
	if len(body.VMs) != len(want) {
		t.Fatalf("%d VMs in the body, want %d: %s", len(body.VMs), len(want), r.body)
	}
	for i := range want {
		for k, v := range want[i] {
			if body.VMs[i][k] != v {
				t.Errorf("vms[%d].%s = %v, want %v", i, k, body.VMs[i][k], v)
			}
		}
	}
}

func TestSafeToShutdownStatusCode(t *testing.T) {
	tests := []struct {
		name   string
		query  string
		status func(*NodeStatus)
		want   int
	}{
		{"safe", "", safeStatus, http.StatusOK},
		{"VMs left", "", leftStatus, http.StatusServiceUnavailable},
		{"not draining, no VM", "", func(s *NodeStatus) { *s = NodeStatus{Node: thisNode, Ready: true, Safe: true, VMs: []VMStatus{}} }, http.StatusOK},
		{"safe but not ready: not known to be safe", "", func(s *NodeStatus) { safeStatus(s); s.Ready, s.Reason = false, "informers not synced" }, http.StatusServiceUnavailable},
		{"only other pods left", "", func(s *NodeStatus) { safeStatus(s); s.Safe, s.PodsLeft = false, 2 }, http.StatusServiceUnavailable},
		{"wait=0s answers at once", "?wait=0s", leftStatus, http.StatusServiceUnavailable},
		{"wait while safe answers at once", "?wait=10m", safeStatus, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTestEngine(t)
			e.setStatus(tt.status)
			r := get(t, e.Handler(), "/safe-to-shutdown"+tt.query)
			if r.code != tt.want {
				t.Errorf("status %d, want %d; body %s", r.code, tt.want, r.body)
			}
			var st NodeStatus
			if err := json.Unmarshal([]byte(r.body), &st); err != nil {
				t.Errorf("body is not JSON: %v\n%s", err, r.body)
			}
		})
	}
}

func TestSafeToShutdownInitiallyNotReady(t *testing.T) {
	e := newTestEngine(t)
	r := get(t, e.Handler(), "/safe-to-shutdown")
	if r.code != http.StatusServiceUnavailable {
		t.Errorf("before the first sync: status %d, want 503", r.code)
	}
}

func TestSafeToShutdownBadWait(t *testing.T) {
	for _, wait := range []string{"banana", "-1s", (MaxWait + time.Second).String(), "2h", "10"} {
		t.Run(wait, func(t *testing.T) {
			e := newTestEngine(t)
			e.setStatus(safeStatus)
			r := get(t, e.Handler(), "/safe-to-shutdown?wait="+url.QueryEscape(wait))
			if r.code != http.StatusBadRequest {
				t.Fatalf("status %d, want 400; body %s", r.code, r.body)
			}
			if !strings.Contains(r.body, "invalid wait") || !strings.Contains(r.body, MaxWait.String()) {
				t.Errorf("body %q does not say what a valid wait is", r.body)
			}
		})
	}
}

func TestSafeToShutdownWaitAcceptsMaxWait(t *testing.T) {
	e := newTestEngine(t)
	e.setStatus(safeStatus)
	// Safe already: answered at once, even with the longest wait allowed.
	if r := get(t, e.Handler(), "/safe-to-shutdown?wait="+MaxWait.String()); r.code != http.StatusOK {
		t.Errorf("status %d, want 200; body %s", r.code, r.body)
	}
}

// TestSafeToShutdownWaitReturnsWhenSafe holds a request with the longest wait and
// expects it back, 200, as soon as the status turns safe.
func TestSafeToShutdownWaitReturnsWhenSafe(t *testing.T) {
	tests := []struct {
		name  string
		start func(*NodeStatus)
	}{
		{"VMs leave", leftStatus},
		{"the agent becomes ready", func(s *NodeStatus) { safeStatus(s); s.Ready = false }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTestEngine(t)
			e.setStatus(tt.start)
			arrived := make(chan struct{})
			h := e.Handler()
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				close(arrived)
				h.ServeHTTP(w, r)
			}))
			defer srv.Close()

			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			done := make(chan response, 1)
			go func() {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+"/safe-to-shutdown?wait=1h", nil)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					done <- response{body: err.Error()}
					return
				}
				defer resp.Body.Close()
				b, _ := io.ReadAll(resp.Body)
				done <- response{resp.StatusCode, resp.Header.Get("Content-Type"), string(b)}
			}()

			<-arrived
			// A change that leaves the node unsafe does not end the wait: the answer
			// below is still 200.
			e.setStatus(func(s *NodeStatus) { s.PodsLeft++ })
			e.setStatus(safeStatus)
			select {
			case r := <-done:
				if r.code != http.StatusOK {
					t.Fatalf("status %d, want 200; body %s", r.code, r.body)
				}
				var st NodeStatus
				if err := json.Unmarshal([]byte(r.body), &st); err != nil || !st.Safe {
					t.Errorf("body %s: want the safe status (%v)", r.body, err)
				}
			case <-ctx.Done():
				t.Fatal("no answer within 30s after the node turned safe")
			}
		})
	}
}

// TestSafeToShutdownWaitTimesOut: a node that stays unsafe is answered 503 once the
// wait is up, not before.
func TestSafeToShutdownWaitTimesOut(t *testing.T) {
	e := newTestEngine(t)
	e.setStatus(leftStatus)
	const wait = 100 * time.Millisecond
	start := time.Now()
	r := get(t, e.Handler(), "/safe-to-shutdown?wait="+wait.String())
	if took := time.Since(start); took < wait {
		t.Errorf("answered after %s, before the wait of %s was up", took, wait)
	}
	if r.code != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503", r.code)
	}
	var st NodeStatus
	if err := json.Unmarshal([]byte(r.body), &st); err != nil || len(st.VMs) != 2 {
		t.Errorf("body %s: want the 2 VMs left (%v)", r.body, err)
	}
}

func TestReadyz(t *testing.T) {
	ok := func() string { return "" }
	noBus := func() string { return "no D-Bus: shutdowns are not held" }
	tests := []struct {
		name     string
		status   func(*NodeStatus)
		checks   []ReadinessCheck
		want     int
		bodyHas  string
		bodyLack string
	}{
		{"before the first sync", nil, nil, http.StatusServiceUnavailable, "not ready: starting", ""},
		{"not synced, with the reason", func(s *NodeStatus) { s.Ready, s.Reason = false, "waiting for the vmis informer" }, nil, http.StatusServiceUnavailable, "waiting for the vmis informer", ""},
		{"ready", safeStatus, nil, http.StatusOK, "ok", ""},
		{"ready, checks pass", safeStatus, []ReadinessCheck{ok, ok}, http.StatusOK, "ok", ""},
		{"a failing check, with its reason", safeStatus, []ReadinessCheck{ok, noBus}, http.StatusServiceUnavailable, "not ready: no D-Bus", ""},
		{"not ready wins over checks", nil, []ReadinessCheck{noBus}, http.StatusServiceUnavailable, "starting", "D-Bus"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTestEngine(t)
			if tt.status != nil {
				e.setStatus(tt.status)
			}
			r := get(t, e.Handler(tt.checks...), "/readyz")
			if r.code != tt.want || !strings.Contains(r.body, tt.bodyHas) {
				t.Errorf("/readyz = %d %q, want %d containing %q", r.code, r.body, tt.want, tt.bodyHas)
			}
			if tt.bodyLack != "" && strings.Contains(r.body, tt.bodyLack) {
				t.Errorf("/readyz body %q, want it without %q", r.body, tt.bodyLack)
			}
		})
	}
}

func TestHealthz(t *testing.T) {
	e := newTestEngine(t)
	// Alive even before the first sync.
	if r := get(t, e.Handler(), "/healthz"); r.code != http.StatusOK {
		t.Errorf("/healthz = %d %q, want 200", r.code, r.body)
	}
}

func TestMetricsExposeVMs(t *testing.T) {
	e := newTestEngine(t)
	var st NodeStatus
	leftStatus(&st)
	st.VMs = append(st.VMs, VMStatus{Namespace: "ns3", Name: "web", Strategy: string(kubevirtv1.EvictionStrategyLiveMigrate), State: StateMigrating})
	e.metrics.observe(st)
	node := map[string]string{"node": "node-a"}
	vms := func(state VMState) map[string]string {
		return map[string]string{"node": "node-a", "state": string(state), "strategy": "LiveMigrate"}
	}
	m := scrape(t, e.Handler())
	for _, want := range []struct {
		name   string
		labels map[string]string
		value  float64
	}{
		{"node_agent_vms", vms(StateMigrating), 2},
		{"node_agent_vms", vms(StateBlocked), 1},
		{"node_agent_draining", node, 1},
		{"node_agent_safe_to_shutdown", node, 0},
	} {
		if got, ok := m.value(want.name, want.labels); !ok || got != want.value {
			t.Errorf("/metrics: %s%v = %v (present %v), want %v", want.name, want.labels, got, ok, want.value)
		}
	}

	// The gauge follows the status: VMs gone, series gone.
	safeStatus(&st)
	e.metrics.observe(st)
	m = scrape(t, e.Handler())
	if n := len(m["node_agent_vms"].GetMetric()); n != 0 {
		t.Errorf("/metrics still shows %d node_agent_vms series after the VMs left", n)
	}
	if got, ok := m.value("node_agent_safe_to_shutdown", node); !ok || got != 1 {
		t.Errorf("/metrics: node_agent_safe_to_shutdown = %v (present %v), want 1", got, ok)
	}
}

// families are the metric families of a /metrics answer, parsed as Prometheus does.
type families map[string]*dto.MetricFamily

// scrape reads /metrics from h and parses it with Prometheus's text parser.
func scrape(t *testing.T, h http.Handler) families {
	t.Helper()
	r := get(t, h, "/metrics")
	if r.code != http.StatusOK {
		t.Fatalf("/metrics = %d", r.code)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	m, err := parser.TextToMetricFamilies(strings.NewReader(r.body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return m
}

// value is the value of the gauge or counter sample of name whose labels are labels.
func (f families) value(name string, labels map[string]string) (float64, bool) {
	for _, m := range f[name].GetMetric() {
		got := map[string]string{}
		for _, l := range m.GetLabel() {
			got[l.GetName()] = l.GetValue()
		}
		if !maps.Equal(got, labels) {
			continue
		}
		if g := m.GetGauge(); g != nil {
			return g.GetValue(), true
		}
		return m.GetCounter().GetValue(), m.GetCounter() != nil
	}
	return 0, false
}

func TestHandlerOnlyGet(t *testing.T) {
	e := newTestEngine(t)
	rec := httptest.NewRecorder()
	e.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/safe-to-shutdown", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST /safe-to-shutdown = %d, want 405", rec.Code)
	}
}
