package e2e

// One agent's footprint as the cluster around its node grows (issue 14, point 4): its
// memory with 100, 1,000 and 10,000 VMIs and virt-launcher pods on other nodes, for an
// agent that ran all along and for one started at that size, with a heap profile of each;
// and at each size the one read of the whole cluster an agent makes, the capacity check
// when its host shutdown's turn comes (fleet.Fits), run in the bench's process.
//
//	NODE_AGENT_BENCH_OTHERS=100,1000,10000 \
//	  go test -run '^$' -bench BenchmarkAgentFootprint -benchtime 1x -timeout 60m ./integration/e2e/
//
// The VMI and the pod copied are real: one VM is started on the shared test cluster
// (virt-api's defaults, virt-controller's launcher pod, the simulated virt-handler's
// status), and its VMI and pod are written, renamed and moved to other nodes, into a
// cluster of the bench's own that has KubeVirt's CRDs but neither virt-api nor
// virt-controller, so that nothing acts on the copies. Its nodes keep their Ready
// status for the bench's length (a long node-monitor grace period), so no pod is
// evicted. Run without -race, as the benchmarks are: the agent is then a plain build.
// The heap profiles are kept in NODE_AGENT_BENCH_PROFILES (default: a temporary folder,
// printed).

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/fleet"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/nodeinfo"
)

// footprintSample is one agent's memory, read at one time.
type footprintSample struct {
	rss, anon, hwm int     // /proc/PID/status VmRSS, RssAnon, VmHWM (KiB)
	heapInuse      float64 // go_memstats_heap_inuse_bytes, MiB
	profile        string  // the heap profile's file
}

func BenchmarkAgentFootprint(b *testing.B) {
	sizes := []int{100, 1000, 10000}
	if v := os.Getenv("NODE_AGENT_BENCH_OTHERS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				b.Fatalf("NODE_AGENT_BENCH_OTHERS=%q: want positive numbers, comma-separated, growing", v)
			}
			if len(sizes) > 0 && n <= sizes[len(sizes)-1] {
				b.Fatalf("NODE_AGENT_BENCH_OTHERS=%q: want growing numbers", v)
			}
			sizes = append(sizes, n)
		}
	}
	for i := 0; i < b.N; i++ {
		benchFootprint(b, sizes)
	}
}

