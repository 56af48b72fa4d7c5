// Command demo shows node-agent draining a node of a local test cluster: a real
// kube-apiserver, etcd, KubeVirt virt-api and virt-controller, simulated nodes, a
// dozen VMs with mixed eviction strategies, one node-agent per node.
//
//	go run ./integration/cmd/demo
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/klog/v2"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
	"github.com/node-agent/node-agent/nodeinfo"
)

const (
	namespace = "demo"
	poolLabel = "demo.node-agent.test/pool"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// client-go's informers log through klog; the demo's own lines are the story.
	klog.LogToStderr(false)
	klog.SetOutput(io.Discard)
	if err := run(ctx, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

type demo struct {
	out     io.Writer
	c       *cluster.Cluster
	sim     *sim.Sim
	dir     string
	agents  map[string]string // node -> address
	started time.Time
}

func run(ctx context.Context, out io.Writer) (err error) {
	d := &demo{out: out, agents: map[string]string{}, started: time.Now()}
	d.say("Starting a local test cluster: real etcd, kube-apiserver, kube-scheduler and kube-controller-manager %s,\n"+
		"KubeVirt %s virt-api and virt-controller; the kubelets and virt-handlers are simulated. The first run on a machine\n"+
		"builds them (about 10 minutes here, up to 30 on a slower machine; once).", cluster.KubernetesVersion, cluster.KubeVirtVersion)
	dir, err := os.MkdirTemp("", "node-agent-demo-")
	if err != nil {
		return err
	}
	d.dir = dir
	defer func() {
		if err != nil {
			fmt.Fprintf(out, "\nThe cluster's and the agents' logs are kept in %s\n", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	agentBin := filepath.Join(dir, "node-agent")
	build := exec.CommandContext(ctx, "go", "build", "-o", agentBin, "github.com/node-agent/node-agent/cmd/node-agent")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("building node-agent: %w", err)
	}
	d.c, err = cluster.Start(ctx, cluster.Options{Dir: filepath.Join(dir, "cluster")})
	if err != nil {
		return err
	}
	defer func() { d.c.Stop(err != nil) }()
	log := logrus.New()
	log.SetLevel(logrus.ErrorLevel)
	if d.sim, err = sim.Start(ctx, d.c.RESTConfig, sim.Options{Log: log, MigrationDuration: 2 * time.Second}); err != nil {
		return err
	}
	nodes := []string{"node-a", "node-b", "node-c"}
	if err := d.setUp(ctx, nodes); err != nil {
		return err
	}
	for _, node := range nodes {
		addr, err := d.startAgent(ctx, agentBin, node)
		if err != nil {
			return err
		}
		d.agents[node] = addr
	}
	node := nodes[0]
	st, code, err := d.safe(ctx, node)
	if err != nil {
		return err
	}
	d.say("Before the drain, GET /safe-to-shutdown on %s answers %d:", node, code)
	d.table(st)

	d.say("kubectl taint nodes %s %s=draining:NoSchedule", node, nodeinfo.DefaultDrainTaintKey)
	if err := d.taint(ctx, node, true); err != nil {
		return err
	}
	if err := d.follow(ctx, node); err != nil {
		return err
	}
	st, code, err = d.safe(ctx, node)
	if err != nil {
		return err
	}
	d.say("After the drain, GET /safe-to-shutdown on %s answers %d (%s).", node, code, st.Summary())
	d.where(ctx)

	d.say("Re-enabling the node: kubectl taint nodes %s %s-", node, nodeinfo.DefaultDrainTaintKey)
	if err := d.taint(ctx, node, false); err != nil {
		return err
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		n, err := d.c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		return err == nil && strings.HasPrefix(n.Annotations[agent.AnnotationState], "idle"), nil
	})
	if err != nil {
		return fmt.Errorf("waiting for the agent to report the node idle: %w", err)
	}
	n, err := d.c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	d.say("%s is schedulable again (taints %v); the agent's annotation reads %q.", node, n.Spec.Taints, n.Annotations[agent.AnnotationState])
	d.say("Done in %s.", time.Since(d.started).Round(time.Second))
	return nil
}

func (d *demo) say(format string, args ...any) {
	fmt.Fprintf(d.out, "\n[%5.1fs] "+format+"\n", append([]any{time.Since(d.started).Seconds()}, args...)...)
}

// setUp adds the nodes and a dozen VMs on the first one.
func (d *demo) setUp(ctx context.Context, nodes []string) error {
	if _, err := d.c.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{}); err != nil {
		return err
	}
	for i, n := range nodes {
		opts := []sim.NodeOption{sim.WithNodeLabels(map[string]string{poolLabel: "demo"})}
		if i > 0 {
			opts = append(opts, sim.WithUnschedulable()) // until the VMs are placed on the first node
		}
		if _, err := d.sim.AddNode(ctx, n, opts...); err != nil {
			return err
		}
	}
	pool := sim.WithNodeSelector(map[string]string{poolLabel: "demo"})
	strategy := sim.WithEvictionStrategy
	objs := []struct {
		obj  runtime.Object
		desc string
	}{
		{sim.NewVM(namespace, "db-1", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrate)), "LiveMigrate"},
		{sim.NewVM(namespace, "db-2", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrate)), "LiveMigrate"},
		{sim.NewVM(namespace, "web-1", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrate)), "LiveMigrate"},
		{sim.NewVM(namespace, "web-2", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrate)), "LiveMigrate"},
		{sim.NewVM(namespace, "cache", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible)), "LiveMigrateIfPossible, migratable"},
		{sim.NewVM(namespace, "gpu-job", pool, strategy(kubevirtv1.EvictionStrategyLiveMigrateIfPossible), sim.WithBridgeInterface()), "LiveMigrateIfPossible, not migratable"},
		{sim.NewVM(namespace, "batch-1", pool, strategy(kubevirtv1.EvictionStrategyNone)), "None, runStrategy Always"},
		{sim.NewVM(namespace, "batch-2", pool, strategy(kubevirtv1.EvictionStrategyNone), sim.WithRunStrategy(kubevirtv1.RunStrategyRerunOnFailure)), "None, runStrategy RerunOnFailure"},
		{sim.NewVMI(namespace, "scratch", pool, strategy(kubevirtv1.EvictionStrategyNone)), "None, bare VMI"},
		{sim.NewVMIRS(namespace, "workers", 2, pool, strategy(kubevirtv1.EvictionStrategyNone)), "None, VMIRS of 2"},
		{sim.NewVM(namespace, "appliance", pool, strategy(kubevirtv1.EvictionStrategyExternal)), "External"},
	}
	d.say("Creating a dozen VMs on %s:", nodes[0])
	for _, o := range objs {
		if err := d.sim.Create(ctx, o.obj); err != nil {
			return err
		}
		fmt.Fprintf(d.out, "  %-10s %s\n", o.obj.(metav1.Object).GetName(), o.desc)
	}
	err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		return d.running(ctx) == 12, nil
	})
	if err != nil {
		return fmt.Errorf("waiting for the VMs to run: %w", err)
	}
	for _, n := range nodes[1:] {
		if _, err := d.c.Kube.CoreV1().Nodes().Patch(ctx, n, "application/merge-patch+json", []byte(`{"spec":{"unschedulable":false}}`), metav1.PatchOptions{}); err != nil {
			return err
		}
	}
	return nil
}

