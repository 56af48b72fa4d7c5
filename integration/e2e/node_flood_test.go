package e2e

// A flood of Node updates must not multiply the agent's API calls (issue 13 part 4):
// counted in the API server's audit log.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/sim"
)

const (
	// floodInterval is the pace of the Node updates: 1,000 a minute.
	floodInterval = 60 * time.Millisecond
	// floodWindow is how long each phase (idle, drain) is flooded and counted: 500
	// updates at that pace, where an agent that answered the flood with API calls would
	// add hundreds of requests (floodSlack is 12).
	floodWindow = 30 * time.Second
	// floodSlack is how many more non-watch requests the flooded node's agent may make
	// in a window than the agent of the same node without the flood: the two drains
	// run side by side but not in lockstep, so a refused eviction's backoff (2 s,
	// doubling) or a migration's progress can fall either side of the window's end (one
	// request or two per VM, three VMs), and a write of the Node that meets one of the
	// flood's writes is retried with a fresh read (a get and an update per conflict).
	// A flood that the agent answers with API calls adds hundreds (1,000 updates a
	// minute); the slack is far below that.
	floodSlack = 12
	// floodMin is the fewest updates a window must hold: half the window's at the pace.
	floodMin = int64(floodWindow/floodInterval) / 2
)

// Two nodes alike, each with three VMs and an agent on the agent's own taint key, its
// requests made as a service account of its own (the audit log records those): node
// A's Node object is updated 1,000 times a minute (labels, annotations, status
// heartbeats, what a kubelet and other controllers write), node B's is not. For 30 s
// idle, then for the first 30 s of a drain that a PodDisruptionBudget holds up (each
// longer while the API server took fewer than floodMin updates) (two
// VMs' evictions refused, the third VM migrating), the API server's audit log shows
// A's agent making no more non-watch requests than B's plus floodSlack.
func TestNodeUpdateFloodDoesNotMultiplyAgentCalls(t *testing.T) {
	// Alone, not beside the parallel scenarios: 1,000 Node writes a minute load the
	// API server every test shares, and beside four others on a loaded 2-core
	// machine the flood fell short of its own rate (497 and 261 writes a minute).
	sc := newClusterWideScenario(t, 3)
	flooded, quiet := sc.nodes[0], sc.nodes[1]
	for _, node := range []string{flooded, quiet} {
		sc.pinned("live-"+node, node, liveMigrate, sim.WithMigrationDuration(3*time.Second))
		for i := 0; i < 2; i++ {
			sc.pinned(fmt.Sprintf("held%d-%s", i, node), node, noneStrategy, sim.WithLabels(map[string]string{"budget": "held"}))
		}
	}
	if _, err := sc.kube().PolicyV1().PodDisruptionBudgets(sc.ns).Create(sc.ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "held"},
		Spec: policyv1.PodDisruptionBudgetSpec{
			MinAvailable: ptr.To(intstr.FromInt32(4)),
			Selector:     &metav1.LabelSelector{MatchLabels: map[string]string{"budget": "held", kubevirtv1.AppLabel: "virt-launcher"}},
		},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// (No disruption controller runs: the API server refuses every eviction the budget
	// covers with 429, as a budget at its minimum does.)

	users := map[string]string{}
	agents := map[string]*agentProc{}
	for _, node := range []string{flooded, quiet} {
		kubeconfig, user := sc.adminServiceAccount("agent-" + node)
		users[node] = user
		agents[node] = sc.startAgent(node, "--kubeconfig="+kubeconfig, "--drain-taint-key="+agentOnlyKey)
	}
	for _, node := range []string{flooded, quiet} {
		agents[node].waitStatus(30*time.Second, "the agent reporting its three VMs", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
			return len(st.VMs) == 3
		})
	}

	floodClient := sc.floodClient()
	type window struct {
		name     string
		from, to time.Time
		patches  int
	}
	var windows []window
	// Idle: no drain, the agents only watch.
	from := time.Now()
	n := floodNode(sc.ctx, t, floodClient, flooded, from.Add(floodWindow))
	windows = append(windows, window{"idle", from, time.Now(), n})
	// Draining: both nodes tainted, the held VMs' evictions refused all along.
	from = time.Now()
	sc.taint(flooded, agentOnlyKey)
	sc.taint(quiet, agentOnlyKey)
	n = floodNode(sc.ctx, t, floodClient, flooded, from.Add(floodWindow))
	windows = append(windows, window{"draining", from, time.Now(), n})
	for _, node := range []string{flooded, quiet} {
		agents[node].waitStatus(30*time.Second, "the held VMs still on the node, the LiveMigrate VM gone", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool {
			return len(st.VMs) == 2 && vmStatus(st, sc.ns, "live-"+node) == nil
		})
	}

	for _, w := range windows {
		// At least half the window's updates at 1,000 a minute: the flood happened. (On a
		// loaded machine the API server takes 750-980 a minute at this pace.)
		if want := int(floodMin); w.patches < want {
			t.Errorf("%s: only %d updates of node %s in %s, want at least %d", w.name, w.patches, flooded, w.to.Sub(w.from).Round(time.Second), want)
		}
		counts := map[string]map[string]int{}
		totals := map[string]int{}
		for _, node := range []string{flooded, quiet} {
			c, err := requestsByVerb(sc.env.cluster.AuditLog, users[node], agentUserAgent, w.from, w.to)
			if err != nil {
				t.Fatal(err)
			}
			counts[node] = c
			for k, v := range c {
				if !strings.HasPrefix(k, "watch ") {
					totals[node] += v
				}
			}
		}
		t.Logf("%s, %s, %d updates of %s: the agent's requests with the flood (%s) and without (%s):\n%s",
			w.name, w.to.Sub(w.from).Round(time.Second), w.patches, flooded, flooded, quiet, countsTable(counts[flooded], counts[quiet]))
		t.Logf("%s: non-watch requests: %d with the flood, %d without (bound: %d + %d)", w.name, totals[flooded], totals[quiet], totals[quiet], floodSlack)
		if totals[flooded] > totals[quiet]+floodSlack {
			t.Errorf("%s: the flooded node's agent made %d non-watch requests, the quiet node's %d: the flood of Node updates multiplies the agent's API calls (bound: +%d)",
				w.name, totals[flooded], totals[quiet], floodSlack)
		}
	}
}

