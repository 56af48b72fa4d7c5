package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// KubeVirtName is the name of the KubeVirt CR.
const KubeVirtName = "kubevirt"

// evictionWebhook is the virt-api webhook that turns a virt-launcher pod's eviction
// into an evacuation (KubeVirt's supported drain path).
const evictionWebhook = "virt-launcher-eviction-interceptor.kubevirt.io"

// The service accounts KubeVirt's install runs virt-api, virt-controller and
// virt-handler as (components/serviceaccountnames.go). KubeVirt's webhooks treat
// their requests apart: the VMI mutator drops status changes from anyone else, and
// the VMI validators refuse anyone else's change of the reserved kubevirt.io/ labels
// (kubevirt.io/nodeName, ...).
const (
	VirtAPIServiceAccount        = "kubevirt-apiserver"
	VirtControllerServiceAccount = "kubevirt-controller"
	VirtHandlerServiceAccount    = "kubevirt-handler"
)

// ServiceAccountUser is the user name of the service account sa of KubeVirt's
// namespace, as the API server authenticates its token.
func ServiceAccountUser(sa string) string {
	return "system:serviceaccount:" + KubeVirtNamespace + ":" + sa
}

// serviceAccountGroups are the groups the API server gives a token of a service
// account of KubeVirt's namespace (besides system:authenticated).
func serviceAccountGroups() []string {
	return []string{"system:serviceaccounts", "system:serviceaccounts:" + KubeVirtNamespace}
}

// KubeVirtClientAs returns a kubevirt.io/v1 REST client that acts as KubeVirt's
// service account sa (impersonated by the cluster admin) with that account's rights
// only, the roles of KubeVirt's install: for a test to write what only KubeVirt's own
// programs may write, such as a VMI's status or its kubevirt.io/nodeName label.
func (c *Cluster) KubeVirtClientAs(sa string) (rest.Interface, error) {
	cfg := rest.CopyConfig(c.RESTConfig)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: ServiceAccountUser(sa), Groups: append(serviceAccountGroups(), "system:authenticated")}
	return nodeinfo.NewKubeVirtClient(cfg)
}

// kubevirtManifests is what integration/build/kubevirt/cmd/kubevirt-manifests prints.
type kubevirtManifests struct {
	CRDs              []*extv1.CustomResourceDefinition                       `json:"crds"`
	ValidatingWebhook *admissionregistrationv1.ValidatingWebhookConfiguration `json:"validatingWebhook"`
	MutatingWebhook   *admissionregistrationv1.MutatingWebhookConfiguration   `json:"mutatingWebhook"`
	RBAC              kubevirtRBAC                                            `json:"rbac"`
}

// InstallKubeVirt installs KubeVirt into a cluster started with
// Options.WithoutKubeVirt: its CRDs, its CR with cfg, virt-api and virt-controller.
func (c *Cluster) InstallKubeVirt(ctx context.Context, cfg kubevirtv1.KubeVirtConfiguration) error {
	if c.virtAPI != nil || c.virtCtrl != nil {
		return fmt.Errorf("the KubeVirt control plane is already installed")
	}
	return c.installKubeVirt(ctx, cfg)
}

func (c *Cluster) installKubeVirt(ctx context.Context, cfg kubevirtv1.KubeVirtConfiguration) error {
	raw, err := exec.CommandContext(ctx, c.binaries.KubeVirtManifests, KubeVirtNamespace).Output()
	if err != nil {
		return fmt.Errorf("generating KubeVirt's CRDs with its own code: %w", err)
	}
	var m kubevirtManifests
	if err := json.Unmarshal(raw, &m); err != nil {
		return fmt.Errorf("reading KubeVirt's generated manifests: %w", err)
	}
	if _, err := c.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: KubeVirtNamespace}}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the %s namespace: %w", KubeVirtNamespace, err)
	}
	if err := c.createKubeVirtRBAC(ctx, m.RBAC); err != nil {
		return err
	}
	if err := c.createCRDs(ctx, m.CRDs); err != nil {
		return err
	}
	if err := c.createKubeVirtCR(ctx, cfg); err != nil {
		return err
	}
	if _, err := c.Kube.CoreV1().ConfigMaps(KubeVirtNamespace).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "kubevirt-ca"},
		Data:       map[string]string{"ca-bundle": string(c.caPEM)},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the kubevirt-ca ConfigMap: %w", err)
	}
	if c.opts.WithoutKubeVirtControllers {
		return nil
	}
	apiPort, err := c.startVirtAPI(ctx)
	if err != nil {
		return err
	}
	if err := c.registerVirtAPI(ctx, m, apiPort); err != nil {
		return err
	}
	return c.startVirtController(ctx)
}

