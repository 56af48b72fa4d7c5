// Package drainctl is what an operator's workstation does with a node: look at it
// (each VM, its strategy, what a drain does or would do to it), set and remove the
// drain (taint and cordon), follow the node until it is empty, evict its other pods.
// It stands to `node-agent drain/undrain/status` as k8s.io/kubectl/pkg/drain stands to
// `kubectl drain`: the library, built on the rules the agents on the nodes use (agent,
// nodeinfo), while cmd/node-agent keeps the flags, exit codes and rendering.
package drainctl

import (
	"fmt"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/node-agent/node-agent/agent"
	"github.com/node-agent/node-agent/nodeinfo"
)

// Options say where the cluster keeps node-agent's configuration.
type Options struct {
	// KubeVirtNamespace holds the KubeVirt CR and the legacy kubevirt-config ConfigMap.
	KubeVirtNamespace string
	// DrainTaintKey, when set, is the drain taint key (as the agents' flag); otherwise
	// it is resolved as the agents resolve it.
	DrainTaintKey string
	// MigrationStallTimeout is when a migration stuck in one phase shows its VM as
	// blocked, as the agents' --migration-stall-timeout. Default
	// agent.DefaultMigrationStallTimeout.
	MigrationStallTimeout time.Duration
}

// Client is a workstation's connection to the cluster.
type Client struct {
	opts Options
	// Kube is the Kubernetes client.
	Kube kubernetes.Interface
	// KubeVirt is a kubevirt.io/v1 REST client (nodeinfo.NewKubeVirtClient).
	KubeVirt rest.Interface
	// Subresources is a subresources.kubevirt.io/v1 REST client.
	Subresources rest.Interface
}

// New connects to the cluster that cfg names.
func New(cfg *rest.Config, opts Options) (*Client, error) {
	if opts.KubeVirtNamespace == "" {
		opts.KubeVirtNamespace = "kubevirt"
	}
	if opts.MigrationStallTimeout <= 0 {
		opts.MigrationStallTimeout = agent.DefaultMigrationStallTimeout
	}
	c := &Client{opts: opts}
	var err error
	if c.Kube, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	if c.KubeVirt, err = nodeinfo.NewKubeVirtClient(cfg); err != nil {
		return nil, err
	}
	if c.Subresources, err = nodeinfo.NewKubeVirtSubresourceClient(cfg); err != nil {
		return nil, err
	}
	return c, nil
}
