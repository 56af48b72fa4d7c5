package agent

// Unit tests of the sync path (sync, drain, withdraw, reenable and the shutdown intent),
// in the manner of sample-controller's controller_test.go: the informers' indexers are
// preloaded with the node's VMIs and pods, the Node lives in a fake clientset (the
// view reads it back, as the agent's informer shows its own writes), and the API
// actions the sync takes are asserted. The e2e tests prove the same across the real API.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	restfake "k8s.io/client-go/rest/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
	"github.com/node-agent/node-agent/systemd"
)

const bootID = "boot-1"

var t0 = time.Date(2030, 1, 2, 3, 0, 0, 0, time.UTC)

// fixture is the engine of thisNode with its informers' indexers and its clients.
type fixture struct {
	t        *testing.T
	kube     *fake.Clientset
	vmis     cache.Indexer
	pods     cache.Indexer
	clock    *clocktesting.FakeClock
	recorder *record.FakeRecorder
	engine   *Engine

	mu        sync.Mutex
	cancels   []string // evacuate/cancel requests to virt-api: namespace/name
	evictions []string // evictions requested: "[dry-run ]namespace/pod recorded|unrecorded"
	refusing  func(old, updated *corev1.Node) error
	// cancelAnswer, when set, is the HTTP status virt-api answers evacuate/cancel with.
	cancelAnswer func() int
	// migrations, by namespace/VMI, as the label-selected list of VMIs answers;
	// migrationLists counts those lists, migrationListed says what each one asked for
	// ("namespace: vmi,vmi").
	migrations      map[string][]kubevirtv1.VirtualMachineInstanceMigration
	migrationLists  int
	migrationListed []string
	// targetPodLists counts the lists of a migration's target pods.
	targetPodLists int
}

// listMigrations answers VMIMigrations: one list for the VMIs of a namespace.
func (f *fixture) listMigrations(ns string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.migrationLists++
	f.migrationListed = append(f.migrationListed, ns+": "+strings.Join(vmis, ","))
	out := map[string][]kubevirtv1.VirtualMachineInstanceMigration{}
	for _, vmi := range vmis {
		out[vmi] = append([]kubevirtv1.VirtualMachineInstanceMigration(nil), f.migrations[ns+"/"+vmi]...)
	}
	return out, nil
}

func newFixture(t *testing.T, node *corev1.Node, objs ...runtime.Object) *fixture {
	t.Helper()
	f := &fixture{
		t:        t,
		kube:     fake.NewClientset(node),
		vmis:     cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{}),
		pods:     cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{}),
		clock:    clocktesting.NewFakeClock(t0),
		recorder: record.NewFakeRecorder(100),
	}
	for _, o := range objs {
		var err error
		switch o := o.(type) {
		case *kubevirtv1.VirtualMachineInstance:
			err = f.vmis.Add(o)
		case *corev1.Pod:
			err = f.pods.Add(o)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	// An admission policy or RBAC that refuses some updates of the Node, while set.
	f.kube.PrependReactor("update", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		f.mu.Lock()
		refusing := f.refusing
		f.mu.Unlock()
		if refusing == nil {
			return false, nil, nil
		}
		updated := a.(k8stesting.UpdateAction).GetObject().(*corev1.Node)
		old, err := f.kube.Tracker().Get(schema.GroupVersionResource{Version: "v1", Resource: "nodes"}, "", updated.Name)
		if err != nil {
			return true, nil, err
		}
		if err := refusing(old.(*corev1.Node), updated); err != nil {
			return true, nil, err
		}
		return false, nil, nil
	})
	subresources := &restfake.RESTClient{
		NegotiatedSerializer: scheme.Codecs.WithoutConversion(),
		GroupVersion:         schema.GroupVersion{Group: "subresources.kubevirt.io", Version: "v1"},
		Client: restfake.CreateHTTPClient(func(r *http.Request) (*http.Response, error) {
			// PUT .../namespaces/NS/virtualmachineinstances/NAME/evacuate/cancel
			parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
			if r.Method != http.MethodPut || len(parts) < 6 || parts[len(parts)-1] != "cancel" {
				return &http.Response{StatusCode: http.StatusNotFound, Body: io.NopCloser(strings.NewReader(""))}, nil
			}
			f.mu.Lock()
			f.cancels = append(f.cancels, parts[len(parts)-5]+"/"+parts[len(parts)-3])
			answer := f.cancelAnswer
			f.mu.Unlock()
			if answer != nil {
				if code := answer(); code != http.StatusOK {
					return &http.Response{StatusCode: code, Header: http.Header{"Content-Type": {"application/json"}},
						Body: io.NopCloser(strings.NewReader(fmt.Sprintf(`{"kind":"Status","apiVersion":"v1","status":"Failure","code":%d}`, code)))}, nil
				}
			}
			return &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/json"}}, Body: io.NopCloser(strings.NewReader("{}"))}, nil
		}),
	}
	kvScheme, err := nodeinfo.NewKubeVirtScheme()
	if err != nil {
		t.Fatal(err)
	}
	kubevirt := &restfake.RESTClient{
		NegotiatedSerializer: serializer.WithoutConversionCodecFactory{CodecFactory: serializer.NewCodecFactory(kvScheme)},
		GroupVersion:         kubevirtv1.SchemeGroupVersion,
		Client: restfake.CreateHTTPClient(func(r *http.Request) (*http.Response, error) {
			// The migrations the agent created itself (withdraw deletes them): none here.
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/virtualmachineinstancemigrations") {
				return &http.Response{StatusCode: http.StatusOK, Header: http.Header{"Content-Type": {"application/json"}},
					Body: io.NopCloser(strings.NewReader(`{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstanceMigrationList","metadata":{},"items":[]}`))}, nil
			}
			return &http.Response{StatusCode: http.StatusNotFound, Body: io.NopCloser(strings.NewReader(""))}, nil
		}),
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	f.engine = New(fixtureView{f}, Clients{Kube: f.kube, KubeVirt: kubevirt, Subresources: subresources}, f.recorder, nil,
		Options{NodeName: thisNode, Clock: f.clock, Log: log})
	f.engine.evictor = fixtureEvictor{f}
	t.Cleanup(f.engine.queue.ShutDown)
	return f
}