// adminServiceAccount is a kubeconfig for a new service account of the scenario bound
// to cluster-admin: an agent run with it has its requests in the audit log, under the
// user it returns (the tests' own certificate-authenticated requests are not logged).
func (sc *scenario) adminServiceAccount(name string) (kubeconfig, user string) {
	sc.t.Helper()
	if _, err := sc.kube().CoreV1().ServiceAccounts(sc.ns).Create(sc.ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: sc.ns + "-" + name},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "cluster-admin"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: sc.ns, Name: name}},
	}
	if _, err := sc.kube().RbacV1().ClusterRoleBindings().Create(sc.ctx, binding, metav1.CreateOptions{}); err != nil {
		sc.t.Fatal(err)
	}
	sc.t.Cleanup(func() {
		_ = sc.kube().RbacV1().ClusterRoleBindings().Delete(context.Background(), binding.Name, metav1.DeleteOptions{})
	})
	return sc.serviceAccountKubeconfig(name)
}

// serviceAccountKubeconfig is a kubeconfig with a token of the scenario's service
// account name, and the user the API server sees.
func (sc *scenario) serviceAccountKubeconfig(name string) (kubeconfig, user string) {
	sc.t.Helper()
	tr, err := sc.kube().CoreV1().ServiceAccounts(sc.ns).CreateToken(sc.ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600)},
	}, metav1.CreateOptions{})
	if err != nil {
		sc.t.Fatal(err)
	}
	cfg := sc.env.cluster.RESTConfig
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthority: cfg.CAFile, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: tr.Status.Token}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: name}
	kc.CurrentContext = "test"
	kubeconfig = filepath.Join(sc.t.TempDir(), name+".kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		sc.t.Fatal(err)
	}
	return kubeconfig, "system:serviceaccount:" + sc.ns + ":" + name
}

