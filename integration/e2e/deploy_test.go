package e2e

// Deployment and security: manifests/ applied for real (server-side, so the API server
// validates every object, the admission policy included), and the agent built with the
// Dockerfile's build line (hack/build.sh) and run with its service account's token,
// bound to a pod on its node as the kubelet's would be. It does its whole job on its
// node; the admission policy refuses every other change of a Node; RBAC refuses the
// rest; the roles grant exactly what the code needs, and the audit log shows the
// agent's real requests within them.

import (
	"context"
	"debug/elf"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/logind"
	"github.com/node-agent/node-agent/nodeinfo"
)

const (
	deployNamespace = "node-agent"
	deployUser      = "system:serviceaccount:node-agent:node-agent"
	deployPolicy    = "node-agent-own-node"
	// agentUserAgent is the user agent of every request of `node-agent run`
	// (cmd/node-agent restConfig); the test's own requests with the agent's token use
	// checksUserAgent, so that the audit log tells them apart.
	agentUserAgent  = "node-agent"
	checksUserAgent = "deploy-test-checks"
	// policyDenied starts the API server's message for a request the policy refused.
	policyDenied = "ValidatingAdmissionPolicy '" + deployPolicy + "'"
)

// repoRoot is the repository, from the package's folder (where go test runs).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// buildWithBuildScript builds node-agent with hack/build.sh, the Dockerfile's build line,
// and checks that the binary is static (the distroless image has no libc).
func buildWithBuildScript(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "node-agent")
	start := time.Now()
	cmd := exec.Command("bash", filepath.Join(repoRoot(t), "hack", "build.sh"), out)
	if msg, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("hack/build.sh: %v\n%s", err, msg)
	}
	t.Logf("hack/build.sh built %s in %s", out, time.Since(start).Round(100*time.Millisecond))
	f, err := elf.Open(out)
	if err != nil {
		t.Fatalf("the built binary is not ELF: %v", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Fatalf("hack/build.sh made a dynamically linked binary (program header %s): the runtime image has no libc", p.Type)
		}
	}
	return out
}

// The image: a multi-stage Dockerfile whose build stage runs hack/build.sh (the line
// the test suite builds and deploys below) and whose runtime image is minimal and
// non-root by default. Docker cannot run here: the build line is checked by running
// it, in TestDeployAgentWithItsServiceAccount.
func TestDeployDockerfile(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot(t), "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var froms, runs []string
	user := ""
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			froms = append(froms, line)
		case "RUN":
			runs = append(runs, line)
		case "USER":
			user = f[1]
		}
	}
	if len(froms) < 2 {
		t.Errorf("not a multi-stage build: %q", froms)
	} else if last := froms[len(froms)-1]; !strings.Contains(last, "distroless/static") && !strings.Contains(last, "scratch") {
		t.Errorf("runtime image %q: want distroless static or scratch", last)
	}
	builds := 0
	for _, r := range runs {
		if strings.Contains(r, "go build") {
			t.Errorf("the Dockerfile has a build line of its own (%q): use hack/build.sh, which the tests run", r)
		}
		if strings.Contains(r, "hack/build.sh") {
			builds++
		}
	}
	if builds != 1 {
		t.Errorf("%d RUN lines call hack/build.sh, want 1", builds)
	}
	if user == "" || strings.HasPrefix(user, "0") || strings.HasPrefix(user, "root") {
		t.Errorf("the image runs as %q by default, want a non-root user", user)
	}
	script, err := os.ReadFile(filepath.Join(repoRoot(t), "hack", "build.sh"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(script), "CGO_ENABLED=0 go build") {
		t.Errorf("hack/build.sh does not build with CGO_ENABLED=0")
	}
}