func benchFootprint(b *testing.B, sizes []int) {
	out := os.Stdout
	// The templates: one real VMI and its virt-launcher pod.
	tsc := newScenario(b, 1)
	vmi := tsc.createVM("template")
	pod := tsc.launcherPod(vmi, vmi.Status.NodeName)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour)
	defer cancel()
	c, err := cluster.Start(ctx, cluster.Options{WithoutKubeVirtControllers: true, NodeMonitorGracePeriod: 2 * time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	defer stopPrivateCluster(b, c)
	sc := &scenario{t: b, ctx: ctx, env: &env{cluster: c, agentBin: shared.agentBin}, ns: "footprint"}
	fast := rest.CopyConfig(c.RESTConfig)
	fast.QPS, fast.Burst = 1000, 1000
	kube, err := kubernetes.NewForConfig(fast)
	if err != nil {
		b.Fatal(err)
	}
	kv, err := nodeinfo.NewKubeVirtClient(fast)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: sc.ns}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	const own, others = "footprint-own", 10
	nodes := []string{own}
	for i := range others {
		nodes = append(nodes, fmt.Sprintf("footprint-other-%d", i))
	}
	for _, n := range nodes {
		createReadyNode(b, ctx, kube, n)
	}

	var created atomic.Int64
	// place writes copies number from..to-1 of the templates onto nodes (round robin).
	place := func(from, to int, onto []string) {
		var wg sync.WaitGroup
		work := make(chan int)
		var failed atomic.Value
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range work {
					if err := copyVM(ctx, kube, kv, vmi, pod, sc.ns, fmt.Sprintf("vm-%05d", i), onto[i%len(onto)]); err != nil {
						failed.Store(err)
					}
					created.Add(1)
				}
			}()
		}
		for i := from; i < to; i++ {
			work <- i
		}
		close(work)
		wg.Wait()
		if err, _ := failed.Load().(error); err != nil {
			b.Fatal(err)
		}
	}
	// 10 VMs on the agent's own node: its caches hold these.
	const ownVMs = 10
	place(0, ownVMs, nodes[:1])

	sample := func(a *agentProc, name string) footprintSample {
		pid := a.cmd.Process.Pid
		s := footprintSample{rss: procStatusKiB(pid, "VmRSS:"), anon: procStatusKiB(pid, "RssAnon:"), hwm: procStatusKiB(pid, "VmHWM:")}
		if v, ok := a.metric("go_memstats_heap_inuse_bytes"); ok {
			s.heapInuse = v / (1 << 20)
		}
		s.profile = a.heapProfile(name)
		return s
	}
	// settle waits until the agent reports its node's VMs, then lets it rest, so that
	// what a list or a watch brought has been taken in.
	settle := func(a *agentProc) {
		sc.eventually(2*time.Minute, "the agent to see its node's VMs", func() (bool, string) {
			_, st := a.safeToShutdown("")
			return len(st.VMs) == ownVMs, fmt.Sprintf("%d VMs", len(st.VMs))
		})
		select {
		case <-time.After(20 * time.Second):
		case <-ctx.Done():
			b.Fatal(ctx.Err())
		}
	}
	release := releaseBuild(ctx, b)
	start := func(bin string) *agentProc {
		addr := freeAddr(b)
		a := sc.spawnAgent(bin, own, addr, []string{"run", "--kubeconfig=" + c.Kubeconfig, "--node-name=" + own,
			"--listen-address=" + addr, "--shutdown-inhibitor=false", "--profiling"}, nil)
		a.waitServing("/healthz", time.Minute)
		settle(a)
		return a
	}
	fileMiB := func(path string) float64 {
		st, err := os.Stat(path)
		if err != nil {
			b.Fatal(err)
		}
		return float64(st.Size()) / (1 << 20)
	}

	type row struct {
		others                  int
		running, fresh, release footprintSample
		capacity                capacitySample
		apiRSS                  int
		writeTime               time.Duration
	}
	freshSample := func(bin, name string) footprintSample {
		a := start(bin)
		defer a.stop()
		return sample(a, name)
	}
	running := start(shared.agentBin)
	rows := []row{{others: 0, running: sample(running, "running-0"), capacity: measureCapacityCheck(b, ctx, c.RESTConfig, own), apiRSS: procStatusKiB(c.PID("kube-apiserver"), "VmRSS:")}}
	rows[0].fresh = rows[0].running
	rows[0].release = freshSample(release, "release-0")
	fmt.Fprintf(out, "bench: agent up on %s with %d VMs of its own, no VMs elsewhere\n", own, ownVMs)
	have := 0
	for _, n := range sizes {
		t0 := time.Now()
		place(ownVMs+have, ownVMs+n, nodes[1:])
		have = n
		r := row{others: n, writeTime: time.Since(t0)}
		fmt.Fprintf(out, "bench: %d VMIs and pods on %d other nodes (written in %s)\n", n, others, r.writeTime.Round(time.Second))
		settle(running)
		r.running = sample(running, fmt.Sprintf("running-%d", n))
		r.fresh = freshSample(shared.agentBin, fmt.Sprintf("fresh-%d", n))
		r.release = freshSample(release, fmt.Sprintf("release-%d", n))
		r.capacity = measureCapacityCheck(b, ctx, c.RESTConfig, own)
		r.apiRSS = procStatusKiB(c.PID("kube-apiserver"), "VmRSS:")
		rows = append(rows, r)
	}
	running.stop()

	mib := func(kib int) float64 { return float64(kib) / 1024 }
	cell := func(s footprintSample) string {
		return fmt.Sprintf("%.1f / %.1f / %.1f / %.1f", mib(s.rss), mib(s.anon), mib(s.hwm), s.heapInuse)
	}
	fmt.Fprintf(out, "\nbench: binaries: the test build %.1f MiB, the release build (hack/build.sh) %.1f MiB\n", fileMiB(shared.agentBin), fileMiB(release))
	fmt.Fprintf(out, "\n| VMIs and pods on other nodes | test build running since 0 | test build started at this size | release build started at this size | kube-apiserver RSS (MiB) |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(out, "| %d | %s | %s | %s | %.0f |\n", r.others, cell(r.running), cell(r.fresh), cell(r.release), mib(r.apiRSS))
	}
	fmt.Fprintf(out, "\n(each agent: resident / its own memory (RssAnon) / peak resident (VmHWM) / Go heap in use, MiB)\n")
	fmt.Fprintf(out, "\nThe capacity check at a host shutdown's turn (fleet.Fits for the agent's node, in the bench's process, the agent's client settings; median of %d):\n\n", capacityRuns)
	fmt.Fprintf(out, "| VMIs and pods on other nodes | requests | MiB received | MiB allocated | Go heap's growth at most (MiB) | time |\n|---|---|---|---|---|---|\n")
	for _, r := range rows {
		k := r.capacity
		fmt.Fprintf(out, "| %d | %d | %.1f | %.1f | %.1f | %s |\n", r.others, k.requests, k.received, k.allocated, k.heapGrowth, k.took.Round(time.Millisecond))
	}
	last := rows[len(rows)-1]
	fmt.Fprintf(out, "\nbench: heap profiles in %s; the release build's at %d other VMIs (go tool pprof -top -sample_index=inuse_space):\n%s\n",
		filepath.Dir(last.release.profile), last.others, pprofTop(release, last.release.profile))
	b.ReportMetric(mib(last.release.anon), "MiB-own-at-largest")
	b.ReportMetric(mib(last.release.hwm), "MiB-peak-at-largest")
}