// floodClient is a cluster-admin's clientset allowed the flood's pace.
func (sc *scenario) floodClient() kubernetes.Interface {
	sc.t.Helper()
	cfg := rest.CopyConfig(sc.env.cluster.RESTConfig)
	cfg.QPS, cfg.Burst = 100, 100
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		sc.t.Fatal(err)
	}
	return kube
}

// floodNode updates node every floodInterval until the deadline, in turn its labels,
// its annotations and its Ready condition's heartbeat (none of them the agent's), and
// returns how many updates the API server took. The updates run in goroutines (at most
// 8 at once), so that a slow answer does not slow the pace. An API server that took
// fewer than floodMin by the deadline (a loaded machine: a CI run saw 147 in 30 s) is
// flooded on, up to floodWindow more, so that the window holds the flood it is meant to.
func floodNode(ctx context.Context, t *testing.T, kube kubernetes.Interface, node string, until time.Time) int {
	stretch := until.Add(floodWindow)
	t.Helper()
	tick := time.NewTicker(floodInterval)
	defer tick.Stop()
	var done atomic.Int64
	var wg sync.WaitGroup
	inFlight := make(chan struct{}, 8)
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			wg.Wait()
			return int(done.Load())
		case inFlight <- struct{}{}:
		}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-inFlight }()
			if err := floodUpdate(ctx, kube, node, i); err != nil {
				t.Errorf("updating node %s: %v", node, err)
				return
			}
			done.Add(1)
		}(i)
		select {
		case <-ctx.Done():
		case now := <-tick.C:
			if now.Before(until) || (done.Load() < floodMin && now.Before(stretch)) {
				continue
			}
		}
		wg.Wait()
		return int(done.Load())
	}
}

// floodUpdate is the flood's update number i of node.
func floodUpdate(ctx context.Context, kube kubernetes.Interface, node string, i int) error {
	var err error
	switch i % 3 {
	case 0:
		patch := fmt.Sprintf(`{"metadata":{"labels":{"flood.e2e.test/seq":"%d"}}}`, i)
		_, err = kube.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	case 1:
		patch := fmt.Sprintf(`{"metadata":{"annotations":{"flood.e2e.test/seen":"%d"}}}`, i)
		_, err = kube.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	default:
		cond := map[string]any{"type": corev1.NodeReady, "status": corev1.ConditionTrue,
			"lastHeartbeatTime": metav1.Now().Rfc3339Copy()}
		patch, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": []any{cond}}})
		_, err = kube.CoreV1().Nodes().Patch(ctx, node, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
	}
	return err
}

// requestsByVerb counts, from the audit log, the requests of user made with userAgent
// received in [from, to), by "verb resource[/subresource]" (or the path for a
// non-resource request).
func requestsByVerb(path, user, userAgent string, from, to time.Time) (map[string]int, error) {
	evs, err := agentRequests(path, user, userAgent)
	if err != nil {
		return nil, err
	}
	counts := map[string]int{}
	for _, ev := range evs {
		if ev.Stamp.Before(from) || !ev.Stamp.Before(to) {
			continue
		}
		key := ev.RequestURI
		if ref := ev.ObjectRef; ref != nil {
			key = ref.Resource
			if ref.Subresource != "" {
				key += "/" + ref.Subresource
			}
		}
		counts[ev.Verb+" "+key]++
	}
	return counts, nil
}

// countsTable lays out two counts side by side, one line per key.
func countsTable(a, b map[string]int) string {
	keys := map[string]bool{}
	for k := range a {
		keys[k] = true
	}
	for k := range b {
		keys[k] = true
	}
	var lines []string
	for k := range keys {
		lines = append(lines, fmt.Sprintf("%-45s %6d %6d", k, a[k], b[k]))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