// The manifests say what the deployment needs, before any of it is applied: the
// DaemonSet and the graceful-shutdown overlay, read as `kubectl apply -k` would.
func TestDeployManifestShape(t *testing.T) {
	root := repoRoot(t)
	objs, err := loadKustomization(filepath.Join(root, "manifests"))
	if err != nil {
		t.Fatal(err)
	}
	ds, err := findObject[appsv1.DaemonSet](objs, "DaemonSet", "node-agent")
	if err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q, want system-node-critical", spec.PriorityClassName)
	}
	tolerAll := false
	for _, tol := range spec.Tolerations {
		if tol.Key == "" && tol.Operator == corev1.TolerationOpExists && tol.Effect == "" {
			tolerAll = true
		}
	}
	if !tolerAll {
		t.Errorf("tolerations %v: want one with operator Exists, no key and no effect (every taint, the drain taint and the cordon included)", spec.Tolerations)
	}
	if spec.TerminationGracePeriodSeconds == nil {
		t.Errorf("no terminationGracePeriodSeconds")
	}
	if len(spec.Containers) != 2 || spec.Containers[0].Name != "node-agent" || spec.Containers[1].Name != "lock-holder" {
		t.Fatalf("containers %v, want node-agent (the engine) and lock-holder", containerNames(spec.Containers))
	}
	c, holder := spec.Containers[0], spec.Containers[1]
	checkLockHolder(t, c, holder, spec)
	nodeName := false
	for _, e := range c.Env {
		if e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName" {
			nodeName = true
		}
	}
	if !nodeName {
		t.Errorf("NODE_NAME is not set from the downward API's spec.nodeName")
	}
	port := ""
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, "--listen-address="); ok {
			_, port, _ = net.SplitHostPort(v)
		}
	}
	if port == "" {
		t.Errorf("args %v: no --listen-address", c.Args)
	}
	named := map[string]string{}
	for _, p := range c.Ports {
		named[p.Name] = strconv.Itoa(int(p.ContainerPort))
	}
	for what, probe := range map[string]*corev1.Probe{"/healthz": c.LivenessProbe, "/readyz": c.ReadinessProbe} {
		if probe == nil || probe.HTTPGet == nil || probe.HTTPGet.Path != what {
			t.Errorf("no HTTP probe on %s", what)
			continue
		}
		got := probe.HTTPGet.Port.String()
		if n, ok := named[got]; ok {
			got = n
		}
		if got != port {
			t.Errorf("the %s probe asks port %s, the agent listens on %s", what, got, port)
		}
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[r]; !ok {
			t.Errorf("no %s request", r)
		}
		if _, ok := c.Resources.Limits[r]; !ok {
			t.Errorf("no %s limit", r)
		}
	}
	sc := c.SecurityContext
	if sc == nil || sc.Privileged == nil || *sc.Privileged || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem || sc.Capabilities == nil ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) != 0 {
		t.Errorf("container securityContext %+v: want not privileged, no privilege escalation, a read-only root, every capability dropped and none added", sc)
	}
	hostPaths := map[string]string{}
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	mounted := map[string]bool{}
	for _, m := range holder.VolumeMounts {
		if p, ok := hostPaths[m.Name]; ok {
			mounted[p] = true
			if p == "/run/dbus" && (m.MountPath != "/run/dbus" || !m.ReadOnly) {
				t.Errorf("the system bus folder is mounted at %s (read-only %v), want /run/dbus read-only", m.MountPath, m.ReadOnly)
			}
		}
	}
	for _, p := range []string{"/run/dbus", "/etc/systemd/logind.conf.d"} {
		if !mounted[p] {
			t.Errorf("the host's %s is not mounted in the lock holder", p)
		}
	}

	// The graceful-shutdown overlay: the agent is the gate bucket.
	gs, err := loadKustomization(filepath.Join(root, "manifests", "graceful-shutdown"))
	if err != nil {
		t.Fatal(err)
	}
	gds, err := findObject[appsv1.DaemonSet](gs, "DaemonSet", "node-agent")
	if err != nil {
		t.Fatal(err)
	}
	gate, err := findObject[schedulingv1.PriorityClass](gs, "PriorityClass", "node-agent-gate")
	if err != nil {
		t.Fatal(err)
	}
	vms, err := findObject[schedulingv1.PriorityClass](gs, "PriorityClass", "vm-workload")
	if err != nil {
		t.Fatal(err)
	}
	if gds.Spec.Template.Spec.PriorityClassName != gate.Name {
		t.Errorf("overlay: the agent's priorityClassName is %q, want %s", gds.Spec.Template.Spec.PriorityClassName, gate.Name)
	}
	if !(0 < gate.Value && gate.Value < vms.Value && vms.Value < 1000000000) {
		t.Errorf("overlay: priorities plain 0 < gate %d < VMs %d < KubeVirt 1e9 do not hold", gate.Value, vms.Value)
	}
	timeout := 10 * time.Minute // --shutdown-timeout's default
	for _, e := range gds.Spec.Template.Spec.Containers[1].Env {
		if e.Name == "NODE_AGENT_SHUTDOWN_TIMEOUT" {
			if timeout, err = time.ParseDuration(e.Value); err != nil {
				t.Fatal(err)
			}
		}
	}
	grace := time.Duration(ptr.Deref(gds.Spec.Template.Spec.TerminationGracePeriodSeconds, 30)) * time.Second
	if grace < timeout {
		t.Errorf("overlay: terminationGracePeriodSeconds %s < the agent's shutdown timeout %s: the kubelet would kill it before its deadline", grace, timeout)
	}
	// The example kubelet configuration agrees with the overlay.
	raw, err := os.ReadFile(filepath.Join(root, "manifests", "graceful-shutdown", "kubelet-config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var kc struct {
		APIVersion                       string `json:"apiVersion"`
		Kind                             string `json:"kind"`
		ShutdownGracePeriodByPodPriority []struct {
			Priority                   int32 `json:"priority"`
			ShutdownGracePeriodSeconds int64 `json:"shutdownGracePeriodSeconds"`
		} `json:"shutdownGracePeriodByPodPriority"`
	}
	if err := yaml.UnmarshalStrict(raw, &kc); err != nil {
		t.Fatalf("kubelet-config.example.yaml: %v (shutdownGracePeriod must not be mixed with shutdownGracePeriodByPodPriority)", err)
	}
	buckets := map[int32]time.Duration{}
	for _, b := range kc.ShutdownGracePeriodByPodPriority {
		buckets[b.Priority] = time.Duration(b.ShutdownGracePeriodSeconds) * time.Second
	}
	if buckets[gate.Value] < timeout {
		t.Errorf("kubelet-config.example.yaml: the gate bucket (priority %d) lasts %s, less than the agent's shutdown timeout %s", gate.Value, buckets[gate.Value], timeout)
	}
	if _, ok := buckets[vms.Value]; !ok {
		t.Errorf("kubelet-config.example.yaml: no bucket for vm-workload (%d)", vms.Value)
	}
}

// deployedAgent is the agent's identity on the cluster: its pod on node A and a token
// bound to it, as the kubelet would mount it.
type deployedAgent struct {
	pod        *corev1.Pod
	token      string
	kubeconfig string
	ds         *appsv1.DaemonSet
}

// agentPodOn waits for the pod the DaemonSet controller (kube-controller-manager)
// creates on node from the applied DaemonSet, and returns it with a token bound to it,
// as the kubelet would mount it. kubectl's drain helper leaves it alone as a
// DaemonSet's pod.
func (sc *scenario) agentPodOn(node string) *deployedAgent {
	sc.t.Helper()
	ds, err := sc.kube().AppsV1().DaemonSets(deployNamespace).Get(sc.ctx, "node-agent", metav1.GetOptions{})
	if err != nil {
		sc.t.Fatal(err)
	}
	pod := sc.daemonSetPod(ds, node)
	token := sc.serviceAccountToken(&authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID})
	kubeconfig := filepath.Join(sc.t.TempDir(), "kubeconfig")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: sc.env.cluster.RESTConfig.Host, CertificateAuthority: sc.env.cluster.RESTConfig.CAFile}
	kc.AuthInfos["node-agent"] = &clientcmdapi.AuthInfo{Token: token}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "node-agent"}
	kc.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		sc.t.Fatal(err)
	}
	return &deployedAgent{pod: pod, token: token, kubeconfig: kubeconfig, ds: ds}
}

// holderShutdownTimeout is the lock holder's --shutdown-timeout in the DaemonSet (10 min,
// the flag's default, when its args do not set it).
func (d *deployedAgent) holderShutdownTimeout(t testing.TB) time.Duration {
	t.Helper()
	timeout := 10 * time.Minute
	for _, c := range d.ds.Spec.Template.Spec.Containers {
		if v := flagValue(c.Args, "shutdown-timeout"); c.Name == "lock-holder" && v != "" {
			var err error
			if timeout, err = time.ParseDuration(v); err != nil {
				t.Fatalf("the lock holder's --shutdown-timeout=%s: %v", v, err)
			}
		}
	}
	return timeout
}