// fixtureEvictor evicts every pod it is asked to (no webhook answers), and notes
// whether the drain record named the pod's VM when the eviction was sent.
type fixtureEvictor struct{ f *fixture }

func (x fixtureEvictor) evict(_ context.Context, pod *corev1.Pod, dryRun bool) answer {
	what := pod.Namespace + "/" + pod.Name
	if dryRun {
		what = "dry-run " + what
	}
	var rec DrainRecord
	n, err := fixtureView(x).Node()
	if ok, _ := readAnnotation(n, AnnotationDrain, &rec); err == nil && ok && len(rec.Requested) > 0 {
		what += " recorded"
	} else {
		what += " unrecorded"
	}
	x.f.mu.Lock()
	defer x.f.mu.Unlock()
	x.f.evictions = append(x.f.evictions, what)
	return answer{result: evicted}
}

// noEvictions fails the test if any eviction was sent.
func (f *fixture) noEvictions(why string) {
	f.t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.evictions) > 0 {
		f.t.Errorf("evictions %v: %s", f.evictions, why)
	}
}

// fixtureView is the engine's NodeView over the fixture.
type fixtureView struct{ f *fixture }

func (fixtureView) Synced() (bool, string)   { return true, "" }
func (fixtureView) LauncherPodsListed() bool { return true }
func (fixtureView) AddChangeHandler(func())  {}
func (v fixtureView) Node() (*corev1.Node, error) {
	return v.f.kube.CoreV1().Nodes().Get(context.Background(), thisNode, metav1.GetOptions{})
}
func (v fixtureView) VMIs() []*kubevirtv1.VirtualMachineInstance {
	var out []*kubevirtv1.VirtualMachineInstance
	for _, o := range v.f.vmis.List() {
		out = append(out, o.(*kubevirtv1.VirtualMachineInstance))
	}
	return out
}
func (v fixtureView) LauncherPods() []*corev1.Pod {
	var out []*corev1.Pod
	for _, o := range v.f.pods.List() {
		out = append(out, o.(*corev1.Pod))
	}
	return out
}
func (fixtureView) Config() (nodeinfo.Config, error) {
	return nodeinfo.Config{DrainTaintKey: nodeinfo.DefaultDrainTaintKey, DrainTaintKeySource: nodeinfo.SourceDefault}, nil
}
func (v fixtureView) VMIMigrations(_ context.Context, ns string, vmis []string) (map[string][]kubevirtv1.VirtualMachineInstanceMigration, error) {
	return v.f.listMigrations(ns, vmis)
}
func (fixtureView) NamespaceMigrations(context.Context, string) ([]kubevirtv1.VirtualMachineInstanceMigration, error) {
	return nil, nil
}
func (v fixtureView) MigrationTargetPods(ctx context.Context, ns string, migration types.UID) ([]corev1.Pod, error) {
	v.f.mu.Lock()
	v.f.targetPodLists++
	v.f.mu.Unlock()
	list, err := v.f.kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: kubevirtv1.MigrationJobLabel + "=" + string(migration)})
	if err != nil {
		return nil, err
	}
	return list.Items, nil
}

// sync runs one look at the node, as the queue's worker does.
func (f *fixture) sync() (bool, error) {
	f.t.Helper()
	f.kube.ClearActions()
	return f.engine.syncSafely(context.Background())
}

// writes are the API writes of the last sync, as "verb resource[/subresource]".
func (f *fixture) writes() []string {
	var out []string
	for _, a := range f.kube.Actions() {
		switch a.GetVerb() {
		case "get", "list", "watch":
			continue
		}
		what := a.GetVerb() + " " + a.GetResource().Resource
		if a.GetSubresource() != "" {
			what += "/" + a.GetSubresource()
		}
		out = append(out, what)
	}
	return out
}

// updates are the Nodes written by update in the last sync.
func (f *fixture) updates() []*corev1.Node {
	var out []*corev1.Node
	for _, a := range f.kube.Actions() {
		if u, ok := a.(k8stesting.UpdateAction); ok && a.GetResource().Resource == "nodes" {
			out = append(out, u.GetObject().(*corev1.Node))
		}
	}
	return out
}

func (f *fixture) node() *corev1.Node {
	f.t.Helper()
	n, err := fixtureView{f}.Node()
	if err != nil {
		f.t.Fatal(err)
	}
	return n
}

// events drains the recorded events.
func (f *fixture) events() []string {
	var out []string
	for {
		select {
		case e := <-f.recorder.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

func hasEventLike(events []string, prefix string) bool {
	for _, e := range events {
		if strings.HasPrefix(e, prefix) {
			return true
		}
	}
	return false
}

func (f *fixture) refuse(rule func(old, updated *corev1.Node) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.refusing = rule
}

// refuseGivingBack refuses every update that uncordons the node, as the test's
// admission policy does.
func refuseGivingBack(old, updated *corev1.Node) error {
	if old.Spec.Unschedulable && !updated.Spec.Unschedulable {
		return apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, updated.Name, fmt.Errorf("uncordoning is not allowed now"))
	}
	return nil
}

func testNode() *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: thisNode, Annotations: map[string]string{}}}
	n.Status.NodeInfo.BootID = bootID
	return n
}

func annotate(n *corev1.Node, key string, v any) {
	raw, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	n.Annotations[key] = string(raw)
}

// outOfService is the node as the agent leaves it during a host shutdown: the
// shutdown recorded, its own taint and cordon, and a drain record.
func outOfService(cancelled *time.Time, deadline time.Time) *corev1.Node {
	n := testNode()
	n.Spec.Unschedulable = true
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Value: "shutdown", Effect: corev1.TaintEffectNoSchedule}}
	annotate(n, AnnotationShutdown, ShutdownRecord{BootID: bootID, Started: t0, Deadline: deadline, Cancelled: cancelled})
	annotate(n, AnnotationOwned, Ownership{TaintKey: nodeinfo.DefaultDrainTaintKey, Cordoned: true, BootID: bootID, Reason: TriggerShutdown, Since: t0})
	annotate(n, AnnotationDrain, DrainRecord{Trigger: TriggerShutdown, TaintKey: nodeinfo.DefaultDrainTaintKey, Started: t0})
	return n
}