// capacitySample is one run of the capacity check that an agent makes when its host
// shutdown's turn comes (fleet.Fits): what it asked of the API server and what it cost
// the process.
type capacitySample struct {
	requests   int
	received   float64 // MiB of answers
	allocated  float64 // MiB allocated during the check
	heapGrowth float64 // MiB: the Go heap's objects at most during the check, over before it
	took       time.Duration
}

// capacityRuns is how many times measureCapacityCheck runs the check (the median is kept).
const capacityRuns = 3

// measureCapacityCheck runs fleet.Fits for node's virt-launcher pods against the
// cluster of cfg as the agent's client would (protobuf), capacityRuns times, and returns
// the median run (by heap growth). The process's other goroutines allocate little
// meanwhile (the cluster runs in processes of its own).
func measureCapacityCheck(b *testing.B, ctx context.Context, cfg *rest.Config, node string) capacitySample {
	b.Helper()
	var requests, received atomic.Int64
	cc := rest.CopyConfig(cfg)
	cc.QPS, cc.Burst = 100, 300
	cc.ContentType = "application/vnd.kubernetes.protobuf"
	cc.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	cc.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(req *http.Request) (*http.Response, error) {
			requests.Add(1)
			resp, err := rt.RoundTrip(req)
			if resp != nil {
				resp.Body = &countingBody{ReadCloser: resp.Body, n: &received}
			}
			return resp, err
		})
	})
	kube, err := kubernetes.NewForConfig(cc)
	if err != nil {
		b.Fatal(err)
	}
	pods, err := kube.CoreV1().Pods("").List(ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
	if err != nil {
		b.Fatal(err)
	}
	var mine []*corev1.Pod
	for i := range pods.Items {
		mine = append(mine, &pods.Items[i])
	}
	var runs []capacitySample
	for range capacityRuns {
		requests.Store(0)
		received.Store(0)
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		heap := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		metrics.Read(heap)
		base, peak := heap[0].Value.Uint64(), heap[0].Value.Uint64()
		done := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			t := time.NewTicker(time.Millisecond)
			defer t.Stop()
			for {
				metrics.Read(heap)
				peak = max(peak, heap[0].Value.Uint64())
				select {
				case <-done:
					return
				case <-t.C:
				}
			}
		}()
		t0 := time.Now()
		why, err := fleet.Fits(ctx, kube, node, mine, nil, nil, nil, nil)
		took := time.Since(t0)
		close(done)
		<-sampled
		if err != nil {
			b.Fatal(err)
		}
		if why != "" {
			b.Fatalf("the capacity check says the %d VMs of %s do not fit: %s", len(mine), node, why)
		}
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		runs = append(runs, capacitySample{requests: int(requests.Load()), received: float64(received.Load()) / (1 << 20),
			allocated: float64(after.TotalAlloc-before.TotalAlloc) / (1 << 20), heapGrowth: float64(peak-base) / (1 << 20), took: took})
	}
	sort.Slice(runs, func(i, j int) bool { return runs[i].heapGrowth < runs[j].heapGrowth })
	return runs[len(runs)/2]
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// countingBody counts the bytes read of an answer.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// pprofTop is the top of a heap profile by memory in use.
func pprofTop(bin, profile string) string {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=12", "-sample_index=inuse_space", bin, profile).CombinedOutput()
	if err != nil {
		return fmt.Sprintf("go tool pprof: %v: %s", err, out)
	}
	return string(bytes.TrimSpace(out))
}