// waitOwnNodePolicy waits until the admission policy is in force for the agent's client
// kube on node own: the API server has seen the policy, its binding and its parameter
// (the KubeVirt CR) once a dry-run change of other is refused and one of own allowed.
func (sc *scenario) waitOwnNodePolicy(kube kubernetes.Interface, own, other string) {
	sc.t.Helper()
	probe := `{"metadata":{"annotations":{"node-agent.kubevirt.io/probe":"x"}}}`
	sc.eventually(time.Minute, "the admission policy to refuse a change of node "+other+" and allow one of node "+own, func() (bool, string) {
		errOther := sc.tryNodePatch(kube, nodePatch{node: other, patch: probe})
		errOwn := sc.tryNodePatch(kube, nodePatch{node: own, patch: probe})
		return errOther != nil && strings.Contains(errOther.Error(), policyDenied) && errOwn == nil,
			fmt.Sprintf("node %s: %v; node %s: %v", other, errOther, own, errOwn)
	})
}

// daemonSetPod waits for the DaemonSet controller's pod of ds on node and returns it.
func (sc *scenario) daemonSetPod(ds *appsv1.DaemonSet, node string) *corev1.Pod {
	sc.t.Helper()
	var pod *corev1.Pod
	sc.eventually(time.Minute, "the DaemonSet controller's pod on "+node, func() (bool, string) {
		pods, err := sc.kube().CoreV1().Pods(ds.Namespace).List(sc.ctx, metav1.ListOptions{FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return false, err.Error()
		}
		for i := range pods.Items {
			p := &pods.Items[i]
			if metav1.IsControlledBy(p, ds) && p.DeletionTimestamp == nil {
				pod = p
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d pods on the node", len(pods.Items))
	})
	return pod
}

// serviceAccountToken asks the API server for a token of the agent's service account,
// bound to ref (nil: unbound).
func (sc *scenario) serviceAccountToken(ref *authenticationv1.BoundObjectReference) string {
	sc.t.Helper()
	tr, err := sc.kube().CoreV1().ServiceAccounts(deployNamespace).CreateToken(sc.ctx, "node-agent", &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: ptr.To[int64](3600), BoundObjectRef: ref},
	}, metav1.CreateOptions{})
	if err != nil {
		sc.t.Fatalf("requesting a token bound to %+v: %v", ref, err)
	}
	return tr.Status.Token
}

// tokenClient is a clientset that authenticates with token.
func (sc *scenario) tokenClient(token string) (kubernetes.Interface, rest.Interface) {
	sc.t.Helper()
	cfg := &rest.Config{
		Host:            sc.env.cluster.RESTConfig.Host,
		TLSClientConfig: rest.TLSClientConfig{CAFile: sc.env.cluster.RESTConfig.CAFile},
		BearerToken:     token,
		UserAgent:       checksUserAgent,
		QPS:             50,
		Burst:           100,
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		sc.t.Fatal(err)
	}
	kv, err := nodeinfo.NewKubeVirtClient(cfg)
	if err != nil {
		sc.t.Fatal(err)
	}
	return kube, kv
}

// startDeployed runs bin as the DaemonSet's pod runs it on node: both containers, the
// engine and the lock holder, each with its args and env from the manifests and the
// test's overrides after them (a later flag wins): free local ports instead of the fixed
// ones (the engine's --lock-holder and the holder's --engine-url follow), the token's
// kubeconfig instead of the in-cluster one, and for the host folders the holder mounts,
// bus's: its private system bus for /run/dbus and its logind drop-in folder for
// /etc/systemd/logind.conf.d (a folder the DaemonSet does not mount is the container's
// own: no bus in it, not writable). extra goes to the engine. It waits until the engine
// is ready and logind lists the holder's delay lock.
func (sc *scenario) startDeployed(bin string, d *deployedAgent, node string, bus *logind.Env, extra ...string) (engine, holder *agentProc) {
	sc.t.Helper()
	containers := map[string]corev1.Container{}
	for _, c := range d.ds.Spec.Template.Spec.Containers {
		containers[c.Name] = c
	}
	e, h := containers["node-agent"], containers["lock-holder"]
	if len(e.Args) == 0 || e.Args[0] != "run" || len(h.Args) == 0 || h.Args[0] != "inhibit" {
		sc.t.Fatalf("the DaemonSet's containers %v: want node-agent running run and lock-holder running inhibit", containerNames(d.ds.Spec.Template.Spec.Containers))
	}
	mounts := map[string]string{} // the holder's mount path -> the host path
	for _, m := range h.VolumeMounts {
		for _, v := range d.ds.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.HostPath != nil {
				mounts[m.MountPath] = v.HostPath.Path
			}
		}
	}
	// What the holder finds at /run/dbus and /etc/systemd/logind.conf.d: the scenario's
	// bus and drop-in folder stand in for the host's where the DaemonSet mounts those
	// there. A folder it does not mount is the container's own: no bus socket in it, and
	// not writable (a read-only root), here a folder under a plain file.
	notMounted := filepath.Join(sc.t.TempDir(), "container-root")
	if err := os.WriteFile(notMounted, nil, 0o444); err != nil {
		sc.t.Fatal(err)
	}
	busAddr := "unix:path=" + filepath.Join(filepath.Dir(notMounted), "run-dbus-not-mounted", "system_bus_socket")
	dropIn := filepath.Join(notMounted, "logind.conf.d")
	if mounts["/run/dbus"] == "/run/dbus" {
		busAddr = bus.Address
	}
	if mounts["/etc/systemd/logind.conf.d"] == "/etc/systemd/logind.conf.d" {
		dropIn = bus.DropInDir
	}
	if busAddr != bus.Address || dropIn != bus.DropInDir {
		sc.t.Logf("the lock holder's host folders %v: not the host's /run/dbus and /etc/systemd/logind.conf.d at the same paths", mounts)
	}
	env := func(c corev1.Container) []string {
		var out []string
		for _, e := range c.Env {
			switch {
			case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName":
				out = append(out, e.Name+"="+node)
			case e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace":
				out = append(out, e.Name+"="+d.ds.Namespace)
			case e.Name == "DBUS_SYSTEM_BUS_ADDRESS" && e.Value == "unix:path=/run/dbus/system_bus_socket":
				out = append(out, e.Name+"="+busAddr) // the bus socket in the holder's /run/dbus
			case e.ValueFrom == nil:
				out = append(out, e.Name+"="+e.Value)
			default:
				sc.t.Fatalf("env %s of %s: a source this test does not know", e.Name, c.Name)
			}
		}
		return out
	}
	engineAddr, holderAddr := freeAddr(sc.t), freeAddr(sc.t)
	holderArgs := append(append([]string{}, h.Args...), "--listen-address="+holderAddr, "--engine-url=http://"+engineAddr,
		"--logind-dropin-dir="+dropIn)
	sc.t.Logf("lock holder: node-agent %s (env %s)", strings.Join(holderArgs, " "), strings.Join(env(h), " "))
	holder = sc.spawnAgent(bin, node+"-holder", holderAddr, holderArgs, env(h))
	engineArgs := append(append([]string{}, e.Args...), "--kubeconfig="+d.kubeconfig, "--listen-address="+engineAddr, "--lock-holder=http://"+holderAddr)
	engineArgs = append(engineArgs, extra...)
	sc.t.Logf("engine: node-agent %s (env %s)", strings.Join(engineArgs, " "), strings.Join(env(e), " "))
	engine = sc.spawnAgent(bin, node, engineAddr, engineArgs, env(e))
	engine.waitServing("/readyz", 60*time.Second)
	sc.waitLock(bus, holder)
	return engine, holder
}

