// Command kubevirt-manifests prints, as one JSON object, the CustomResourceDefinitions
// and the virt-api webhook configurations exactly as KubeVirt's own operator generates
// them, so that the test cluster serves KubeVirt's real schemas.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
)

type manifests struct {
	CRDs              []*extv1.CustomResourceDefinition                       `json:"crds"`
	ValidatingWebhook *admissionregistrationv1.ValidatingWebhookConfiguration `json:"validatingWebhook"`
	MutatingWebhook   *admissionregistrationv1.MutatingWebhookConfiguration   `json:"mutatingWebhook"`
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
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "kubevirt-manifests: %v\n", err)
		os.Exit(1)
	}
}