func givenBack(n *corev1.Node) bool {
	_, owned := n.Annotations[AnnotationOwned]
	_, recorded := n.Annotations[AnnotationShutdown]
	return !n.Spec.Unschedulable && !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) && !owned && !recorded
}

// noneVM is a running VM with evictionStrategy None and its virt-launcher pod on the node.
func noneVM(name string) (*kubevirtv1.VirtualMachineInstance, *corev1.Pod) {
	vmi := newVMI(name, thisNode, kubevirtv1.Running)
	none := kubevirtv1.EvictionStrategyNone
	vmi.Spec.EvictionStrategy = &none
	return vmi, launcherPod("virt-launcher-"+name, string(vmi.UID), thisNode, corev1.PodRunning)
}

func TestSyncShutdownRecordsItAndTakesTheNodeOutOfService(t *testing.T) {
	f := newFixture(t, testNode())
	deadline := t0.Add(10 * time.Minute)
	f.engine.ShutdownStarted(t0, deadline)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	ups := f.updates()
	if len(ups) != 1 {
		t.Fatalf("writes %v, want the shutdown record, taint and cordon in one update first", f.writes())
	}
	if w := f.writes(); w[0] != "update nodes" {
		t.Errorf("first write %q, want the update that takes the node out of service", w[0])
	}
	n := ups[0]
	var sd ShutdownRecord
	if ok, err := readAnnotation(n, AnnotationShutdown, &sd); !ok || err != nil || sd.BootID != bootID || !sd.Deadline.Equal(deadline) || sd.Cancelled != nil {
		t.Errorf("shutdown record %q (%v), want boot %s and deadline %s", n.Annotations[AnnotationShutdown], err, bootID, deadline)
	}
	var own Ownership
	if ok, _ := readAnnotation(n, AnnotationOwned, &own); !ok || !own.Cordoned || own.TaintKey != nodeinfo.DefaultDrainTaintKey || own.BootID != bootID {
		t.Errorf("ownership %q, want the taint and the cordon recorded with the boot ID", n.Annotations[AnnotationOwned])
	}
	if !n.Spec.Unschedulable || !HasDrainTaint(n, nodeinfo.DefaultDrainTaintKey) {
		t.Errorf("node not tainted and cordoned: %v %v", n.Spec.Unschedulable, n.Spec.Taints)
	}
	st, _ := f.engine.Status()
	if !st.Draining || st.Trigger != TriggerShutdown || !st.Safe {
		t.Errorf("status %+v, want a shutdown drain, safe (no VM)", st)
	}
	if ev := f.events(); !hasEventLike(ev, "Normal "+ReasonDrainStarted) || !hasEventLike(ev, "Normal "+ReasonDrainCompleted) {
		t.Errorf("events %v", ev)
	}

	// The next look writes nothing more to take the node out of service.
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if ups := f.updates(); len(ups) != 0 {
		t.Errorf("a second sync updated the node again: %v", f.writes())
	}
}

func TestSyncCancelIsRecordedFirstThenTheNodeGivenBack(t *testing.T) {
	f := newFixture(t, testNode())
	f.engine.ShutdownStarted(t0, t0.Add(time.Minute))
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	f.events()
	f.engine.ShutdownCancelled()
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	ups := f.updates()
	if len(ups) != 2 {
		t.Fatalf("writes %v, want the cancel mark, then the update that gives the node back", f.writes())
	}
	var sd ShutdownRecord
	if ok, _ := readAnnotation(ups[0], AnnotationShutdown, &sd); !ok || sd.Cancelled == nil || !ups[0].Spec.Unschedulable {
		t.Errorf("first update: shutdown record %q, unschedulable %v; want the cancel recorded before anything is undone",
			ups[0].Annotations[AnnotationShutdown], ups[0].Spec.Unschedulable)
	}
	if !givenBack(ups[1]) {
		t.Errorf("second update did not give the node back: %+v", ups[1])
	}
	if n := f.node(); !givenBack(n) || n.Annotations[AnnotationDrain] != "" {
		t.Errorf("node after the cancel: %+v", n)
	}
	ev := f.events()
	if !hasEventLike(ev, "Normal "+ReasonNodeReenabled+" Node re-enabled (the host shutdown was cancelled)") {
		t.Errorf("events %v, want NodeReenabled saying the shutdown was cancelled", ev)
	}
	if st, _ := f.engine.Status(); st.Draining || f.engine.ShuttingDown() {
		t.Errorf("still draining after the cancel: %+v", st)
	}
}

// An agent killed after recording the cancel: the next one finds the mark and gives the
// node back, though it heard of no shutdown.
func TestSyncRestartedAgentFinishesTheCancel(t *testing.T) {
	cancelled := t0.Add(30 * time.Second)
	vmi, pod := noneVM("guest")
	f := newFixture(t, outOfService(&cancelled, t0.Add(10*time.Minute)), vmi, pod)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if n := f.node(); !givenBack(n) || n.Annotations[AnnotationDrain] != "" {
		t.Errorf("node not given back: %+v", n)
	}
	f.noEvictions("the shutdown was cancelled")
	if f.engine.ShuttingDown() {
		t.Error("the restarted agent takes the cancelled shutdown as pending")
	}
}

// An agent restarted during a pending shutdown keeps the node out of service, acts on
// no VM before logind confirms the shutdown, then carries on with it.
func TestSyncRestartedAgentCarriesOnWithThePendingShutdown(t *testing.T) {
	vmi, pod := noneVM("guest")
	f := newFixture(t, outOfService(nil, t0.Add(10*time.Minute)), vmi, pod)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if !f.engine.ShuttingDown() {
		t.Error("the shutdown recorded on the node is not taken as pending")
	}
	if st, _ := f.engine.Status(); !st.Draining || st.Trigger != TriggerShutdown || len(st.VMs) != 1 || st.VMs[0].State != StatePending {
		t.Errorf("status %+v, want the shutdown's drain, the VM pending", st)
	}
	if w := f.writes(); len(w) != 1 || w[0] != "patch nodes" {
		t.Errorf("writes %v, want the state annotation only: the node is out of service already, no VM acted on", w)
	}
	f.vmis.Delete(vmi)
	f.pods.Delete(pod)
	f.engine.ShutdownStarted(t0.Add(time.Minute), t0.Add(10*time.Minute))
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if st, _ := f.engine.Status(); !st.Draining || !st.Safe {
		t.Errorf("status %+v after logind confirmed the shutdown, want drained", st)
	}
	f.engine.mu.Lock()
	f.engine.adopted = true // as read from the Node by a restarted agent
	f.engine.mu.Unlock()

	// Well past its deadline on the same boot, the shutdown did not happen.
	f.clock.SetTime(t0.Add(10*time.Minute + staleShutdown + time.Second))
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if !givenBack(f.node()) || f.engine.ShuttingDown() {
		t.Errorf("a shutdown long past its deadline on the same boot: node %+v, shutting down %v", f.node(), f.engine.ShuttingDown())
	}
}