// applyManifests applies manifests/ server-side and removes it again when the test ends
// (all but the Namespace, which other tests share).
func (sc *scenario) applyManifests() []*unstructured.Unstructured {
	sc.t.Helper()
	sc.changeClusterConfig("applying manifests/ (cluster-scoped objects, the node-agent namespace)")
	objs, err := loadKustomization(filepath.Join(repoRoot(sc.t), "manifests"))
	if err != nil {
		sc.t.Fatal(err)
	}
	// The DaemonSet runs on this scenario's nodes only, not on the shared cluster's
	// other nodes.
	for _, o := range objs {
		if o.GetKind() == "DaemonSet" {
			if err := unstructured.SetNestedField(o.Object, sc.pool, "spec", "template", "spec", "nodeSelector", poolLabel); err != nil {
				sc.t.Fatal(err)
			}
		}
	}
	start := time.Now()
	if err := applyServerSide(sc.ctx, sc.env.cluster.RESTConfig, objs, false); err != nil {
		sc.t.Fatal(err)
	}
	sc.t.Logf("applied %d objects of manifests/ server-side in %s", len(objs), time.Since(start).Round(time.Millisecond))
	sc.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		k := sc.kube()
		bg := metav1.DeleteOptions{}
		_ = k.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Delete(ctx, deployPolicy, bg)
		_ = k.AdmissionregistrationV1().ValidatingAdmissionPolicies().Delete(ctx, deployPolicy, bg)
		_ = k.RbacV1().ClusterRoleBindings().Delete(ctx, "node-agent", bg)
		_ = k.RbacV1().ClusterRoles().Delete(ctx, "node-agent", bg)
		_ = k.RbacV1().RoleBindings(cluster.KubeVirtNamespace).Delete(ctx, "node-agent", bg)
		_ = k.RbacV1().Roles(cluster.KubeVirtNamespace).Delete(ctx, "node-agent", bg)
		_ = k.RbacV1().RoleBindings(deployNamespace).Delete(ctx, "node-agent", bg)
		_ = k.RbacV1().Roles(deployNamespace).Delete(ctx, "node-agent", bg)
		_ = k.AppsV1().DaemonSets(deployNamespace).Delete(ctx, "node-agent", bg)
		_ = k.CoreV1().ServiceAccounts(deployNamespace).Delete(ctx, "node-agent", bg)
		_ = k.FlowcontrolV1().FlowSchemas().Delete(ctx, nodeinfo.OwnPriorityLevel, bg)
		_ = k.FlowcontrolV1().PriorityLevelConfigurations().Delete(ctx, nodeinfo.OwnPriorityLevel, bg)
	})
	return objs
}

// nodePatch is one change of a Node, sent with a token, dry-run: admission (the policy)
// decides as for a real write, and nothing is written.
type nodePatch struct {
	what  string
	node  string
	patch string // a merge patch
	sub   string // subresource
	// want is "" for allowed, else a part of the refusal's message.
	want string
}

func (sc *scenario) tryNodePatch(kube kubernetes.Interface, p nodePatch) error {
	var sub []string
	if p.sub != "" {
		sub = []string{p.sub}
	}
	_, err := kube.CoreV1().Nodes().Patch(sc.ctx, p.node, types.MergePatchType, []byte(p.patch),
		metav1.PatchOptions{DryRun: []string{metav1.DryRunAll}}, sub...)
	return err
}

func (sc *scenario) checkNodePatch(kube kubernetes.Interface, p nodePatch) {
	sc.t.Helper()
	err := sc.tryNodePatch(kube, p)
	switch {
	case p.want == "" && err != nil:
		sc.t.Errorf("%s: refused: %v", p.what, err)
	case p.want != "" && err == nil:
		sc.t.Errorf("%s: allowed, want refused (%s)", p.what, p.want)
	case p.want != "" && !strings.Contains(err.Error(), p.want):
		sc.t.Errorf("%s: refused with %q, want a message with %q", p.what, err, p.want)
	case p.want != "":
		sc.t.Logf("refused as it should be: %s: %v", p.what, err)
	}
}

// taintsPatch is a merge patch that sets the node's taints to its current ones plus add.
func (sc *scenario) taintsPatch(node string, add ...corev1.Taint) string {
	sc.t.Helper()
	taints := append(append([]corev1.Taint{}, sc.node(node).Spec.Taints...), add...)
	raw, err := json.Marshal(map[string]any{"spec": map[string]any{"taints": taints}})
	if err != nil {
		sc.t.Fatal(err)
	}
	return string(raw)
}

