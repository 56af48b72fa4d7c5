package cluster

import (
	"context"
	"fmt"
	"strconv"
	"syscall"
	"time"
)

// Faults of the control plane, for the tests that break a cluster on purpose (on a
// cluster of their own): each part restarted in place (same port, same data, same
// arguments, its log appended to), or etcd paused.

// RestartAPIServer stops kube-apiserver (SIGTERM, SIGKILL after 10 s) and starts it
// again on the same port with the same etcd, and waits until it is ready. It returns
// how long the API server answered nothing.
func (c *Cluster) RestartAPIServer(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	p, err := c.apiserver.restart(10 * time.Second)
	if err != nil {
		return 0, err
	}
	c.apiserver = p
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if err := p.waitFor(waitCtx, "kube-apiserver is ready again", func(ctx context.Context) error {
		body, err := c.Kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%w: %s", err, body)
		}
		return nil
	}); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// PauseEtcd stops etcd with SIGSTOP: it holds its connections and answers nothing,
// as a frozen or partitioned etcd does, until ResumeEtcd.
func (c *Cluster) PauseEtcd() error { return c.etcd.signal(syscall.SIGSTOP) }

// ResumeEtcd continues a paused etcd (SIGCONT).
func (c *Cluster) ResumeEtcd() error { return c.etcd.signal(syscall.SIGCONT) }

// StopAPIServer stops kube-apiserver (SIGTERM, SIGKILL after 10 s) until
// StartAPIServer: every client gets "connection refused".
func (c *Cluster) StopAPIServer() { c.apiserver.stop(10 * time.Second) }

// StartAPIServer starts a stopped kube-apiserver again, as RestartAPIServer does.
func (c *Cluster) StartAPIServer(ctx context.Context) error {
	_, err := c.RestartAPIServer(ctx)
	return err
}

// RestartVirtAPI stops virt-api and starts it again on the same port (where the
// webhooks and the subresource API point), and waits until it serves.
func (c *Cluster) RestartVirtAPI(ctx context.Context) error {
	p, err := c.virtAPI.restart(5 * time.Second)
	if err != nil {
		return err
	}
	c.virtAPI = p
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return p.waitFor(waitCtx, "virt-api serves again", httpOK(tlsClient(c.caPEM), "https://127.0.0.1:"+strconv.Itoa(c.virtAPIPort)+"/healthz"))
}

// RestartVirtController stops virt-controller and starts it again, and waits until
// it leads (after its former lease expires, at most 15 s).
func (c *Cluster) RestartVirtController(ctx context.Context) error {
	p, err := c.virtCtrl.restart(5 * time.Second)
	if err != nil {
		return err
	}
	c.virtCtrl = p
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	return p.waitFor(waitCtx, "virt-controller leads again", httpOK(tlsClient(c.caPEM), "https://127.0.0.1:"+strconv.Itoa(c.virtCtrlPort)+"/leader"))
}
