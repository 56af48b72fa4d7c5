package e2e

// One agent's footprint as the cluster around its node grows (issue 14, point 4): its
// memory with 100, 1,000 and 10,000 VMIs and virt-launcher pods on other nodes, for an
// agent that ran all along and for one started at that size, with a heap profile of each.
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
	"os"
	"os/exec"
	"path/filepath"
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
		apiRSS                  int
		writeTime               time.Duration
	}
	freshSample := func(bin, name string) footprintSample {
		a := start(bin)
		defer a.stop()
		return sample(a, name)
	}
	running := start(shared.agentBin)
	rows := []row{{others: 0, running: sample(running, "running-0"), apiRSS: procStatusKiB(c.PID("kube-apiserver"), "VmRSS:")}}
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
	last := rows[len(rows)-1]
	fmt.Fprintf(out, "\nbench: heap profiles in %s; the release build's at %d other VMIs (go tool pprof -top -sample_index=inuse_space):\n%s\n",
		filepath.Dir(last.release.profile), last.others, pprofTop(release, last.release.profile))
	b.ReportMetric(mib(last.release.anon), "MiB-own-at-largest")
	b.ReportMetric(mib(last.release.hwm), "MiB-peak-at-largest")
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