func (d *demo) running(ctx context.Context) int {
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := d.c.KubeVirt.Get().Namespace(namespace).Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(list); err != nil {
		return 0
	}
	n := 0
	for _, v := range list.Items {
		if v.Status.Phase == kubevirtv1.Running {
			n++
		}
	}
	return n
}

func (d *demo) startAgent(ctx context.Context, bin, node string) (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := l.Addr().String()
	l.Close()
	logFile, err := os.Create(filepath.Join(d.dir, "node-agent-"+node+".log"))
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, bin, "run", "--kubeconfig="+d.c.Kubeconfig, "--node-name="+node, "--listen-address="+addr, "--resync=1s", "--shutdown-inhibitor=false")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("starting node-agent for %s: %w", node, err)
	}
	go func() { _ = cmd.Wait(); logFile.Close() }()
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return "", fmt.Errorf("node-agent for %s is not ready: %w", node, err)
	}
	return addr, nil
}

func (d *demo) safe(ctx context.Context, node string) (agent.NodeStatus, int, error) {
	var st agent.NodeStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+d.agents[node]+"/safe-to-shutdown", nil)
	if err != nil {
		return st, 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return st, 0, err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return st, resp.StatusCode, fmt.Errorf("reading /safe-to-shutdown: %w", err)
	}
	return st, resp.StatusCode, nil
}

func (d *demo) table(st agent.NodeStatus) {
	for _, v := range st.VMs {
		fmt.Fprintf(d.out, "  %-13s %-22s %-9s %-16s %s\n", v.Name, v.Strategy, v.Action, v.State, v.Detail)
	}
}

// follow prints each VM's state as it changes until the node is safe.
func (d *demo) follow(ctx context.Context, node string) error {
	last := map[string]string{}
	return wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		st, code, err := d.safe(ctx, node)
		if err != nil {
			return false, nil
		}
		seen := map[string]bool{}
		for _, v := range st.VMs {
			seen[v.Name] = true
			line := fmt.Sprintf("%-16s %s", v.State, v.Detail)
			if last[v.Name] != line {
				fmt.Fprintf(d.out, "  [%5.1fs] %-13s %s\n", time.Since(d.started).Seconds(), v.Name, line)
				last[v.Name] = line
			}
		}
		var gone []string
		for name := range last {
			if !seen[name] {
				gone = append(gone, name)
			}
		}
		sort.Strings(gone)
		for _, name := range gone {
			fmt.Fprintf(d.out, "  [%5.1fs] %-13s left the node\n", time.Since(d.started).Seconds(), name)
			delete(last, name)
		}
		if st.Counts()[agent.StateWaitingExternal] > 0 && len(st.VMs) == st.Counts()[agent.StateWaitingExternal] {
			d.say("Only External VMs are left: their controller moves them. Playing that controller: deleting their VMIs.")
			for _, v := range st.VMs {
				_ = d.c.KubeVirt.Delete().Namespace(v.Namespace).Resource(nodeinfo.ResourceVMIs).Name(v.Name).Do(ctx).Error()
			}
		}
		return code == http.StatusOK, nil
	})
}

// where prints where each VM runs now.
func (d *demo) where(ctx context.Context) {
	list := &kubevirtv1.VirtualMachineInstanceList{}
	if err := d.c.KubeVirt.Get().Namespace(namespace).Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(list); err != nil {
		return
	}
	fmt.Fprintln(d.out, "  Where the VMs are now:")
	for _, v := range list.Items {
		fmt.Fprintf(d.out, "  %-14s %-10s %s\n", v.Name, v.Status.Phase, v.Status.NodeName)
	}
}

func (d *demo) taint(ctx context.Context, node string, on bool) error {
	n, err := d.c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	var taints []corev1.Taint
	for _, t := range n.Spec.Taints {
		if t.Key != nodeinfo.DefaultDrainTaintKey {
			taints = append(taints, t)
		}
	}
	if on {
		taints = append(taints, corev1.Taint{Key: nodeinfo.DefaultDrainTaintKey, Value: "draining", Effect: corev1.TaintEffectNoSchedule})
	}
	n.Spec.Taints = taints
	_, err = d.c.Kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
	return err
}
