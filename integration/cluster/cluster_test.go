package cluster

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// TestStart starts a whole cluster and checks that each part answers: the API server
// serves KubeVirt's CRDs, the KubeVirt CR is there, virt-api's subresource API is
// reachable through the aggregator.
func TestStart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	start := time.Now()
	c, err := Start(ctx, Options{Out: os.Stderr})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { c.Stop(t.Failed()) }()
	t.Logf("cluster started in %s", time.Since(start))
	kv := &kubevirtv1.KubeVirt{}
	if err := c.KubeVirt.Get().Namespace(KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Name(KubeVirtName).Do(ctx).Into(kv); err != nil {
		t.Fatalf("reading the KubeVirt CR: %v", err)
	}
	if kv.Status.Phase != kubevirtv1.KubeVirtPhaseDeployed {
		t.Errorf("KubeVirt CR phase %q, want Deployed", kv.Status.Phase)
	}
	vmis := &kubevirtv1.VirtualMachineInstanceList{}
	if err := c.KubeVirt.Get().Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(vmis); err != nil {
		t.Errorf("listing VMIs: %v", err)
	}
	if _, err := c.Kube.Discovery().ServerResourcesForGroupVersion("subresources.kubevirt.io/v1"); err != nil {
		t.Errorf("virt-api's subresource API is not served: %v", err)
	}
	if _, err := c.Kube.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Errorf("reading the default namespace: %v", err)
	}
}

// TestStartFailsCleanly: a start that fails once the cluster's folder is chosen (here
// the folder is a file, so its certificates cannot be written) returns the error and
// stops what it started, instead of panicking in its cleanup.
func TestStartFailsCleanly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Start(ctx, Options{Dir: notADir, Out: io.Discard})
	if err == nil {
		c.Stop(false)
		t.Fatal("Start succeeded in a folder that is a file")
	}
	if c != nil {
		t.Errorf("Start returned a cluster with its error %v", err)
	}
}
