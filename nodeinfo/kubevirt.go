package nodeinfo

import (
	"fmt"

	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// KubeVirt resources, as the API server names them.
const (
	ResourceVMIs       = "virtualmachineinstances"
	ResourceVMs        = "virtualmachines"
	ResourceVMIRSs     = "virtualmachineinstancereplicasets"
	ResourceMigrations = "virtualmachineinstancemigrations"
	ResourceKubeVirts  = "kubevirts"
)

// NewKubeVirtScheme returns a scheme that knows KubeVirt's core/v1 types and the
// meta types a REST client needs for them.
func NewKubeVirtScheme() (*runtime.Scheme, error) {
	scheme := runtime.NewScheme()
	if err := kubevirtv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("registering KubeVirt types: %w", err)
	}
	return scheme, nil
}

// NewKubeVirtClient returns a REST client for kubevirt.io/v1 (VMIs, VMs, VMIRSs,
// migrations, the KubeVirt CR). It is the typed client-go REST client, without
// kubevirt.io/client-go, which pins an older Kubernetes.
func NewKubeVirtClient(cfg *rest.Config) (rest.Interface, error) {
	return newRESTClient(cfg, kubevirtv1.SchemeGroupVersion)
}

// NewKubeVirtSubresourceClient returns a REST client for subresources.kubevirt.io/v1,
// which virt-api serves (evacuate/cancel, migrate, ...).
func NewKubeVirtSubresourceClient(cfg *rest.Config) (rest.Interface, error) {
	return newRESTClient(cfg, kubevirtv1.SubresourceStorageGroupVersion)
}

func newRESTClient(cfg *rest.Config, gv schema.GroupVersion) (rest.Interface, error) {
	scheme, err := NewKubeVirtScheme()
	if err != nil {
		return nil, err
	}
	c := rest.CopyConfig(cfg)
	c.GroupVersion = &gv
	c.APIPath = "/apis"
	c.NegotiatedSerializer = serializer.WithoutConversionCodecFactory{CodecFactory: serializer.NewCodecFactory(scheme)}
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	client, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, fmt.Errorf("creating the %s client: %w", gv, err)
	}
	return client, nil
}