// The deployment, end to end: manifests/ applied server-side; the agent built with
// hack/build.sh and run as the DaemonSet runs it, with its service account's token bound
// to its pod on node A: both containers, the lock holder holding its delay lock on a real
// systemd-logind (a private system bus in place of the host's /run/dbus, logind's
// drop-in folder in place of the host's /etc/systemd/logind.conf.d). It re-enables its node after a "reboot", drains a LiveMigrate
// and a None VM (and, with --all-pods, a plain pod) with events, and withdraws a drain
// with virt-api's evacuate/cancel, all through the policy; the policy refuses changes to
// node B and to what node A's agent does not own; RBAC refuses secrets and deletes; the
// roles grant exactly agentNeeds, and the audit log shows the agent used nothing else.
func TestDeployAgentWithItsServiceAccount(t *testing.T) {
	bin := buildWithBuildScript(t)
	sc := newClusterWideScenario(t, 2)
	nodeA, nodeB := sc.nodes[0], sc.nodes[1]
	sc.applyManifests()
	// The graceful-shutdown overlay, validated by the API server too (dry run: the base
	// stays applied for the rest of the test).
	overlay, err := loadKustomization(filepath.Join(repoRoot(t), "manifests", "graceful-shutdown"))
	if err != nil {
		t.Fatal(err)
	}
	if err := applyServerSide(sc.ctx, sc.env.cluster.RESTConfig, overlay, true); err != nil {
		t.Fatalf("manifests/graceful-shutdown: %v", err)
	}
	d := sc.agentPodOn(nodeA)
	kube, kv := sc.tokenClient(d.token)
	// The host's system bus and logind, which the lock holder uses as the manifests mount them.
	bus := sc.startLogind()

	sc.waitOwnNodePolicy(kube, nodeA, nodeB)

	// 1. After a reboot the agent re-enables its node: it removes the taint and the
	// cordon it recorded as its own (a read-modify-write of the Node through the policy).
	own, err := json.Marshal(agent.Ownership{TaintKey: nodeinfo.DefaultDrainTaintKey, Cordoned: true, BootID: "boot-before-the-reboot",
		Reason: agent.TriggerShutdown, Since: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	sc.patchNode(nodeA, func(n *corev1.Node) {
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: nodeinfo.DefaultDrainTaintKey, Value: agent.TriggerShutdown, Effect: corev1.TaintEffectNoSchedule})
		n.Spec.Unschedulable = true
		metav1.SetMetaDataAnnotation(&n.ObjectMeta, agent.AnnotationOwned, string(own))
	})
	// The agent's own key is one KubeVirt does not react to, so that what moves a VM
	// below is the agent's doing, and a withdrawn drain has an evacuation to cancel.
	// --all-pods (not in the DaemonSet's args) exercises kubectl's drain helper.
	a, holder := sc.startDeployed(bin, d, nodeA, bus, "--drain-taint-key="+agentOnlyKey, "--all-pods", "--pod-eviction-retry=1s", "--resync=1s")
	// The holder raised logind's InhibitDelayMaxSec to its --shutdown-timeout (10 min by
	// default) through the host's drop-in folder.
	sc.waitInhibitDelayMax(bus, d.holderShutdownTimeout(t))
	sc.eventually(time.Minute, "the agent to re-enable node A", func() (bool, string) {
		n := sc.node(nodeA)
		_, owned := n.Annotations[agent.AnnotationOwned]
		return !owned && !n.Spec.Unschedulable && !hasTaintKey(n, nodeinfo.DefaultDrainTaintKey), fmt.Sprintf("unschedulable %v, taints %v, owned %v", n.Spec.Unschedulable, n.Spec.Taints, owned)
	})
	sc.nodeEvent(nodeA, agent.ReasonNodeReenabled)

	// 2. A drain: a LiveMigrate VM migrates, a None VM is shut down (and restarted on B),
	// a plain pod is evicted, the agent's own pod stays (a DaemonSet's).
	live := sc.pinned("live", nodeA, liveMigrate)
	none := sc.pinned("none", nodeA, noneStrategy)
	app := sc.plainPod("app", nodeA)
	if _, err := sc.env.sim.WaitForPod(sc.ctx, sc.ns, app.Name, "Running", func(p *corev1.Pod) bool {
		return p != nil && p.Status.Phase == corev1.PodRunning
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := sc.env.sim.WaitForPod(sc.ctx, deployNamespace, d.pod.Name, "Running", func(p *corev1.Pod) bool {
		return p != nil && p.Status.Phase == corev1.PodRunning
	}); err != nil {
		t.Fatal(err)
	}
	agentPod, err := sc.kube().CoreV1().Pods(deployNamespace).Get(sc.ctx, d.pod.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sc.taint(nodeA, agentOnlyKey)
	st := a.waitSafe(2 * time.Minute)
	if !st.Draining || len(st.VMs) != 0 || st.PodsLeft != 0 {
		t.Errorf("after the drain: %s", statusJSON(http.StatusOK, st))
	}
	// manifests/base/flowcontrol.yaml: the API server put the agent's requests in the
	// level of their own, and the agent knows it (it asks every VM at once there).
	if st.PriorityLevel != nodeinfo.OwnPriorityLevel {
		t.Errorf("the agent's requests are in API priority level %q, want %q (manifests/base/flowcontrol.yaml)", st.PriorityLevel, nodeinfo.OwnPriorityLevel)
	}
	sc.waitMigrated(live, nodeB)
	sc.waitRestarted(none, nodeB)
	sc.eventually(time.Minute, "the plain pod to be evicted", func() (bool, string) { return sc.podGone(app), "" })
	sc.podUntouched(agentPod, "the agent's own pod is a DaemonSet's")
	sc.nodeEvent(nodeA, agent.ReasonDrainStarted)
	sc.nodeEvent(nodeA, agent.ReasonDrainCompleted)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "live", agent.ReasonMigrationRequested, time.Minute)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "none", agent.ReasonShutdownRequested, time.Minute)
	if got := sc.node(nodeA).Annotations[agent.AnnotationState]; got != "drained: no VM left, safe to power off" {
		t.Errorf("state annotation %q", got)
	}
	sc.untaint(nodeA, agentOnlyKey)
	a.waitStatus(time.Minute, "the drain over", http.StatusOK, func(st agent.NodeStatus) bool { return !st.Draining })

	// 3. A withdrawn drain: a VM that cannot leave (pinned to node A, so its migration
	// target stays Pending) is marked for evacuation, and the agent cancels that through
	// virt-api when the taint goes.
	sc.createVM("stuck", liveMigrate, onNode(nodeA))
	sc.taint(nodeA, agentOnlyKey)
	if _, err := sc.env.sim.WaitForVMI(sc.ctx, sc.ns, "stuck", "marked for evacuation", func(v *kubevirtv1.VirtualMachineInstance) bool {
		return v != nil && v.Status.EvacuationNodeName == nodeA
	}); err != nil {
		t.Fatal(err)
	}
	sc.untaint(nodeA, agentOnlyKey)
	sc.waitEvent(sc.ns, "VirtualMachineInstance", "stuck", agent.ReasonEvacuationCancelled, time.Minute)
	sc.nodeEvent(nodeA, agent.ReasonDrainWithdrawn)
	a.waitStatus(time.Minute, "the drain withdrawn", http.StatusServiceUnavailable, func(st agent.NodeStatus) bool { return !st.Draining })

	// 4. What the token may change on a Node, and what the policy refuses.
	sc.patchNode(nodeA, func(n *corev1.Node) { // an operator's taint
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: "e2e.node-agent.test/operator", Effect: corev1.TaintEffectNoSchedule})
	})
	t.Cleanup(func() { sc.untaint(nodeA, "e2e.node-agent.test/operator") })
	drainTaint := corev1.Taint{Key: nodeinfo.DefaultDrainTaintKey, Value: "shutdown", Effect: corev1.TaintEffectNoSchedule}
	var withoutOperatorTaint []corev1.Taint
	for _, tt := range sc.node(nodeA).Spec.Taints {
		if tt.Key != "e2e.node-agent.test/operator" {
			withoutOperatorTaint = append(withoutOperatorTaint, tt)
		}
	}
	removeOperatorTaint, _ := json.Marshal(map[string]any{"spec": map[string]any{"taints": withoutOperatorTaint}})
	for _, p := range []nodePatch{
		{what: "its own annotation on node A", node: nodeA, patch: `{"metadata":{"annotations":{"node-agent.kubevirt.io/state":"x"}}}`},
		{what: "removing its own annotation on node A", node: nodeA, patch: `{"metadata":{"annotations":{"node-agent.kubevirt.io/drain":null}}}`},
		{what: "cordoning node A", node: nodeA, patch: `{"spec":{"unschedulable":true}}`},
		{what: "the drain taint (the KubeVirt CR's key) on node A", node: nodeA, patch: sc.taintsPatch(nodeA, drainTaint)},
		{what: "its waiting taint (PreferNoSchedule) on node A", node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: agent.TaintWaiting, Value: "shutdown", Effect: corev1.TaintEffectPreferNoSchedule})},
		{what: "its waiting taint's key with effect NoSchedule on node A", node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: agent.TaintWaiting, Effect: corev1.TaintEffectNoSchedule}),
			want: "only NoSchedule taints with the drain taint key"},
		{what: "an annotation on node B", node: nodeB, patch: `{"metadata":{"annotations":{"node-agent.kubevirt.io/state":"x"}}}`,
			want: "may change only that Node, not " + nodeB},
		{what: "cordoning node B", node: nodeB, patch: `{"spec":{"unschedulable":true}}`, want: "may change only that Node, not " + nodeB},
		{what: "a label on node A", node: nodeA, patch: `{"metadata":{"labels":{"e2e.node-agent.test/x":"y"}}}`, want: "labels"},
		{what: "another annotation on node A", node: nodeA, patch: `{"metadata":{"annotations":{"example.com/note":"x"}}}`,
			want: "only annotations whose key starts with node-agent.kubevirt.io/"},
		{what: "another taint on node A", node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: "example.com/other", Effect: corev1.TaintEffectNoSchedule}),
			want: "only NoSchedule taints with the drain taint key"},
		{what: "the drain taint key with effect NoExecute on node A", node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: nodeinfo.DefaultDrainTaintKey, Effect: corev1.TaintEffectNoExecute}),
			want: "only NoSchedule taints with the drain taint key"},
		{what: "a --drain-taint-key not declared in the policy (extraDrainTaintKeys) on node A", node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: agentOnlyKey, Effect: corev1.TaintEffectNoSchedule}),
			want: "only NoSchedule taints with the drain taint key"},
		{what: "removing an operator's taint from node A", node: nodeA, patch: string(removeOperatorTaint), want: "only NoSchedule taints with the drain taint key"},
		{what: "spec.providerID of node A", node: nodeA, patch: `{"spec":{"providerID":"kubevirt://elsewhere"}}`, want: "in a Node's spec"},
		{what: "a finalizer on node A", node: nodeA, patch: `{"metadata":{"finalizers":["example.com/hold"]}}`, want: "labels, finalizers or owner references"},
		{what: "the status of node A (RBAC)", node: nodeA, sub: "status", patch: `{"status":{"phase":"Terminated"}}`, want: `cannot patch resource "nodes/status"`},
	} {
		sc.checkNodePatch(kube, p)
	}

	// The policy also refuses nodes/status by itself, should RBAC ever grant it.
	statusRole := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "e2e-node-agent-status"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"patch"}}}}
	statusBinding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "e2e-node-agent-status"},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: statusRole.Name},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: "node-agent", Namespace: deployNamespace}}}
	if _, err := sc.kube().RbacV1().ClusterRoles().Create(sc.ctx, statusRole, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := sc.kube().RbacV1().ClusterRoleBindings().Create(sc.ctx, statusBinding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	sc.eventually(30*time.Second, "the policy to refuse nodes/status once RBAC allows it", func() (bool, string) {
		err := sc.tryNodePatch(kube, nodePatch{node: nodeA, sub: "status", patch: `{"status":{"phase":"Terminated"}}`})
		return err != nil && strings.Contains(err.Error(), "may not change nodes/status"), fmt.Sprint(err)
	})
	_ = sc.kube().RbacV1().ClusterRoleBindings().Delete(sc.ctx, statusBinding.Name, metav1.DeleteOptions{})
	_ = sc.kube().RbacV1().ClusterRoles().Delete(sc.ctx, statusRole.Name, metav1.DeleteOptions{})

	// Tokens without the pod binding: bound to node A itself, and unbound.
	nodeObj := sc.node(nodeA)
	for what, ref := range map[string]*authenticationv1.BoundObjectReference{
		"a token bound to node A (not to a pod)": {Kind: "Node", APIVersion: "v1", Name: nodeA, UID: nodeObj.UID},
		"an unbound token":                       nil,
	} {
		other, _ := sc.tokenClient(sc.serviceAccountToken(ref))
		sc.checkNodePatch(other, nodePatch{what: what, node: nodeA, patch: `{"metadata":{"annotations":{"node-agent.kubevirt.io/state":"x"}}}`,
			want: "only with a token bound to its pod"})
	}

	// The policy's drain taint key follows the KubeVirt CR, live.
	const crKey = "e2e.node-agent.test/cr-drain"
	sc.setDrainTaintKey(crKey)
	sc.eventually(30*time.Second, "the policy to allow the KubeVirt CR's new key", func() (bool, string) {
		err := sc.tryNodePatch(kube, nodePatch{node: nodeA, patch: sc.taintsPatch(nodeA, corev1.Taint{Key: crKey, Effect: corev1.TaintEffectNoSchedule})})
		return err == nil, fmt.Sprint(err)
	})
	sc.checkNodePatch(kube, nodePatch{what: "the old default key once the KubeVirt CR names another", node: nodeA,
		patch: sc.taintsPatch(nodeA, drainTaint), want: "only NoSchedule taints with the drain taint key " + crKey})

	// 5. RBAC refuses what the agent does not need: secrets, deleting VMIs, VMs, pods.
	if _, err := kube.CoreV1().Secrets(deployNamespace).List(sc.ctx, metav1.ListOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("listing secrets with the agent's token: %v, want forbidden", err)
	} else {
		t.Logf("refused as it should be: %v", err)
	}
	if _, err := kube.CoreV1().Secrets("kube-system").Get(sc.ctx, "any", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("reading a secret with the agent's token: %v, want forbidden", err)
	}
	dryRun := metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}}
	for what, err := range map[string]error{
		"deleting a VMI": kv.Delete().Namespace(sc.ns).Resource(nodeinfo.ResourceVMIs).Name("stuck").Body(&dryRun).Do(sc.ctx).Error(),
		"deleting a VM":  kv.Delete().Namespace(sc.ns).Resource(nodeinfo.ResourceVMs).Name("stuck").Body(&dryRun).Do(sc.ctx).Error(),
		"deleting a pod": kube.CoreV1().Pods(deployNamespace).Delete(sc.ctx, d.pod.Name, dryRun),
	} {
		if !apierrors.IsForbidden(err) {
			t.Errorf("%s with the agent's token: %v, want forbidden", what, err)
		} else {
			t.Logf("refused as it should be: %s: %v", what, err)
		}
	}
	sc.checkAccess()
	// The lock holder kept its one delay lock through all of it.
	sc.waitLock(bus, holder)

	// 6. The roles grant exactly what the code needs, and the agent used nothing else.
	sc.checkRoles()
	sc.checkAudit()
}

