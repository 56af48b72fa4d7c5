// Command kubevirt-manifests prints, as one JSON object, the CustomResourceDefinitions,
// the virt-api webhook configurations and the RBAC objects of virt-api,
// virt-controller and virt-handler exactly as KubeVirt's own operator generates them,
// so that the test cluster serves KubeVirt's real schemas and runs KubeVirt's programs
// with the rights a real install gives them.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac"
)

type manifests struct {
	CRDs              []*extv1.CustomResourceDefinition                       `json:"crds"`
	ValidatingWebhook *admissionregistrationv1.ValidatingWebhookConfiguration `json:"validatingWebhook"`
	MutatingWebhook   *admissionregistrationv1.MutatingWebhookConfiguration   `json:"mutatingWebhook"`
	RBAC              rbacObjects                                             `json:"rbac"`
}

// rbacObjects are the service accounts, roles and bindings of KubeVirt's install, by kind.
type rbacObjects struct {
	ServiceAccounts     []*corev1.ServiceAccount     `json:"serviceAccounts"`
	ClusterRoles        []*rbacv1.ClusterRole        `json:"clusterRoles"`
	ClusterRoleBindings []*rbacv1.ClusterRoleBinding `json:"clusterRoleBindings"`
	Roles               []*rbacv1.Role               `json:"roles"`
	RoleBindings        []*rbacv1.RoleBinding        `json:"roleBindings"`
}

// add sorts objs by kind; a kind this program does not know is an error, so that a
// newer KubeVirt's additional object is not dropped in silence.
func (r *rbacObjects) add(objs []runtime.Object) error {
	for _, obj := range objs {
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			r.ServiceAccounts = append(r.ServiceAccounts, o)
		case *rbacv1.ClusterRole:
			r.ClusterRoles = append(r.ClusterRoles, o)
		case *rbacv1.ClusterRoleBinding:
			r.ClusterRoleBindings = append(r.ClusterRoleBindings, o)
		case *rbacv1.Role:
			r.Roles = append(r.Roles, o)
		case *rbacv1.RoleBinding:
			r.RoleBindings = append(r.RoleBindings, o)
		default:
			return fmt.Errorf("an RBAC object of type %T", obj)
		}
	}
	return nil
}

func main() {
	namespace := "kubevirt"
	if len(os.Args) > 1 {
		namespace = os.Args[1]
	}
	gens := []func() (*extv1.CustomResourceDefinition, error){
		components.NewKubeVirtCrd,
		components.NewVirtualMachineInstanceCrd, components.NewPresetCrd, components.NewReplicaSetCrd,
		components.NewVirtualMachineCrd, components.NewVirtualMachineInstanceMigrationCrd,
		components.NewVirtualMachineSnapshotCrd, components.NewVirtualMachineSnapshotContentCrd,
		components.NewVirtualMachineRestoreCrd, components.NewVirtualMachineInstancetypeCrd,
		components.NewVirtualMachineClusterInstancetypeCrd, components.NewVirtualMachinePoolCrd,
		components.NewMigrationPolicyCrd, components.NewVirtualMachinePreferenceCrd,
		components.NewVirtualMachineClusterPreferenceCrd, components.NewVirtualMachineExportCrd,
		components.NewVirtualMachineCloneCrd, components.NewVirtualMachineBackupCrd,
		components.NewVirtualMachineBackupTrackerCrd,
	}
	var out manifests
	for _, gen := range gens {
		crd, err := gen()
		if err != nil {
			fmt.Fprintf(os.Stderr, "kubevirt-manifests: generating a CRD: %v\n", err)
			os.Exit(1)
		}
		out.CRDs = append(out.CRDs, crd)
	}
	out.ValidatingWebhook = components.NewVirtAPIValidatingWebhookConfiguration(namespace)
	out.MutatingWebhook = components.NewVirtAPIMutatingWebhookConfiguration(namespace)
	// As virt-operator's install strategy (install/strategy.go) generates them for the
	// three programs; the controller's NetworkAttachmentDefinition rule is included, as
	// it is unless the install opts into external network resource injection.
	for _, objs := range [][]runtime.Object{
		rbac.GetAllApiServer(namespace),
		rbac.GetAllController(namespace, true),
		rbac.GetAllHandler(namespace),
	} {
		if err := out.RBAC.add(objs); err != nil {
			fmt.Fprintf(os.Stderr, "kubevirt-manifests: %v\n", err)
			os.Exit(1)
		}
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "kubevirt-manifests: %v\n", err)
		os.Exit(1)
	}
}
