package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// KubeVirtNamespace is where KubeVirt's control plane and its CR live.
const KubeVirtNamespace = "kubevirt"

// Options configure a test cluster.
type Options struct {
	// KubeVirtConfiguration is the KubeVirt CR's spec.configuration at start.
	KubeVirtConfiguration kubevirtv1.KubeVirtConfiguration
	// Dir holds certificates, etcd's data and every program's log. Default: a new
	// temporary folder, removed by Stop unless the logs are kept.
	Dir string
	// Out receives build progress and start-up messages. Default: os.Stderr.
	Out io.Writer
	// WithoutKubeVirt starts only Kubernetes (etcd, kube-apiserver, kube-scheduler,
	// kube-controller-manager): no KubeVirt CRDs, CR,
	// virt-api or virt-controller, until InstallKubeVirt.
	WithoutKubeVirt bool
	// WithoutKubeVirtControllers installs KubeVirt's namespace, RBAC, CRDs and CR but
	// runs neither virt-api nor virt-controller: KubeVirt's objects stay as they are
	// written, with no webhook and no controller acting on them (for a benchmark that
	// fills the API server with VMIs of other nodes).
	WithoutKubeVirtControllers bool
	// WithoutEvictionWebhook leaves virt-api's pods/eviction webhook unregistered: an
	// eviction of a virt-launcher pod goes through (the pod is deleted) instead of
	// being turned into an evacuation, as on a cluster where the webhook is missing or
	// its failurePolicy let a request through. virt-api and virt-controller run.
	WithoutEvictionWebhook bool
	// WithoutSubresourceAPI leaves virt-api's subresources.kubevirt.io API unregistered
	// with the aggregator: the API server answers 404 to every subresource request,
	// evacuate/cancel included, as virt-api of a KubeVirt before v1.8 answers 404 to
	// evacuate/cancel. virt-api still serves its webhook.
	WithoutSubresourceAPI bool
	// NodeMonitorGracePeriod, when set, replaces the controller-manager's short
	// NodeMonitorGracePeriod (how long after its last heartbeat a node turns NotReady).
	NodeMonitorGracePeriod time.Duration
}

// Cluster is a running control plane: etcd, kube-apiserver, kube-scheduler,
// kube-controller-manager, virt-api, virt-controller.
type Cluster struct {
	// RESTConfig is a cluster-admin's configuration.
	RESTConfig *rest.Config
	// Kube is a cluster-admin's clientset.
	Kube kubernetes.Interface
	// KubeVirt is a cluster-admin's kubevirt.io/v1 REST client.
	KubeVirt rest.Interface
	// Kubeconfig is the path of a cluster-admin's kubeconfig file.
	Kubeconfig string
	// Dir holds the certificates, data and logs.
	Dir string
	// AuditLog is the API server's audit log: the requests of service accounts and
	// every eviction (audit.go). It is one file for the cluster's life: the API server
	// rotates it only past 4 GiB (its default, 100 MB, was passed within a 45-minute
	// benchmark, and the requests before it were lost to the readers of this file).
	AuditLog string

	opts      Options
	ca        *authority
	caPEM     []byte
	ownDir    bool
	binaries  Binaries
	etcd      *process
	apiserver *process
	virtAPI   *process
	virtCtrl  *process
	apiPort   int

	virtAPIPort  int // virt-api's HTTPS port, which the webhooks and the APIService name
	virtCtrlPort int // virt-controller's HTTPS port (/leader)

	scheduler     *process
	controllerMgr *process
}

// Start builds (once per machine) and starts a cluster. On error everything started
// is stopped again.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	out := opts.Out
	if out == nil {
		out = os.Stderr
	}
	bins, err := EnsureBinaries(ctx, out)
	if err != nil {
		return nil, err
	}
	c := &Cluster{binaries: bins, Dir: opts.Dir, opts: opts}
	if c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "node-agent-cluster-"); err != nil {
			return nil, fmt.Errorf("creating the cluster folder: %w", err)
		}
		c.ownDir = true
	}
	start := time.Now()
	if err := c.start(ctx); err != nil {
		fmt.Fprintf(out, "node-agent: the test cluster did not start; its logs are in %s\n", c.Dir)
		c.stopProcesses()
		return nil, err
	}
	fmt.Fprintf(out, "node-agent: test cluster up in %s (API server %s, logs in %s)\n",
		time.Since(start).Round(100*time.Millisecond), c.RESTConfig.Host, c.Dir)
	return c, nil
}