func TestSyncRebootGivesBackOnlyTheAgentsOwn(t *testing.T) {
	n := outOfService(nil, t0.Add(time.Minute))
	n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: "example.com/maintenance", Effect: corev1.TaintEffectNoSchedule})
	n.Status.NodeInfo.BootID = "boot-2"
	f := newFixture(t, n)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	got := f.node()
	if !givenBack(got) || !HasDrainTaint(got, "example.com/maintenance") {
		t.Errorf("after the reboot: %+v", got)
	}
	if ev := f.events(); !hasEventLike(ev, "Normal "+ReasonNodeReenabled+" Node re-enabled (the node rebooted (boot ID boot-1 -> boot-2))") {
		t.Errorf("events %v", ev)
	}
}

// cancelledWhileRefused is a node out of service for a host shutdown that was just
// cancelled, with a None VM on it, while the API server refuses to uncordon it.
func cancelledWhileRefused(t *testing.T) *fixture {
	vmi, pod := noneVM("guest")
	n := outOfService(nil, t0.Add(time.Hour))
	delete(n.Annotations, AnnotationDrain)
	f := newFixture(t, n, vmi, pod)
	f.refuse(refuseGivingBack)
	f.engine.ShutdownCancelled()
	return f
}

// Giving the node back is refused for a while: the refusal is reported (event, metric,
// readiness), retried with a backoff that informer events do not bypass, and the VM is
// never evicted meanwhile; once allowed, the node is given back.
func TestSyncRefusedReenableIsReportedAndRetried(t *testing.T) {
	f := cancelledWhileRefused(t)

	if _, err := f.sync(); err != nil {
		t.Fatalf("sync returned %v: a refused re-enable must not fail the sync", err)
	}
	f.noEvictions("the shutdown was cancelled")
	if f.node().Annotations[AnnotationDrain] != "" {
		t.Errorf("a drain for the cancelled shutdown: %s", f.node().Annotations[AnnotationDrain])
	}
	var sd ShutdownRecord
	if ok, _ := readAnnotation(f.node(), AnnotationShutdown, &sd); !ok || sd.Cancelled == nil {
		t.Errorf("the cancel is not recorded on the node: %q", f.node().Annotations[AnnotationShutdown])
	}
	ev := f.events()
	if !hasEventLike(ev, "Warning "+ReasonNodeUpdateFailed+" cannot re-enable the node after the cancelled host shutdown") {
		t.Errorf("events %v, want a Warning %s", ev, ReasonNodeUpdateFailed)
	}
	if v := value(t, f.engine.metrics.ReenableFailing); v != 1 {
		t.Errorf("node_agent_reenable_failing %v, want 1", v)
	}
	if v := value(t, f.engine.metrics.NodeUpdateFailures.WithLabelValues("reenable")); v != 1 {
		t.Errorf("node_agent_node_update_failures_total{write=reenable} %v, want 1", v)
	}
	st, _ := f.engine.Status()
	if !strings.Contains(st.NodeError, "Forbidden") && !strings.Contains(st.NodeError, "forbidden") {
		t.Errorf("status nodeError %q, want the refusal", st.NodeError)
	}
	if r := get(t, f.engine.Handler(), "/readyz"); r.code != http.StatusServiceUnavailable || !strings.Contains(r.body, "re-enable") {
		t.Errorf("/readyz %d %q, want 503 naming the re-enable", r.code, r.body)
	}
	if st.Draining {
		t.Errorf("status %+v: draining for a cancelled shutdown", st)
	}

	// An informer event within the backoff: no new attempt.
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if ups := f.updates(); len(ups) != 0 {
		t.Errorf("retried within the backoff: %v", f.writes())
	}
	// After the backoff: tried again, refused again, reported once.
	f.clock.Step(time.Second)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if ups := f.updates(); len(ups) != 1 {
		t.Errorf("writes after the backoff %v, want one more attempt", f.writes())
	}
	if ev := f.events(); hasEventLike(ev, "Warning "+ReasonNodeUpdateFailed) {
		t.Errorf("the same refusal reported again: %v", ev)
	}
	// Allowed again: given back, the report cleared.
	f.refuse(nil)
	f.clock.Step(time.Minute)
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if !givenBack(f.node()) {
		t.Errorf("node not given back once allowed: %+v", f.node())
	}
	if v := value(t, f.engine.metrics.ReenableFailing); v != 0 {
		t.Errorf("node_agent_reenable_failing %v after success, want 0", v)
	}
	if r := get(t, f.engine.Handler(), "/readyz"); r.code != http.StatusOK {
		t.Errorf("/readyz %d %q after success", r.code, r.body)
	}
}

// The agent's own taint for a cancelled shutdown starts no drain, even while it cannot
// be removed: no VM is evicted for a shutdown that was cancelled. (Before the fix the
// taint drained the node as an operator's would.)
func TestSyncOwnTaintOfACancelledShutdownEvictsNothing(t *testing.T) {
	f := cancelledWhileRefused(t)
	if _, err := f.sync(); err != nil {
		t.Fatalf("sync: %v", err)
	}
	f.noEvictions("the shutdown was cancelled")
	if _, ok := f.node().Annotations[AnnotationDrain]; ok {
		t.Errorf("a drain started for a cancelled shutdown: %s", f.node().Annotations[AnnotationDrain])
	}
	if st, _ := f.engine.Status(); st.Draining || len(st.VMs) != 1 || st.VMs[0].State != StateRunning {
		t.Errorf("status %+v, want not draining and the VM running", st)
	}
}

