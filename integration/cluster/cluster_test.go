package cluster

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// TestStart starts a whole cluster and checks that each part answers: the API server
// serves KubeVirt's CRDs, the KubeVirt CR is there, virt-api answers its subresource
// API through the aggregator (its /version, which virt-api writes), and virt-controller
// leads and keeps renewing its leader lease, and virt-api and virt-controller run with
// the rights of KubeVirt's install, not a cluster admin's. (The CR's phase is not checked: the
// harness writes it, there is no virt-operator.)
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
	vmis := &kubevirtv1.VirtualMachineInstanceList{}
	if err := c.KubeVirt.Get().Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(vmis); err != nil {
		t.Errorf("listing VMIs: %v", err)
	}
	if _, err := c.Kube.Discovery().ServerResourcesForGroupVersion("subresources.kubevirt.io/v1"); err != nil {
		t.Errorf("virt-api's subresource API is not served: %v", err)
	}
	var version struct {
		GitVersion string `json:"gitVersion"`
	}
	if raw, err := c.Kube.Discovery().RESTClient().Get().AbsPath("/apis/subresources.kubevirt.io/v1/version").DoRaw(ctx); err != nil {
		t.Errorf("virt-api's /version: %v", err)
	} else if err := json.Unmarshal(raw, &version); err != nil || version.GitVersion == "" {
		t.Errorf("virt-api's /version answered %q (%v), want its gitVersion", raw, err)
	} else {
		t.Logf("virt-api %s", version.GitVersion)
	}
	checkLeaderRenews(ctx, t, c, "virt-controller")
	checkKubeVirtRights(ctx, t, c)
	if _, err := c.Kube.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
		t.Errorf("reading the default namespace: %v", err)
	}
}

// checkKubeVirtRights checks, with the credentials virt-api and virt-controller run
// with, that each has a right its role in KubeVirt's install gives it and not a
// cluster admin's rights (every verb on every resource), nor one its role lacks.
func checkKubeVirtRights(ctx context.Context, t *testing.T, c *Cluster) {
	t.Helper()
	for _, tc := range []struct {
		sa   string
		attr authorizationv1.ResourceAttributes
		want bool
	}{
		{VirtAPIServiceAccount, authorizationv1.ResourceAttributes{Verb: "patch", Group: "kubevirt.io", Resource: "virtualmachineinstances", Namespace: "default"}, true},
		{VirtAPIServiceAccount, authorizationv1.ResourceAttributes{Verb: "create", Resource: "pods", Namespace: "default"}, false},
		{VirtAPIServiceAccount, authorizationv1.ResourceAttributes{Verb: "*", Group: "*", Resource: "*"}, false},
		{VirtControllerServiceAccount, authorizationv1.ResourceAttributes{Verb: "create", Resource: "pods", Namespace: "default"}, true},
		{VirtControllerServiceAccount, authorizationv1.ResourceAttributes{Verb: "delete", Resource: "nodes"}, false},
		{VirtControllerServiceAccount, authorizationv1.ResourceAttributes{Verb: "*", Group: "*", Resource: "*"}, false},
	} {
		cfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(c.Dir, tc.sa+".kubeconfig"))
		if err != nil {
			t.Fatalf("reading the kubeconfig of %s: %v", tc.sa, err)
		}
		kube, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		attr := tc.attr
		review, err := kube.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx, &authorizationv1.SelfSubjectAccessReview{
			Spec: authorizationv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &attr},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("%s: can-i %s %s.%s: %v", tc.sa, attr.Verb, attr.Resource, attr.Group, err)
		}
		if review.Status.Allowed != tc.want {
			t.Errorf("%s: can-i %s %s.%s in %q = %t, want %t (%s)", tc.sa, attr.Verb, attr.Resource, attr.Group, attr.Namespace,
				review.Status.Allowed, tc.want, review.Status.Reason)
		}
	}
}

// checkLeaderRenews checks that a controller holds its leader-election Lease (named
// after it, in any namespace) and renews it: its renewTime moves on within 15 s (the
// harness runs virt-controller with a 15 s lease, renewed every second).
func checkLeaderRenews(ctx context.Context, t *testing.T, c *Cluster, name string) {
	t.Helper()
	lease := func() *coordinationv1.Lease {
		leases, err := c.Kube.CoordinationV1().Leases("").List(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
		if err != nil || len(leases.Items) != 1 {
			t.Fatalf("the %s leader lease: %v (%d found)", name, err, len(leases.Items))
		}
		return &leases.Items[0]
	}
	first := lease()
	if first.Spec.HolderIdentity == nil || *first.Spec.HolderIdentity == "" || first.Spec.RenewTime == nil {
		t.Fatalf("the %s lease has no holder: %+v", name, first.Spec)
	}
	err := wait.PollUntilContextTimeout(ctx, 250*time.Millisecond, 15*time.Second, false, func(context.Context) (bool, error) {
		l := lease()
		return l.Spec.RenewTime != nil && l.Spec.RenewTime.After(first.Spec.RenewTime.Time), nil
	})
	if err != nil {
		t.Errorf("%s (lease held by %s) did not renew its lease since %s: %v", name, *first.Spec.HolderIdentity, first.Spec.RenewTime.Format(time.RFC3339Nano), err)
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
