package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/rest"
)

// Timings of node health, scaled down from a real cluster's (kubelet: Lease renewed
// every 10 s; controller-manager: a node is unhealthy 50 s after its last heartbeat,
// checked every 5 s) so that a test sees a node turn NotReady in seconds. The
// simulated kubelet (integration/sim) renews its Lease every 2 s.
const (
	// NodeMonitorGracePeriod is how long after its kubelet's last heartbeat a node
	// turns NotReady (Unknown) and is tainted unreachable.
	NodeMonitorGracePeriod = 16 * time.Second
	nodeMonitorPeriod      = time.Second
	nodeStartupGracePeriod = 30 * time.Second
)

// controllers are the kube-controller-manager controllers the tests need: workloads
// (DaemonSet, ReplicaSet, Deployment), the garbage collector and namespace deletion,
// node health (node-lifecycle and the NoExecute taint eviction), service accounts and
// their tokens, the root CA config map, PodDisruptionBudget status and pod GC.
var controllers = []string{
	"daemonset-controller", "replicaset-controller", "deployment-controller",
	"garbage-collector-controller", "namespace-controller",
	"node-lifecycle-controller", "taint-eviction-controller",
	"serviceaccount-controller", "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
	"disruption-controller", "pod-garbage-collector-controller",
}

// startControllers starts kube-scheduler and kube-controller-manager, each with a
// client certificate of its own (the users RBAC's bootstrap policy binds), serving
// HTTPS on loopback with a certificate of the cluster's CA, leader election off (one
// of each), and waits until both report healthy.
// nodeMonitorGracePeriod is Options.NodeMonitorGracePeriod, else NodeMonitorGracePeriod.
func (c *Cluster) nodeMonitorGracePeriod() time.Duration {
	if c.opts.NodeMonitorGracePeriod > 0 {
		return c.opts.NodeMonitorGracePeriod
	}
	return NodeMonitorGracePeriod
}

func (c *Cluster) startControllers(ctx context.Context, pki, caFile, saKey string) error {
	ports, err := freePorts(2)
	if err != nil {
		return err
	}
	serving, err := c.ca.issue("127.0.0.1", nil, []string{"127.0.0.1", "localhost"})
	if err != nil {
		return err
	}
	servingCert, servingKey, err := serving.write(pki, "controllers-serving")
	if err != nil {
		return err
	}
	kubeconfigFor := func(user, file string) (string, error) {
		pair, err := c.ca.issue(user, nil, nil)
		if err != nil {
			return "", err
		}
		cert, key, err := pair.write(pki, file)
		if err != nil {
			return "", err
		}
		path := filepath.Join(c.Dir, file+".kubeconfig")
		cfg := &rest.Config{Host: c.RESTConfig.Host,
			TLSClientConfig: rest.TLSClientConfig{CAFile: caFile, CertFile: cert, KeyFile: key}}
		return path, writeKubeconfig(path, cfg)
	}
	schedKubeconfig, err := kubeconfigFor("system:kube-scheduler", "kube-scheduler")
	if err != nil {
		return err
	}
	kcmKubeconfig, err := kubeconfigFor("system:kube-controller-manager", "kube-controller-manager")
	if err != nil {
		return err
	}
	common := func(kubeconfig string, port int) []string {
		return []string{
			"--kubeconfig=" + kubeconfig,
			"--authentication-kubeconfig=" + kubeconfig, "--authorization-kubeconfig=" + kubeconfig,
			"--bind-address=127.0.0.1", "--secure-port=" + strconv.Itoa(port),
			"--tls-cert-file=" + servingCert, "--tls-private-key-file=" + servingKey,
			"--leader-elect=false", "--profiling=false", "--v=1",
		}
	}
	c.scheduler, err = startProcess(c.Dir, "kube-scheduler", c.binaries.KubeScheduler,
		common(schedKubeconfig, ports[0])...)
	if err != nil {
		return err
	}
	kcmArgs := append(common(kcmKubeconfig, ports[1]),
		"--controllers="+strings.Join(controllers, ","),
		"--use-service-account-credentials=true",
		"--service-account-private-key-file="+saKey,
		"--root-ca-file="+caFile,
		"--node-monitor-period="+nodeMonitorPeriod.String(),
		"--node-monitor-grace-period="+c.nodeMonitorGracePeriod().String(),
		"--node-startup-grace-period="+nodeStartupGracePeriod.String())
	c.controllerMgr, err = startProcess(c.Dir, "kube-controller-manager", c.binaries.KubeControllerManager, kcmArgs...)
	if err != nil {
		return err
	}
	client := tlsClient(c.caPEM)
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := c.scheduler.waitFor(waitCtx, "kube-scheduler is healthy",
		httpOK(client, "https://127.0.0.1:"+strconv.Itoa(ports[0])+"/healthz")); err != nil {
		return fmt.Errorf("starting kube-scheduler: %w", err)
	}
	if err := c.controllerMgr.waitFor(waitCtx, "kube-controller-manager is healthy",
		httpOK(client, "https://127.0.0.1:"+strconv.Itoa(ports[1])+"/healthz")); err != nil {
		return fmt.Errorf("starting kube-controller-manager: %w", err)
	}
	return nil
}