// An operator's drain taint is a trigger whatever the shutdown does.
func TestSyncOperatorTaintDrains(t *testing.T) {
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	f := newFixture(t, n)
	f.engine.ShutdownCancelled()
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	var rec DrainRecord
	if ok, _ := readAnnotation(f.node(), AnnotationDrain, &rec); !ok || rec.Trigger != TriggerTaint || rec.Completed == nil {
		t.Errorf("drain record %q, want a completed taint drain", f.node().Annotations[AnnotationDrain])
	}
	if w := f.writes(); len(w) == 0 || w[0] != "patch nodes" {
		t.Errorf("writes %v, want the drain record patched first", w)
	}
	if !HasDrainTaint(f.node(), nodeinfo.DefaultDrainTaintKey) {
		t.Error("the operator's taint was removed")
	}
}

// withdraw: the taint went away; the evacuations this drain requested are cancelled
// through virt-api, the record removed, DrainWithdrawn sent.
func TestSyncWithdrawCancelsTheDrainsEvacuations(t *testing.T) {
	n := testNode()
	annotate(n, AnnotationDrain, DrainRecord{Trigger: TriggerTaint, TaintKey: nodeinfo.DefaultDrainTaintKey, Started: t0,
		Requested: map[string]Action{"ns/moving": ActionMigrate, "ns/other": ActionMigrate, "ns/stopped": ActionShutdown}})
	moving := newVMI("moving", thisNode, kubevirtv1.Running)
	moving.Status.EvacuationNodeName = thisNode
	other := newVMI("other", thisNode, kubevirtv1.Running) // not marked: nothing to cancel
	f := newFixture(t, n, moving, other, launcherPod("virt-launcher-moving", string(moving.UID), thisNode, corev1.PodRunning),
		launcherPod("virt-launcher-other", string(other.UID), thisNode, corev1.PodRunning))
	requeue, err := f.sync()
	if err != nil || requeue {
		t.Fatalf("sync = %v, %v", requeue, err)
	}
	f.mu.Lock()
	cancels := f.cancels
	f.mu.Unlock()
	if len(cancels) != 1 || cancels[0] != "ns/moving" {
		t.Errorf("evacuate/cancel requests %v, want ns/moving only", cancels)
	}
	if _, ok := f.node().Annotations[AnnotationDrain]; ok {
		t.Error("the drain record is still there")
	}
	ev := f.events()
	if !hasEventLike(ev, "Normal "+ReasonEvacuationCancelled) || !hasEventLike(ev, "Normal "+ReasonDrainWithdrawn+" Drain withdrawn: 1 evacuation cancelled") {
		t.Errorf("events %v", ev)
	}
	if st, _ := f.engine.Status(); st.Draining || len(st.VMs) != 2 {
		t.Errorf("status %+v", st)
	}
}

// withdraw while virt-api cannot answer (restarting: 503): the withdraw is retried, not
// completed with the evacuation left to run; an evacuation cancelled by an earlier try
// is not asked again; once virt-api answers, the withdraw completes with no warning.
// If it keeps failing for withdrawRetryFor, what was not undone is reported.
func TestSyncWithdrawRetriesAVirtAPIThatCannotAnswerYet(t *testing.T) {
	for _, tt := range []struct {
		name      string
		recovers  bool
		wantEvent string
	}{
		{"virt-api back", true, "Normal " + ReasonDrainWithdrawn + " Drain withdrawn: 2 evacuations cancelled"},
		{"virt-api gone for good", false, "Warning " + ReasonDrainWithdrawn},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := testNode()
			annotate(n, AnnotationDrain, DrainRecord{Trigger: TriggerTaint, TaintKey: nodeinfo.DefaultDrainTaintKey, Started: t0,
				Requested: map[string]Action{"ns/a": ActionMigrate, "ns/b": ActionMigrate}})
			a, b := newVMI("a", thisNode, kubevirtv1.Running), newVMI("b", thisNode, kubevirtv1.Running)
			a.Status.EvacuationNodeName, b.Status.EvacuationNodeName = thisNode, thisNode
			f := newFixture(t, n, a, b, launcherPod("virt-launcher-a", string(a.UID), thisNode, corev1.PodRunning),
				launcherPod("virt-launcher-b", string(b.UID), thisNode, corev1.PodRunning))
			calls := 0
			f.cancelAnswer = func() int { // a answered, then b refused while virt-api restarts
				calls++
				if calls == 1 || (tt.recovers && calls >= 4) {
					return http.StatusOK
				}
				return http.StatusServiceUnavailable
			}
			for try := 1; try <= 2; try++ {
				if _, err := f.sync(); err == nil {
					t.Fatalf("try %d: sync succeeded with virt-api answering 503, want an error to retry", try)
				}
				if _, ok := f.node().Annotations[AnnotationDrain]; !ok {
					t.Fatalf("try %d: the drain record is gone before its evacuations were cancelled", try)
				}
				if ev := f.events(); hasEventLike(ev, "Warning "+ReasonEvacuationNotCancelled) {
					t.Fatalf("try %d: a passing 503 reported as not cancelled: %v", try, ev)
				}
				f.clock.Step(30 * time.Second)
			}
			if !tt.recovers {
				f.clock.Step(withdrawRetryFor)
			}
			if _, err := f.sync(); err != nil {
				t.Fatalf("sync: %v", err)
			}
			if _, ok := f.node().Annotations[AnnotationDrain]; ok {
				t.Error("the drain record is still there")
			}
			f.mu.Lock()
			cancels := f.cancels
			f.mu.Unlock()
			if got := strings.Join(cancels, ","); got != "ns/a,ns/b,ns/b,ns/b" {
				t.Errorf("evacuate/cancel requests %s, want a once and b until it is answered or given up", got)
			}
			if ev := f.events(); !hasEventLike(ev, tt.wantEvent) {
				t.Errorf("events %v, want %q", ev, tt.wantEvent)
			}
		})
	}
}