// checkAccess asks the API server (SubjectAccessReview) what the service account may do:
// every permission in agentNeeds, and none of a list of what it must never do.
func (sc *scenario) checkAccess() {
	sc.t.Helper()
	review := func(p permission) (bool, string) {
		res, sub, _ := strings.Cut(p.resource, "/")
		ns := p.ns
		if ns == "" && res != "nodes" {
			ns = sc.ns
		}
		r, err := sc.kube().AuthorizationV1().SubjectAccessReviews().Create(sc.ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:   deployUser,
				Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + deployNamespace, "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{Namespace: ns, Verb: p.verb, Group: p.group,
					Resource: res, Subresource: sub, Name: p.name},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			sc.t.Fatal(err)
		}
		return r.Status.Allowed, r.Status.Reason
	}
	for p, rule := range neededPermissions() {
		if ok, why := review(p); !ok {
			sc.t.Errorf("the service account may not %s (%s): %s", p, rule.why, why)
		}
	}
	for _, p := range []permission{
		{verb: "get", resource: "secrets"}, {verb: "list", resource: "secrets"}, {verb: "watch", resource: "secrets"},
		{ns: "kube-system", verb: "get", resource: "secrets"},
		{verb: "delete", group: "kubevirt.io", resource: "virtualmachineinstances"},
		{verb: "update", group: "kubevirt.io", resource: "virtualmachineinstances"},
		{verb: "patch", group: "kubevirt.io", resource: "virtualmachineinstances"},
		{verb: "delete", group: "kubevirt.io", resource: "virtualmachines"},
		{verb: "update", group: "kubevirt.io", resource: "virtualmachines"},
		// delete virtualmachineinstancemigrations is granted since withdraw deletes the
		// migrations the agent created (RBAC cannot narrow it to the agent's label).
		{verb: "update", group: "kubevirt.io", resource: "virtualmachineinstancemigrations"},
		{verb: "update", group: "subresources.kubevirt.io", resource: "virtualmachineinstances/migrate"},
		{verb: "update", group: "subresources.kubevirt.io", resource: "virtualmachines/stop"},
		{verb: "delete", resource: "pods"}, {verb: "create", resource: "pods"}, {verb: "create", resource: "pods/exec"},
		{verb: "delete", resource: "nodes"}, {verb: "create", resource: "nodes"}, {verb: "patch", resource: "nodes/status"},
		{verb: "delete", resource: "events"},
		{verb: "create", resource: "serviceaccounts/token"},
		{ns: "kubevirt", verb: "get", resource: "configmaps", name: "other"},
		{ns: "kubevirt", verb: "update", group: "kubevirt.io", resource: "kubevirts"},
	} {
		if ok, _ := review(p); ok {
			sc.t.Errorf("the service account may %s", p)
		}
	}
}