func (c *Cluster) createCRDs(ctx context.Context, crds []*extv1.CustomResourceDefinition) error {
	client, err := apiextensionsclient.NewForConfig(c.RESTConfig)
	if err != nil {
		return fmt.Errorf("creating the apiextensions client: %w", err)
	}
	for _, crd := range crds {
		// Created, not applied: the VMI schema is larger than the last-applied annotation allows.
		if _, err := client.ApiextensionsV1().CustomResourceDefinitions().Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating the CRD %s: %w", crd.Name, err)
		}
	}
	for _, crd := range crds {
		err := wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			got, err := client.ApiextensionsV1().CustomResourceDefinitions().Get(ctx, crd.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			for _, cond := range got.Status.Conditions {
				if cond.Type == extv1.Established && cond.Status == extv1.ConditionTrue {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("waiting for the CRD %s to be established: %w", crd.Name, err)
		}
	}
	return nil
}

func (c *Cluster) createKubeVirtCR(ctx context.Context, cfg kubevirtv1.KubeVirtConfiguration) error {
	kv := &kubevirtv1.KubeVirt{
		TypeMeta:   metav1.TypeMeta{APIVersion: kubevirtv1.GroupVersion.String(), Kind: "KubeVirt"},
		ObjectMeta: metav1.ObjectMeta{Name: KubeVirtName, Namespace: KubeVirtNamespace},
		Spec:       kubevirtv1.KubeVirtSpec{Configuration: cfg},
	}
	created := &kubevirtv1.KubeVirt{}
	if err := c.KubeVirt.Post().Namespace(KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Body(kv).Do(ctx).Into(created); err != nil {
		return fmt.Errorf("creating the KubeVirt CR: %w", err)
	}
	// virt-controller and virt-api ignore spec.configuration until virt-operator has
	// reported the installation deployed; there is no virt-operator here. virt-operator
	// also records the cluster's default architecture, which virt-api's VMI mutator
	// writes into every new VMI (the validator refuses a VMI without one): amd64, the
	// architecture of the simulated nodes.
	created.Status.Phase = kubevirtv1.KubeVirtPhaseDeployed
	created.Status.DefaultArchitecture = "amd64"
	created.Status.ObservedKubeVirtVersion = KubeVirtVersion
	created.Status.TargetKubeVirtVersion = KubeVirtVersion
	if err := c.KubeVirt.Put().Namespace(KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Name(KubeVirtName).
		SubResource("status").Body(created).Do(ctx).Error(); err != nil {
		return fmt.Errorf("marking the KubeVirt CR deployed: %w", err)
	}
	return nil
}

// UpdateKubeVirtConfiguration changes the KubeVirt CR's spec.configuration, as an
// operator editing the CR would.
func (c *Cluster) UpdateKubeVirtConfiguration(ctx context.Context, mutate func(*kubevirtv1.KubeVirtConfiguration)) error {
	for {
		kv := &kubevirtv1.KubeVirt{}
		if err := c.KubeVirt.Get().Namespace(KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Name(KubeVirtName).Do(ctx).Into(kv); err != nil {
			return fmt.Errorf("reading the KubeVirt CR: %w", err)
		}
		mutate(&kv.Spec.Configuration)
		err := c.KubeVirt.Put().Namespace(KubeVirtNamespace).Resource(nodeinfo.ResourceKubeVirts).Name(KubeVirtName).Body(kv).Do(ctx).Error()
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("updating the KubeVirt CR: %w", err)
		}
		return nil
	}
}

func (c *Cluster) startVirtAPI(ctx context.Context) (int, error) {
	pki := filepath.Join(c.Dir, "pki")
	serving, err := c.ca.issue("virt-api", nil, []string{"127.0.0.1", "localhost", "virt-api.kubevirt.svc"})
	if err != nil {
		return 0, err
	}
	cert, key, err := serving.write(pki, "virt-api")
	if err != nil {
		return 0, err
	}
	handler, err := c.ca.issue("virt-handler-client", nil, nil)
	if err != nil {
		return 0, err
	}
	handlerCert, handlerKey, err := handler.write(pki, "virt-api-handler-client")
	if err != nil {
		return 0, err
	}
	ports, err := freePorts(2)
	if err != nil {
		return 0, err
	}
	port := ports[0]
	c.virtAPIPort = port
	kubeconfig, err := c.serviceAccountKubeconfig(VirtAPIServiceAccount)
	if err != nil {
		return 0, err
	}
	c.virtAPI, err = startRespawned(c.Dir, "virt-api", c.binaries.VirtAPI,
		"--kubeconfig="+kubeconfig, "--listen=127.0.0.1", "--port="+strconv.Itoa(port),
		"--console-server-port="+strconv.Itoa(ports[1]),
		"--tls-cert-file="+cert, "--tls-key-file="+key,
		"--handler-cert-file="+handlerCert, "--handler-key-file="+handlerKey)
	if err != nil {
		return 0, err
	}
	client := tlsClient(c.caPEM)
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	if err := c.virtAPI.waitFor(waitCtx, "virt-api serves", httpOK(client, "https://127.0.0.1:"+strconv.Itoa(port)+"/healthz")); err != nil {
		return 0, err
	}
	return port, nil
}

// registerVirtAPI registers virt-api's webhooks, every one KubeVirt's install
// registers (components.NewVirtAPIMutatingWebhookConfiguration and
// NewVirtAPIValidatingWebhookConfiguration: VMI, VM, VMIRS, pool, migration, ...
// mutators and validators, and the pods/eviction interceptor), exactly as generated
// but addressed by URL; and its subresource API through the aggregator (an
// ExternalName service that resolves to localhost). Options.WithoutEvictionWebhook
// leaves the eviction interceptor out, Options.WithoutSubresourceAPI the API.
func (c *Cluster) registerVirtAPI(ctx context.Context, m kubevirtManifests, port int) error {
	if m.MutatingWebhook == nil || m.ValidatingWebhook == nil {
		return fmt.Errorf("KubeVirt's generated manifests have no virt-api webhook configurations")
	}
	base := "https://127.0.0.1:" + strconv.Itoa(port)
	byURL := func(hook string, cc *admissionregistrationv1.WebhookClientConfig) error {
		if cc.Service == nil || cc.Service.Path == nil {
			return fmt.Errorf("KubeVirt's webhook %s is not served by a service path", hook)
		}
		url := base + *cc.Service.Path
		*cc = admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: c.caPEM}
		return nil
	}
	mutating := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: m.MutatingWebhook.Name}}
	for _, hook := range m.MutatingWebhook.Webhooks {
		if err := byURL(hook.Name, &hook.ClientConfig); err != nil {
			return err
		}
		mutating.Webhooks = append(mutating.Webhooks, hook)
	}
	validating := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: m.ValidatingWebhook.Name}}
	found := false
	for _, hook := range m.ValidatingWebhook.Webhooks {
		if hook.Name == evictionWebhook {
			found = true
			if c.opts.WithoutEvictionWebhook {
				continue
			}
		}
		if err := byURL(hook.Name, &hook.ClientConfig); err != nil {
			return err
		}
		validating.Webhooks = append(validating.Webhooks, hook)
	}
	if !found {
		return fmt.Errorf("KubeVirt's generated webhooks have no %s entry", evictionWebhook)
	}
	if _, err := c.Kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, mutating, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("registering virt-api's mutating webhooks: %w", err)
	}
	if _, err := c.Kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, validating, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("registering virt-api's validating webhooks: %w", err)
	}
	if c.opts.WithoutSubresourceAPI {
		return nil
	}

	if _, err := c.Kube.CoreV1().Services(KubeVirtNamespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "virt-api"},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "localhost"},
	}, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("creating the virt-api service: %w", err)
	}
	// Through the dynamic client, so that this test harness needs no kube-aggregator module.
	dyn, err := dynamic.NewForConfig(c.RESTConfig)
	if err != nil {
		return fmt.Errorf("creating the dynamic client: %w", err)
	}
	apiServices := dyn.Resource(schema.GroupVersionResource{Group: "apiregistration.k8s.io", Version: "v1", Resource: "apiservices"})
	apisvc := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "apiregistration.k8s.io/v1",
		"kind":       "APIService",
		"metadata":   map[string]any{"name": "v1.subresources.kubevirt.io"},
		"spec": map[string]any{
			"service":              map[string]any{"namespace": KubeVirtNamespace, "name": "virt-api", "port": int64(port)},
			"group":                "subresources.kubevirt.io",
			"version":              "v1",
			"caBundle":             c.caPEM,
			"groupPriorityMinimum": int64(1000),
			"versionPriority":      int64(15),
		},
	}}
	if _, err := apiServices.Create(ctx, apisvc, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("registering virt-api's subresource API: %w", err)
	}
	waitCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return c.virtAPI.waitFor(waitCtx, "the subresource API is available", func(ctx context.Context) error {
		got, err := apiServices.Get(ctx, apisvc.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		conds, _, _ := unstructured.NestedSlice(got.Object, "status", "conditions")
		for _, raw := range conds {
			cond, _ := raw.(map[string]any)
			if cond["type"] == "Available" {
				if cond["status"] == "True" {
					return nil
				}
				return fmt.Errorf("%v: %v", cond["reason"], cond["message"])
			}
		}
		return fmt.Errorf("no Available condition yet")
	})
}