// updateNode: a conflict is retried with a fresh read; any other error is returned.
func TestUpdateNodeRetriesConflictsOnly(t *testing.T) {
	f := newFixture(t, testNode())
	conflicts := 1
	f.kube.PrependReactor("update", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		if conflicts > 0 {
			conflicts--
			return true, nil, apierrors.NewConflict(schema.GroupResource{Resource: "nodes"}, thisNode, fmt.Errorf("the object has been modified"))
		}
		return false, nil, nil
	})
	err := f.engine.updateNode(context.Background(), func(n *corev1.Node) bool { n.Spec.Unschedulable = true; return true })
	gets := 0
	for _, a := range f.kube.Actions() {
		if a.GetVerb() == "get" {
			gets++
		}
	}
	if err != nil || !f.node().Spec.Unschedulable {
		t.Fatalf("updateNode after a conflict: %v, unschedulable %v", err, f.node().Spec.Unschedulable)
	}
	if gets != 2 {
		t.Errorf("%d reads, want a fresh read after the conflict", gets)
	}
	f.refuse(func(_, _ *corev1.Node) error {
		return apierrors.NewForbidden(schema.GroupResource{Resource: "nodes"}, thisNode, fmt.Errorf("no"))
	})
	start := time.Now()
	err = f.engine.updateNode(context.Background(), func(n *corev1.Node) bool { n.Spec.Unschedulable = false; return true })
	if !apierrors.IsForbidden(err) {
		t.Errorf("updateNode refused: %v, want the Forbidden returned", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a Forbidden took %v to return: retried", d)
	}
}

// value reads a gauge or counter.
func value(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Gauge != nil {
		return m.Gauge.GetValue()
	}
	return m.Counter.GetValue()
}

// fakeSource is a lock holder that reaches logind and sees no shutdown.
type fakeSource struct{}

func (fakeSource) State() (systemd.ShutdownState, <-chan struct{}) {
	return systemd.ShutdownState{Reachable: true, Connected: true, LockHeld: true}, nil
}

// A shutdown an earlier agent recorded, cancelled while no agent ran: once the
// lock holder reaches a logind that prepares no shutdown, the node is given back.
func TestRunShutdownNoShutdownAtConnectGivesBackARecordedOne(t *testing.T) {
	f := newFixture(t, outOfService(nil, t0.Add(time.Hour)))
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if !f.engine.ShuttingDown() {
		t.Fatal("the recorded shutdown is not taken as pending")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		f.engine.RunShutdown(ctx, fakeSource{}, time.Minute)
		close(done)
	}()
	err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		f.clock.Step(250 * time.Millisecond)
		return !f.engine.ShuttingDown(), nil
	})
	cancel()
	<-done
	if err != nil {
		t.Fatalf("the engine was not told that no shutdown is pending: %v", err)
	}
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if n := f.node(); !givenBack(n) {
		t.Errorf("node not given back: %+v", n)
	}
}

// releasedSource is a lock holder that already let a shutdown go (safe) when the engine
// first asks it.
type releasedSource struct{ since, releasedAt time.Time }

func (s releasedSource) State() (systemd.ShutdownState, <-chan struct{}) {
	return systemd.ShutdownState{Reachable: true, Connected: true, LockHeld: true, ShuttingDown: true, Held: true,
		Since: s.since, Released: true, ReleaseOutcome: systemd.OutcomeSafe, ReleasedAt: s.releasedAt}, nil
}

// The holder of a node with nothing to drain lets the shutdown go before the engine
// first sees it: the release is this process's, reported with a ShutdownReleased
// event. A release from before the engine began following the holder (the engine
// restarted after it) is not reported again.
func TestRunShutdownReportsAReleaseMadeBeforeItSawTheShutdown(t *testing.T) {
	for _, tt := range []struct {
		name       string
		releasedAt time.Time
		want       int
	}{
		{"released after the engine began", t0.Add(time.Millisecond), 1},
		{"released before the engine began", t0.Add(-time.Minute), 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, testNode())
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() {
				f.engine.RunShutdown(ctx, releasedSource{since: tt.releasedAt.Add(-time.Millisecond), releasedAt: tt.releasedAt}, time.Minute)
				close(done)
			}()
			// The engine takes the node out of service for the shutdown it sees; the
			// release, when reported, is reported in the same pass.
			err := wait.PollUntilContextTimeout(ctx, 10*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
				return f.engine.ShuttingDown(), nil
			})
			cancel()
			<-done
			if err != nil {
				t.Fatalf("the engine did not take up the shutdown: %v", err)
			}
			events, got := f.events(), 0
			for _, e := range events {
				if strings.HasPrefix(e, "Normal "+ReasonShutdownReleased) {
					got++
				}
			}
			if got != tt.want {
				t.Errorf("%d %s events (%q), want %d", got, ReasonShutdownReleased, events, tt.want)
			}
		})
	}
}

// drain: a LiveMigrate VM that cannot migrate is reported blocked (events on the VMI and
// the Node, once) and never evicted; the drain is not complete while it is there, and
// completes (recorded, DrainCompleted) once it is gone.
func TestSyncDrainReportsABlockedVMAndCompletesWhenItLeaves(t *testing.T) {
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	vmi := newVMI("pinned", thisNode, kubevirtv1.Running)
	lm := kubevirtv1.EvictionStrategyLiveMigrate
	vmi.Spec.EvictionStrategy = &lm
	vmi.Status.Conditions = []kubevirtv1.VirtualMachineInstanceCondition{
		migratableCondition(corev1.ConditionFalse, kubevirtv1.VirtualMachineInstanceReasonDisksNotMigratable, "PVC rootdisk is not shared")}
	pod := launcherPod("virt-launcher-pinned", string(vmi.UID), thisNode, corev1.PodRunning)
	f := newFixture(t, n, vmi, pod)
	for i := 0; i < 2; i++ {
		requeue, err := f.sync()
		if err != nil || !requeue {
			t.Fatalf("sync %d = %v, %v; want a drain looked at again", i, requeue, err)
		}
		f.noEvictions("a LiveMigrate VM that cannot migrate")
	}
	st, _ := f.engine.Status()
	if !st.Draining || st.Safe || len(st.VMs) != 1 || st.VMs[0].State != StateBlocked || !strings.Contains(st.VMs[0].Detail, "PVC rootdisk is not shared") {
		t.Errorf("status %+v, want the VM blocked with its reason", st)
	}
	blocked := 0
	for _, e := range f.events() {
		if strings.HasPrefix(e, "Warning "+ReasonBlocked) {
			blocked++
		}
	}
	if blocked != 2 {
		t.Errorf("%d %s events over two looks, want 2 (VMI and Node, once)", blocked, ReasonBlocked)
	}
	var rec DrainRecord
	if ok, _ := readAnnotation(f.node(), AnnotationDrain, &rec); !ok || rec.Completed != nil || rec.Trigger != TriggerTaint {
		t.Errorf("drain record %q, want a taint drain not completed", f.node().Annotations[AnnotationDrain])
	}

	if err := f.vmis.Delete(vmi); err != nil {
		t.Fatal(err)
	}
	if err := f.pods.Delete(pod); err != nil {
		t.Fatal(err)
	}
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := readAnnotation(f.node(), AnnotationDrain, &rec); !ok || rec.Completed == nil {
		t.Errorf("drain record %q, want it completed", f.node().Annotations[AnnotationDrain])
	}
	if st, _ := f.engine.Status(); !st.Safe || f.node().Annotations[AnnotationState] != "drained: no VM left, safe to power off" {
		t.Errorf("status %+v, annotation %q", st, f.node().Annotations[AnnotationState])
	}
	if ev := f.events(); !hasEventLike(ev, "Normal "+ReasonDrainCompleted) {
		t.Errorf("events %v, want %s", ev, ReasonDrainCompleted)
	}
}