// checkRoles compares the ClusterRole and Role on the API server with agentNeeds.
func (sc *scenario) checkRoles() {
	sc.t.Helper()
	cr, err := sc.kube().RbacV1().ClusterRoles().Get(sc.ctx, "node-agent", metav1.GetOptions{})
	if err != nil {
		sc.t.Fatal(err)
	}
	granted, err := grantedPermissions("", cr.Rules)
	if err != nil {
		sc.t.Errorf("ClusterRole node-agent: %v", err)
	}
	role, err := sc.kube().RbacV1().Roles(cluster.KubeVirtNamespace).Get(sc.ctx, "node-agent", metav1.GetOptions{})
	if err != nil {
		sc.t.Fatal(err)
	}
	inNS, err := grantedPermissions(cluster.KubeVirtNamespace, role.Rules)
	if err != nil {
		sc.t.Errorf("Role %s/node-agent: %v", cluster.KubeVirtNamespace, err)
	}
	for p := range inNS {
		granted[p] = true
	}
	own, err := sc.kube().RbacV1().Roles(deployNamespace).Get(sc.ctx, "node-agent", metav1.GetOptions{})
	if err != nil {
		sc.t.Fatal(err)
	}
	inOwn, err := grantedPermissions(deployNamespace, own.Rules)
	if err != nil {
		sc.t.Errorf("Role %s/node-agent: %v", deployNamespace, err)
	}
	for p := range inOwn {
		granted[p] = true
	}
	needed := neededPermissions()
	for p := range granted {
		if p.resource == "secrets" {
			sc.t.Errorf("the roles grant %s: the agent reads no secret", p)
		}
		if _, ok := needed[p]; !ok {
			sc.t.Errorf("the roles grant %s, which no code path in agentNeeds uses: remove it, or add it to agentNeeds with the code that needs it", p)
		}
	}
	for p, rule := range needed {
		if !granted[p] {
			sc.t.Errorf("the roles do not grant %s, which %s needs", p, rule.why)
		}
	}
}