// createReadyNode creates a node whose status says Ready, with room for VMs.
func createReadyNode(b *testing.B, ctx context.Context, kube kubernetes.Interface, name string) {
	b.Helper()
	if _, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelHostname: name}}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	room := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10000"), corev1.ResourceMemory: resource.MustParse("100Ti"), corev1.ResourcePods: resource.MustParse("5000")}
	// The node-lifecycle controller writes the new node too: read it again on a conflict.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		n.Status.Capacity, n.Status.Allocatable = room, room
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}}
		_, err = kube.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
}

// copyVM writes a copy of a running VMI and its virt-launcher pod, named name, on node.
func copyVM(ctx context.Context, kube kubernetes.Interface, kv rest.Interface, vmi *kubevirtv1.VirtualMachineInstance, pod *corev1.Pod, ns, name, node string) error {
	v := vmi.DeepCopy()
	v.ObjectMeta = metav1.ObjectMeta{Name: name, Namespace: ns, Labels: v.Labels, Annotations: v.Annotations, Finalizers: v.Finalizers}
	if v.Labels == nil {
		v.Labels = map[string]string{}
	}
	v.Labels[kubevirtv1.NodeNameLabel] = node
	v.Status.NodeName = node
	res := &kubevirtv1.VirtualMachineInstance{}
	if err := kv.Post().Namespace(ns).Resource("virtualmachineinstances").Body(v).Do(ctx).Into(res); err != nil {
		return fmt.Errorf("creating VMI %s: %w", name, err)
	}
	p := pod.DeepCopy()
	p.ObjectMeta = metav1.ObjectMeta{Name: "virt-launcher-" + name, Namespace: ns, Labels: p.Labels, Annotations: p.Annotations}
	if p.Labels == nil {
		p.Labels = map[string]string{}
	}
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Labels[kubevirtv1.CreatedByLabel] = string(res.UID)
	p.Annotations[kubevirtv1.DomainAnnotation] = name
	p.OwnerReferences = []metav1.OwnerReference{*metav1.NewControllerRef(res, kubevirtv1.VirtualMachineInstanceGroupVersionKind)}
	p.Spec.NodeName = node
	status := p.Status
	created, err := kube.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating pod %s: %w", p.Name, err)
	}
	created.Status = status
	if _, err := kube.CoreV1().Pods(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("the status of pod %s: %w", p.Name, err)
	}
	return nil
}

// releaseBuild builds the agent as the image ships it (hack/build.sh: static,
// stripped) and returns its path.
func releaseBuild(ctx context.Context, tb testing.TB) string {
	tb.Helper()
	release := filepath.Join(tb.TempDir(), "node-agent")
	if out, err := exec.CommandContext(ctx, "bash", "../../hack/build.sh", release).CombinedOutput(); err != nil {
		tb.Fatalf("hack/build.sh: %v: %s", err, out)
	}
	return release
}