// After a reboot the node is given back as rebooted, even when the inhibitor has said
// first that no shutdown is pending.
func TestSyncRebootBeforeTheFirstLookSaysRebooted(t *testing.T) {
	n := outOfService(nil, t0.Add(time.Minute))
	n.Status.NodeInfo.BootID = "boot-2"
	f := newFixture(t, n)
	f.engine.ShutdownCancelled()
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	if !givenBack(f.node()) {
		t.Errorf("node not given back: %+v", f.node())
	}
	if ev := f.events(); !hasEventLike(ev, "Normal "+ReasonNodeReenabled+" Node re-enabled (the node rebooted") {
		t.Errorf("events %v, want NodeReenabled saying the node rebooted", ev)
	}
}

// A host shutdown drains a None VM: the drain record names it before its virt-launcher
// pod is evicted, and a cancel stops the drain from evicting anything more.
func TestSyncShutdownEvictsANoneVMRecordedFirst(t *testing.T) {
	vmi, pod := noneVM("guest")
	f := newFixture(t, testNode(), vmi, pod)
	f.engine.ShutdownStarted(t0, t0.Add(time.Hour))
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	evictions := append([]string(nil), f.evictions...)
	f.evictions = nil
	f.mu.Unlock()
	if len(evictions) != 1 || evictions[0] != "ns/virt-launcher-guest recorded" {
		t.Errorf("evictions %v, want the None VM's pod evicted once, after the drain record named it", evictions)
	}
	if ev := f.events(); !hasEventLike(ev, "Normal "+ReasonShutdownRequested) {
		t.Errorf("events %v, want %s", ev, ReasonShutdownRequested)
	}
	// A second pod for the VM (the first one is gone, say): cancelled, nothing evicted.
	if err := f.pods.Delete(pod); err != nil {
		t.Fatal(err)
	}
	if err := f.pods.Add(launcherPod("virt-launcher-guest-2", string(vmi.UID), thisNode, corev1.PodRunning)); err != nil {
		t.Fatal(err)
	}
	f.engine.ShutdownCancelled()
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	f.noEvictions("the shutdown was cancelled")
	if !givenBack(f.node()) {
		t.Errorf("node not given back: %+v", f.node())
	}
}

// panickyEvictor panics for one pod, as a bug met on one VM's objects would, and
// evicts the others as the fixture's evictor does.
type panickyEvictor struct {
	fixtureEvictor
	pod string
}

func (x panickyEvictor) evict(ctx context.Context, pod *corev1.Pod, dryRun bool) answer {
	if pod.Name == x.pod {
		panic("a bad object")
	}
	return x.fixtureEvictor.evict(ctx, pod, dryRun)
}

// A panic while acting on one VM runs in act's own goroutine, where syncSafely cannot
// recover it: it must not crash the agent, the other VMs are still acted on, and the
// VM that met it is left pending and backs off.
func TestSyncPanicActingOnOneVMIsContained(t *testing.T) {
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	bad, badPod := noneVM("bad")
	good, goodPod := noneVM("good")
	f := newFixture(t, n, bad, badPod, good, goodPod)
	f.engine.evictor = panickyEvictor{fixtureEvictor{f}, badPod.Name}
	f.engine.ShutdownCancelled()
	if _, err := f.sync(); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	evictions := append([]string(nil), f.evictions...)
	f.mu.Unlock()
	if len(evictions) != 1 || !strings.Contains(evictions[0], goodPod.Name) {
		t.Errorf("evictions %v, want only %s", evictions, goodPod.Name)
	}
	st, _ := f.engine.Status()
	found := false
	for _, v := range st.VMs {
		if v.Name == "bad" {
			found = true
			if v.State != StatePending || !strings.Contains(v.Detail, "a bad object") {
				t.Errorf("the VM that panicked is %s %q, want pending naming the panic", v.State, v.Detail)
			}
		}
	}
	if !found {
		t.Errorf("the VM that panicked is not in the status: %+v", st.VMs)
	}
}

// wavesEvictor holds each eviction until as many are in flight as the bound allows
// (bound, or the VMs not yet answered, whichever is fewer), or its deadline passed, then
// answers as the fixture's evictor does; it counts the most in flight. Too low a bound
// (or none in parallel) waits out the deadline; too high a bound shows as more in flight.
type wavesEvictor struct {
	fixtureEvictor
	total, bound int
	deadline     context.Context
	cond         *sync.Cond
	state        *waves
}

type waves struct {
	inFlight, answered, most int
	timedOut                 bool // a request was let go by the deadline
}

func (x wavesEvictor) evict(ctx context.Context, pod *corev1.Pod, dryRun bool) answer {
	x.cond.L.Lock()
	st := x.state
	st.inFlight++
	st.most = max(st.most, st.inFlight)
	x.cond.Broadcast()
	for st.inFlight < min(x.bound, x.total-st.answered) && x.deadline.Err() == nil {
		x.cond.Wait()
	}
	st.timedOut = st.timedOut || st.inFlight < min(x.bound, x.total-st.answered)
	x.cond.L.Unlock()
	a := x.fixtureEvictor.evict(ctx, pod, dryRun)
	x.cond.L.Lock()
	st.inFlight--
	st.answered++
	x.cond.L.Unlock()
	return a
}