func (c *Cluster) start(ctx context.Context) error {
	if err := c.startKubernetes(ctx); err != nil {
		return err
	}
	if !c.opts.WithoutKubeVirt {
		return c.installKubeVirt(ctx, c.opts.KubeVirtConfiguration)
	}
	return nil
}

// Stop ends every program. The folder is removed unless keepLogs is set (or it was
// given in Options).
func (c *Cluster) Stop(keepLogs bool) {
	c.stopProcesses()
	if c.ownDir && !keepLogs {
		os.RemoveAll(c.Dir)
	}
}

func (c *Cluster) stopProcesses() {
	c.virtCtrl.stop(5 * time.Second)
	c.virtAPI.stop(5 * time.Second)
	c.controllerMgr.stop(5 * time.Second)
	c.scheduler.stop(5 * time.Second)
	c.apiserver.stop(10 * time.Second)
	c.etcd.stop(5 * time.Second)
}

func (c *Cluster) processes() []*process {
	return []*process{c.etcd, c.apiserver, c.scheduler, c.controllerMgr, c.virtAPI, c.virtCtrl}
}

// Logs returns the log file of each program, for a failing test to point at.
func (c *Cluster) Logs() map[string]string {
	logs := map[string]string{}
	for _, p := range c.processes() {
		if p != nil {
			logs[p.name] = p.logPath
		}
	}
	return logs
}

// DumpLogs writes the last lines of every program's log to w.
func (c *Cluster) DumpLogs(w io.Writer, bytesEach int) {
	for _, p := range c.processes() {
		if p != nil {
			fmt.Fprintf(w, "----- %s (%s) -----\n%s\n", p.name, p.logPath, p.tail(bytesEach))
		}
	}
}

// ErrorLines returns, by program, the lines of the logs of virt-api and
// virt-controller that report an error or worse (KubeVirt's JSON lines at level
// error or fatal, klog's E and F lines, Go panics), for a test suite to check that
// KubeVirt found nothing wrong with what it was shown.
func (c *Cluster) ErrorLines() (map[string][]string, error) {
	out := map[string][]string{}
	for _, p := range []*process{c.virtAPI, c.virtCtrl} {
		if p == nil {
			continue
		}
		lines, err := p.errorLines()
		if err != nil {
			return nil, err
		}
		out[p.name] = lines
	}
	return out, nil
}

// CA returns the PEM of the authority that signed every serving certificate.
func (c *Cluster) CA() []byte { return c.caPEM }

// PID is the process ID of the named part of the control plane as it runs now
// ("kube-apiserver", "etcd"), for benchmarks that read its CPU and memory; 0 if it
// does not run.
func (c *Cluster) PID(part string) int {
	var p *process
	switch part {
	case "kube-apiserver":
		p = c.apiserver
	case "etcd":
		p = c.etcd
	}
	if p == nil {
		return 0
	}
	if cmd := p.current(); cmd != nil && cmd.Process != nil {
		return cmd.Process.Pid
	}
	return 0
}

