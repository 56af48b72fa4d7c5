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
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

// KubeVirtName is the name of the KubeVirt CR.
const KubeVirtName = "kubevirt"

// evictionWebhook is the virt-api webhook that turns a virt-launcher pod's eviction
// into an evacuation (KubeVirt's supported drain path).
const evictionWebhook = "virt-launcher-eviction-interceptor.kubevirt.io"

// kubevirtManifests is what integration/build/kubevirt/cmd/kubevirt-manifests prints.
type kubevirtManifests struct {
	CRDs              []*extv1.CustomResourceDefinition                       `json:"crds"`
	ValidatingWebhook *admissionregistrationv1.ValidatingWebhookConfiguration `json:"validatingWebhook"`
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
	apiPort, err := c.startVirtAPI(ctx)
	if err != nil {
		return err
	}
	if err := c.registerVirtAPI(ctx, m.ValidatingWebhook, apiPort); err != nil {
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
	// reported the installation deployed; there is no virt-operator here.
	created.Status.Phase = kubevirtv1.KubeVirtPhaseDeployed
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
	c.virtAPI, err = startProcess(c.Dir, "virt-api", c.binaries.VirtAPI,
		"--kubeconfig="+c.Kubeconfig, "--listen=127.0.0.1", "--port="+strconv.Itoa(port),
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

// registerVirtAPI registers virt-api's eviction webhook, exactly as KubeVirt generates
// it but addressed by URL, and its subresource API through the aggregator (an
// ExternalName service that resolves to localhost); Options.WithoutEvictionWebhook and
// Options.WithoutSubresourceAPI leave either out.
func (c *Cluster) registerVirtAPI(ctx context.Context, generated *admissionregistrationv1.ValidatingWebhookConfiguration, port int) error {
	base := "https://127.0.0.1:" + strconv.Itoa(port)
	cfg := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: generated.Name}}
	for _, hook := range generated.Webhooks {
		if hook.Name != evictionWebhook || hook.ClientConfig.Service == nil || hook.ClientConfig.Service.Path == nil {
			continue
		}
		url := base + *hook.ClientConfig.Service.Path
		hook.ClientConfig = admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: c.caPEM}
		cfg.Webhooks = append(cfg.Webhooks, hook)
	}
	if len(cfg.Webhooks) != 1 {
		return fmt.Errorf("KubeVirt's generated webhooks have no %s entry", evictionWebhook)
	}
	if !c.opts.WithoutEvictionWebhook {
		if _, err := c.Kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, cfg, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("registering virt-api's eviction webhook: %w", err)
		}
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
	c.virtCtrl, err = startProcess(c.Dir, "virt-controller", c.binaries.VirtController,
		"--kubeconfig="+c.Kubeconfig, "--listen=127.0.0.1", "--port="+strconv.Itoa(ports[0]),
		"--prom-cert-file="+cert, "--prom-key-file="+key,
		"--leader-elect-lease-duration=3s", "--leader-elect-renew-deadline=2s", "--leader-elect-retry-period=500ms")
	if err != nil {
		return err
	}
	client := tlsClient(c.caPEM)
	waitCtx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	return c.virtCtrl.waitFor(waitCtx, "virt-controller leads", httpOK(client, "https://127.0.0.1:"+strconv.Itoa(ports[0])+"/leader"))
}