// fixedLevel is an API priority level that the agent's requests are always in.
type fixedLevel struct {
	name string
	err  error
}

func (l fixedLevel) Name(context.Context) (string, error) { return l.name, l.err }

// A full node's VMs are asked actConcurrency at a time where the agent's requests share
// an API priority level with KubeVirt's webhook (all at once starves the webhook of the
// level's seats, see actConcurrency), and all at once in the agent's own level
// (nodeinfo.OwnPriorityLevel, which paces them apart from the webhook's reads); every
// VM is asked in the one sync either way. The status names the level.
func TestSyncBoundsTheEvictionsInFlight(t *testing.T) {
	const vms = 110 // the kubelet's default pod limit
	for _, tc := range []struct {
		what  string
		level PriorityLevel
		want  int
		// status is the level the status names.
		status string
	}{
		{what: "level not known", level: nil, want: actConcurrency},
		{what: "workload-low, shared with virt-api", level: fixedLevel{name: "workload-low"}, want: actConcurrency, status: "workload-low"},
		{what: "the level cannot be told", level: fixedLevel{err: errors.New("forbidden")}, want: actConcurrency},
		{what: "a level of its own", level: fixedLevel{name: nodeinfo.OwnPriorityLevel}, want: vms, status: nodeinfo.OwnPriorityLevel},
	} {
		t.Run(tc.what, func(t *testing.T) {
			n := testNode()
			n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
			var objs []runtime.Object
			for i := range vms {
				vmi, pod := noneVM(fmt.Sprintf("vm-%03d", i))
				objs = append(objs, vmi, pod)
			}
			f := newFixture(t, n, objs...)
			f.engine.opts.PriorityLevel = tc.level
			// The fixture's recorder holds 100 events; a full one blocks its sender.
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				for {
					select {
					case <-f.recorder.Events:
					case <-stop:
						return
					}
				}
			}()
			deadline, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cond := sync.NewCond(&sync.Mutex{})
			state := &waves{}
			go func() { // wake the waiters at the deadline
				<-deadline.Done()
				cond.L.Lock()
				cond.Broadcast()
				cond.L.Unlock()
			}()
			f.engine.evictor = wavesEvictor{fixtureEvictor: fixtureEvictor{f}, total: vms, bound: tc.want, deadline: deadline, cond: cond, state: state}
			f.engine.ShutdownCancelled()
			if _, err := f.sync(); err != nil {
				t.Fatal(err)
			}
			cond.L.Lock()
			most, timedOut := state.most, state.timedOut
			cond.L.Unlock()
			if most != tc.want {
				t.Errorf("at most %d evictions were in flight at once, want %d", most, tc.want)
			}
			if timedOut {
				t.Errorf("the evictions were not sent %d at a time: the evictor waited out its deadline", tc.want)
			}
			if st, _ := f.engine.Status(); st.PriorityLevel != tc.status {
				t.Errorf("the status names API priority level %q, want %q", st.PriorityLevel, tc.status)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if len(f.evictions) != vms {
				t.Errorf("%d evictions, want every VM's %d", len(f.evictions), vms)
			}
		})
	}
}

// The state annotation follows a drain: a change of phase at once, a change of the
// counts at most every stateEvery (each write is an update of the Node, which every
// watcher of Nodes receives), with a look asked for when it is due.
func TestSyncStateAnnotationWritesCountsAtMostEveryStateEvery(t *testing.T) {
	n := testNode()
	n.Spec.Taints = []corev1.Taint{{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
	var objs []runtime.Object
	for i := range 3 {
		vmi, pod := noneVM(fmt.Sprintf("vm-%d", i))
		objs = append(objs, vmi, pod)
	}
	f := newFixture(t, n, objs...)
	gone := func(i int) {
		t.Helper()
		if err := f.vmis.Delete(objs[2*i]); err != nil {
			t.Fatal(err)
		}
		if err := f.pods.Delete(objs[2*i+1]); err != nil {
			t.Fatal(err)
		}
	}
	step := func(what, want string) {
		t.Helper()
		if _, err := f.sync(); err != nil {
			t.Fatal(err)
		}
		if got := f.node().Annotations[AnnotationState]; !strings.HasPrefix(got, want) {
			t.Errorf("%s: state annotation %q, want %q...", what, got, want)
		}
	}
	step("the drain starts", "draining (taint): 3 VMs left")
	gone(0)
	step("a VM gone within stateEvery", "draining (taint): 3 VMs left")
	if n := f.engine.queue.Len(); n != 0 {
		t.Errorf("%d looks queued at once, want the next one after stateEvery", n)
	}
	f.clock.Step(stateEvery)
	step("the next look after stateEvery", "draining (taint): 2 VMs left")
	gone(1)
	step("another VM gone within stateEvery", "draining (taint): 2 VMs left")
	gone(2)
	step("the last VM gone", "drained: no VM left, safe to power off")
}

// The live migrations are asked first, then the rest, each in the order given: KubeVirt's
// first migrations should not start behind the shutdowns asked in the same moment.
func TestMigrationsFirst(t *testing.T) {
	actions := []Action{ActionShutdown, ActionMigrate, ActionShutdown, ActionMigrate, ActionExternal, ActionMigrate}
	var vms []*vm
	decisions := map[string]Decision{}
	for i, a := range actions {
		v := &vm{key: fmt.Sprintf("ns/vm-%d", i)}
		vms = append(vms, v)
		decisions[v.key] = Decision{Action: a}
	}
	var got []string
	for _, v := range migrationsFirst(vms, decisions) {
		got = append(got, v.key)
	}
	want := []string{"ns/vm-1", "ns/vm-3", "ns/vm-5", "ns/vm-0", "ns/vm-2", "ns/vm-4"}
	if !slices.Equal(got, want) {
		t.Errorf("acted on in the order %v, want %v", got, want)
	}
	if vms[0].key != "ns/vm-0" {
		t.Errorf("the caller's slice was reordered")
	}
}