func (c *Cluster) startKubernetes(ctx context.Context) error {
	ca, err := newAuthority("node-agent-test-ca")
	if err != nil {
		return err
	}
	frontProxyCA, err := newAuthority("node-agent-test-front-proxy-ca")
	if err != nil {
		return err
	}
	c.ca, c.caPEM = ca, ca.certPEM
	pki := filepath.Join(c.Dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", pki, err)
	}
	caFile := filepath.Join(pki, "ca.crt")
	frontProxyCAFile := filepath.Join(pki, "front-proxy-ca.crt")
	if err := os.WriteFile(caFile, ca.certPEM, 0o600); err != nil {
		return fmt.Errorf("writing the CA: %w", err)
	}
	if err := os.WriteFile(frontProxyCAFile, frontProxyCA.certPEM, 0o600); err != nil {
		return fmt.Errorf("writing the front-proxy CA: %w", err)
	}
	serving, err := ca.issue("127.0.0.1", nil, []string{"127.0.0.1", "localhost", "kubernetes.default.svc"})
	if err != nil {
		return err
	}
	servingCert, servingKey, err := serving.write(pki, "serving")
	if err != nil {
		return err
	}
	admin, err := ca.issue("node-agent-test-admin", []string{"system:masters"}, nil)
	if err != nil {
		return err
	}
	adminCert, adminKey, err := admin.write(pki, "admin")
	if err != nil {
		return err
	}
	proxy, err := frontProxyCA.issue("front-proxy-client", nil, nil)
	if err != nil {
		return err
	}
	proxyCert, proxyKey, err := proxy.write(pki, "front-proxy-client")
	if err != nil {
		return err
	}
	saPub, saKey, err := serviceAccountKeys(pki)
	if err != nil {
		return err
	}

	ports, err := freePorts(3)
	if err != nil {
		return err
	}
	etcdClient, etcdPeer, apiPort := ports[0], ports[1], ports[2]
	c.apiPort = apiPort
	etcdURL := "http://127.0.0.1:" + strconv.Itoa(etcdClient)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(etcdPeer)
	c.etcd, err = startProcess(c.Dir, "etcd", c.binaries.Etcd,
		"--data-dir="+filepath.Join(c.Dir, "etcd-data"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=default="+peerURL,
		"--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=4294967296")
	if err != nil {
		return err
	}
	healthCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.etcd.waitFor(healthCtx, "etcd is healthy", httpOK(http.DefaultClient, etcdURL+"/health")); err != nil {
		return err
	}

	auditPolicy, err := c.writeAuditPolicy(pki)
	if err != nil {
		return err
	}
	c.apiserver, err = startProcess(c.Dir, "kube-apiserver", c.binaries.KubeAPIServer,
		"--etcd-servers="+etcdURL,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(apiPort),
		"--endpoint-reconciler-type=none",
		"--cert-dir="+filepath.Join(c.Dir, "apiserver-certs"),
		"--tls-cert-file="+servingCert, "--tls-private-key-file="+servingKey,
		"--client-ca-file="+caFile,
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+saPub, "--service-account-signing-key-file="+saKey,
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--disable-admission-plugins=ServiceAccount",
		"--allow-privileged=true",
		"--requestheader-client-ca-file="+frontProxyCAFile,
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file="+proxyCert, "--proxy-client-key-file="+proxyKey,
		"--profiling=false",
		"--audit-policy-file="+auditPolicy, "--audit-log-path="+c.AuditLog, "--audit-log-format=json",
		"--audit-log-maxsize=4096",
		"--v=1")
	if err != nil {
		return err
	}
	c.RESTConfig = &rest.Config{
		Host: "https://127.0.0.1:" + strconv.Itoa(apiPort),
		TLSClientConfig: rest.TLSClientConfig{
			CAFile: caFile, CertFile: adminCert, KeyFile: adminKey,
		},
		QPS:   200,
		Burst: 400,
	}
	if c.Kube, err = kubernetes.NewForConfig(c.RESTConfig); err != nil {
		return fmt.Errorf("creating the admin clientset: %w", err)
	}
	if c.KubeVirt, err = nodeinfo.NewKubeVirtClient(c.RESTConfig); err != nil {
		return err
	}
	readyCtx, cancelReady := context.WithTimeout(ctx, 90*time.Second)
	defer cancelReady()
	if err := c.apiserver.waitFor(readyCtx, "kube-apiserver is ready", func(ctx context.Context) error {
		body, err := c.Kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, body)
		}
		return nil
	}); err != nil {
		return err
	}
	c.Kubeconfig = filepath.Join(c.Dir, "kubeconfig")
	if err := writeKubeconfig(c.Kubeconfig, c.RESTConfig); err != nil {
		return err
	}
	return c.startControllers(ctx, pki, caFile, saKey)
}

// writeKubeconfig writes cfg (client-certificate auth) as a kubeconfig file.
func writeKubeconfig(path string, cfg *rest.Config) error {
	kc := clientcmdapi.NewConfig()
	kc.Clusters["test"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthority: cfg.CAFile}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: cfg.CertFile, ClientKey: cfg.KeyFile, Token: cfg.BearerToken}
	kc.Contexts["test"] = &clientcmdapi.Context{Cluster: "test", AuthInfo: "admin"}
	kc.CurrentContext = "test"
	if err := clientcmd.WriteToFile(*kc, path); err != nil {
		return fmt.Errorf("writing the kubeconfig %s: %w", path, err)
	}
	return nil
}

// httpOK returns a check that GETs url and wants a 200.
func httpOK(client *http.Client, url string) func(context.Context) error {
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(body)))
		}
		return nil
	}
}

// tlsClient returns an HTTP client that trusts only the cluster's CA.
func tlsClient(caPEM []byte) *http.Client {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	return &http.Client{
		Timeout:   5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
	}
}