// serviceAccountKubeconfig writes a kubeconfig that authenticates as the service
// account sa of KubeVirt's namespace (a client certificate with its user name), for
// the KubeVirt program the install runs as sa: KubeVirt's webhooks tell its own
// programs' requests by that name. It has a service account's groups, and the rights
// the roles of KubeVirt's install give sa (createKubeVirtRBAC), nothing more.
func (c *Cluster) serviceAccountKubeconfig(sa string) (string, error) {
	pair, err := c.ca.issue(ServiceAccountUser(sa), serviceAccountGroups(), nil)
	if err != nil {
		return "", err
	}
	pki := filepath.Join(c.Dir, "pki")
	cert, key, err := pair.write(pki, sa+"-client")
	if err != nil {
		return "", err
	}
	cfg := rest.CopyConfig(c.RESTConfig)
	cfg.CertFile, cfg.KeyFile = cert, key
	path := filepath.Join(c.Dir, sa+".kubeconfig")
	return path, writeKubeconfig(path, cfg)
}

func (c *Cluster) startVirtController(ctx context.Context) error {
	serving, err := c.ca.issue("virt-controller", nil, []string{"127.0.0.1", "localhost"})
	if err != nil {
		return err
	}
	cert, key, err := serving.write(filepath.Join(c.Dir, "pki"), "virt-controller")
	if err != nil {
		return err
	}
	ports, err := freePorts(1)
	if err != nil {
		return err
	}
	c.virtCtrlPort = ports[0]
	kubeconfig, err := c.serviceAccountKubeconfig(VirtControllerServiceAccount)
	if err != nil {
		return err
	}
	c.virtCtrl, err = startRespawned(c.Dir, "virt-controller", c.binaries.VirtController,
		"--kubeconfig="+kubeconfig, "--listen=127.0.0.1", "--port="+strconv.Itoa(ports[0]),
		"--prom-cert-file="+cert, "--prom-key-file="+key,
		// Long enough that a renewal delayed by a loaded machine (five clusters on two
		// cores) does not lose the lease: virt-controller exits when it does, and nothing
		// here restarts it. A restarted virt-controller (RestartVirtController) waits for
		// its former lease to expire.
		"--leader-elect-lease-duration=15s", "--leader-elect-renew-deadline=10s", "--leader-elect-retry-period=1s")
	if err != nil {
		return err
	}
	client := tlsClient(c.caPEM)
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	return c.virtCtrl.waitFor(waitCtx, "virt-controller leads", httpOK(client, "https://127.0.0.1:"+strconv.Itoa(ports[0])+"/leader"))
}