// checkAudit reads the agent's own requests (its user agent, its service account) from
// the API server's audit log: none was refused, each is within agentNeeds, and each
// needed verb shows (but those the drain does not make, said in notInDrain).
func (sc *scenario) checkAudit() {
	sc.t.Helper()
	evs, err := agentRequests(sc.env.cluster.AuditLog, deployUser, agentUserAgent)
	if err != nil {
		sc.t.Fatal(err)
	}
	if len(evs) == 0 {
		sc.t.Fatalf("no request of the agent in the audit log %s", sc.env.cluster.AuditLog)
	}
	needed := neededPermissions()
	used := map[permission]int{}
	nonResource := map[string]int{}
	for _, ev := range evs {
		if ev.ResponseStatus != nil && ev.ResponseStatus.Code == http.StatusForbidden {
			sc.t.Errorf("the agent's request %s %s was refused: %s", ev.Verb, ev.RequestURI, ev.ResponseStatus.Message)
		}
		if ev.ObjectRef == nil {
			nonResource[ev.Verb+" "+ev.RequestURI]++
			if !discoveryPath(ev.RequestURI) {
				sc.t.Errorf("the agent requested %s %s, which is not API discovery", ev.Verb, ev.RequestURI)
			}
			continue
		}
		covered := false
		for p := range needed {
			if p.covers(ev) {
				used[p]++
				covered = true
			}
		}
		if !covered {
			sc.t.Errorf("the agent's request %s %s (%+v) is not in agentNeeds", ev.Verb, ev.RequestURI, *ev.ObjectRef)
		}
	}
	var lines []string
	for p, rule := range needed {
		n := used[p]
		lines = append(lines, fmt.Sprintf("%5d  %s", n, p))
		if why, ok := rule.notInDrain[p.verb]; n == 0 && !ok {
			sc.t.Errorf("the agent never used %s during the test, although %s needs it", p, rule.why)
		} else if n == 0 {
			sc.t.Logf("not used during this test: %s (%s)", p, why)
		}
	}
	for _, k := range sortedKeys(nonResource) {
		lines = append(lines, fmt.Sprintf("%5d  %s", nonResource[k], k))
	}
	sort.Strings(lines)
	sc.t.Logf("the agent's %d requests, from the audit log:\n%s", len(evs), strings.Join(lines, "\n"))
}

func containerNames(cs []corev1.Container) []string {
	var names []string
	for _, c := range cs {
		names = append(names, c.Name)
	}
	return names
}

// flagValue is the value of --name=value in args, or "".
func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// checkLockHolder: the engine follows the holder, the holder asks the engine, on localhost;
// the holder runs `inhibit`, has no liveness probe (a restart mid-shutdown would drop the
// lock), and the pod's grace period covers the holder's deadline.
func checkLockHolder(t *testing.T, engine, holder corev1.Container, spec corev1.PodSpec) {
	t.Helper()
	if len(holder.Args) == 0 || holder.Args[0] != "inhibit" {
		t.Errorf("lock-holder args %v: want inhibit", holder.Args)
	}
	_, holderPort, _ := net.SplitHostPort(flagValue(holder.Args, "listen-address"))
	_, enginePort, _ := net.SplitHostPort(flagValue(engine.Args, "listen-address"))
	if want := "http://127.0.0.1:" + holderPort; holderPort == "" || flagValue(engine.Args, "lock-holder") != want {
		t.Errorf("engine --lock-holder=%q, want %s (the holder's --listen-address)", flagValue(engine.Args, "lock-holder"), want)
	}
	if want := "http://127.0.0.1:" + enginePort; enginePort == "" || flagValue(holder.Args, "engine-url") != want {
		t.Errorf("holder --engine-url=%q, want %s (the engine's --listen-address)", flagValue(holder.Args, "engine-url"), want)
	}
	if holder.LivenessProbe != nil {
		t.Errorf("the lock holder has a liveness probe: a restart during a shutdown would drop the lock")
	}
	timeout := 10 * time.Minute
	if v := flagValue(holder.Args, "shutdown-timeout"); v != "" {
		timeout, _ = time.ParseDuration(v)
	}
	if grace := time.Duration(ptr.Deref(spec.TerminationGracePeriodSeconds, 30)) * time.Second; grace < timeout {
		t.Errorf("terminationGracePeriodSeconds %s < the holder's shutdown timeout %s: deleting the pod during a held shutdown would kill the lock", grace, timeout)
	}
	if _, ok := holder.Resources.Limits[corev1.ResourceMemory]; !ok {
		t.Errorf("no memory limit on the lock holder")
	}
}
