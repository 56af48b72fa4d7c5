package sim

import (
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

// The LiveMigratable and StorageLiveMigratable conditions, computed with the
// rules of virt-handler v1.8.0 (pkg/virt-handler/vm.go
// calculateLiveMigrationCondition, calculateLiveStorageMigrationCondition,
// checkVolumesForMigration; pkg/network/vmispec VerifyVMIMigratable), in the
// same order. Simplifications: every simulated node has a host CPU model, so
// host-model CPUs are migratable; network binding plugins are taken as not
// migratable (their migration support is in the KubeVirt CR); TSC frequency
// requirements are not checked.

// liveMigratable returns the LiveMigratable condition and whether a migration
// would have to copy local disks (status.migrationMethod BlockMigration).
func liveMigratable(vmi *kubevirtv1.VirtualMachineInstance) (kubevirtv1.VirtualMachineInstanceCondition, bool) {
	block, blockErr := checkVolumesForMigration(vmi)
	notMigratable := func(reason, msg string) (kubevirtv1.VirtualMachineInstanceCondition, bool) {
		return kubevirtv1.VirtualMachineInstanceCondition{
			Type: kubevirtv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionFalse,
			Reason: reason, Message: msg,
		}, block
	}
	if err := checkInterfacesForMigration(vmi); err != nil {
		return notMigratable(kubevirtv1.VirtualMachineInstanceReasonInterfaceNotMigratable, err.Error())
	}
	if hasHostDevices(vmi) {
		return notMigratable(kubevirtv1.VirtualMachineInstanceReasonHostDeviceNotMigratable, "VMI uses a PCI host devices")
	}
	if ls := vmi.Spec.Domain.LaunchSecurity; ls != nil {
		switch {
		case ls.SEV != nil || ls.SNP != nil:
			return notMigratable(kubevirtv1.VirtualMachineInstanceReasonSEVNotMigratable, "VMI uses SEV")
		case ls.TDX != nil:
			return notMigratable(kubevirtv1.VirtualMachineInstanceReasonTDXNotMigratable, "VMI uses TDX")
		case vmi.Spec.Architecture == "s390x":
			return notMigratable(kubevirtv1.VirtualMachineInstanceReasonSecureExecutionNotMigratable, "VMI uses Secure Execution")
		}
	}
	if hasPersistentReservation(vmi) {
		return notMigratable(kubevirtv1.VirtualMachineInstanceReasonPRNotMigratable, "VMI uses SCSI persistent reservation")
	}
	if hasHypervPassthrough(vmi) {
		return notMigratable(kubevirtv1.VirtualMachineInstanceReasonHypervPassthroughNotMigratable, "VMI uses hyperv passthrough")
	}
	if blockErr != nil {
		return notMigratable(kubevirtv1.VirtualMachineInstanceReasonDisksNotMigratable, blockErr.Error())
	}
	return kubevirtv1.VirtualMachineInstanceCondition{
		Type: kubevirtv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionTrue,
	}, block
}

// storageLiveMigratable returns the StorageLiveMigratable condition.
func storageLiveMigratable(vmi *kubevirtv1.VirtualMachineInstance) kubevirtv1.VirtualMachineInstanceCondition {
	var parts []string
	add := func(reason, msg string) { parts = append(parts, fmt.Sprintf("%s: %s", reason, msg)) }
	if err := checkInterfacesForMigration(vmi); err != nil {
		add(kubevirtv1.VirtualMachineInstanceReasonInterfaceNotMigratable, err.Error())
	}
	if hasHostDevices(vmi) {
		add(kubevirtv1.VirtualMachineInstanceReasonHostDeviceNotMigratable, "VMI uses a PCI host devices")
	}
	if ls := vmi.Spec.Domain.LaunchSecurity; ls != nil {
		if ls.SEV != nil || ls.SNP != nil {
			add(kubevirtv1.VirtualMachineInstanceReasonSEVNotMigratable, "VMI uses SEV")
		} else if ls.TDX != nil {
			add(kubevirtv1.VirtualMachineInstanceReasonTDXNotMigratable, "VMI uses TDX")
		}
	}
	if hasPersistentReservation(vmi) {
		add(kubevirtv1.VirtualMachineInstanceReasonPRNotMigratable, "VMI uses SCSI persistent reservation")
	}
	if hasHypervPassthrough(vmi) {
		add(kubevirtv1.VirtualMachineInstanceReasonHypervPassthroughNotMigratable, "VMI uses hyperv passthrough")
	}
	if len(parts) == 0 {
		return kubevirtv1.VirtualMachineInstanceCondition{
			Type: kubevirtv1.VirtualMachineInstanceIsStorageLiveMigratable, Status: corev1.ConditionTrue,
		}
	}
	return kubevirtv1.VirtualMachineInstanceCondition{
		Type: kubevirtv1.VirtualMachineInstanceIsStorageLiveMigratable, Status: corev1.ConditionFalse,
		Reason: kubevirtv1.VirtualMachineInstanceReasonNotMigratable, Message: strings.Join(parts, ", "),
	}
}

func hasHostDevices(vmi *kubevirtv1.VirtualMachineInstance) bool {
	return len(vmi.Spec.Domain.Devices.HostDevices) > 0 || len(vmi.Spec.Domain.Devices.GPUs) > 0
}

func hasPersistentReservation(vmi *kubevirtv1.VirtualMachineInstance) bool {
	for _, d := range vmi.Spec.Domain.Devices.Disks {
		if d.LUN != nil && d.LUN.Reservation {
			return true
		}
	}
	return false
}

func hasHypervPassthrough(vmi *kubevirtv1.VirtualMachineInstance) bool {
	f := vmi.Spec.Domain.Features
	return f != nil && f.HypervPassthrough != nil && f.HypervPassthrough.Enabled != nil && *f.HypervPassthrough.Enabled
}

// checkInterfacesForMigration: the primary (pod network) interface must use
// masquerade or passt; bridge only with the allow annotation.
func checkInterfacesForMigration(vmi *kubevirtv1.VirtualMachineInstance) error {
	ifaces := vmi.Spec.Domain.Devices.Interfaces
	if len(ifaces) == 0 {
		return nil
	}
	var podNet *kubevirtv1.Network
	for i := range vmi.Spec.Networks {
		if vmi.Spec.Networks[i].Pod != nil {
			podNet = &vmi.Spec.Networks[i]
			break
		}
	}
	if podNet == nil {
		return nil
	}
	var primary *kubevirtv1.Interface
	for i := range ifaces {
		if ifaces[i].Name == podNet.Name {
			primary = &ifaces[i]
			break
		}
	}
	switch {
	case primary == nil:
		return fmt.Errorf("no primary interface found for network %s", podNet.Name)
	case primary.Masquerade != nil || primary.PasstBinding != nil:
		return nil
	case primary.Bridge != nil:
		if _, ok := vmi.Annotations[kubevirtv1.AllowPodBridgeNetworkLiveMigrationAnnotation]; ok {
			return nil
		}
	}
	return errors.New("cannot migrate VMI which does not use masquerade or a migratable plugin to connect to the pod network")
}

// checkVolumesForMigration: PVCs and DataVolumes must be ReadWriteMany (as
// virt-controller reports them in status.volumeStatus), host disks shared;
// other volumes (containerDisk, cloud-init, ...) are copied: block migration.
func checkVolumesForMigration(vmi *kubevirtv1.VirtualMachineInstance) (bool, error) {
	status := map[string]kubevirtv1.VolumeStatus{}
	for _, vs := range vmi.Status.VolumeStatus {
		status[vs.Name] = vs
	}
	block := len(vmi.Status.MigratedVolumes) > 0
	filesystems := map[string]bool{}
	for _, f := range vmi.Spec.Domain.Devices.Filesystems {
		filesystems[f.Name] = true
	}
	migrated := func(name string) bool {
		for _, v := range vmi.Status.MigratedVolumes {
			if v.VolumeName == name {
				return true
			}
		}
		return false
	}
	shared := func(modes []corev1.PersistentVolumeAccessMode) bool {
		for _, m := range modes {
			if m == corev1.ReadWriteMany {
				return true
			}
		}
		return false
	}
	for _, v := range vmi.Spec.Volumes {
		switch {
		case v.PersistentVolumeClaim != nil || v.DataVolume != nil:
			claim := ""
			if v.PersistentVolumeClaim != nil {
				claim = v.PersistentVolumeClaim.ClaimName
			} else {
				claim = v.DataVolume.Name
			}
			vs, ok := status[v.Name]
			if !ok || vs.PersistentVolumeClaimInfo == nil {
				return true, fmt.Errorf("cannot migrate VMI: Unable to determine if PVC %v is shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)", claim)
			}
			if !shared(vs.PersistentVolumeClaimInfo.AccessModes) && !migrated(vs.Name) {
				return true, fmt.Errorf("cannot migrate VMI: PVC %v is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)", claim)
			}
		case v.HostDisk != nil:
			if vs, ok := status[v.Name]; ok && vs.PersistentVolumeClaimInfo != nil {
				if !shared(vs.PersistentVolumeClaimInfo.AccessModes) && !migrated(vs.Name) {
					return true, fmt.Errorf("cannot migrate VMI: PVC %v is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)", vs.PersistentVolumeClaimInfo.ClaimName)
				}
				continue
			}
			if v.HostDisk.Shared == nil || !*v.HostDisk.Shared {
				return true, errors.New("cannot migrate VMI with non-shared HostDisk")
			}
		default:
			if filesystems[v.Name] {
				continue
			}
			readOnly := false
			for _, d := range vmi.Spec.Domain.Devices.Disks {
				if d.Name == v.Name && d.CDRom != nil && (d.CDRom.ReadOnly == nil || *d.CDRom.ReadOnly) {
					readOnly = true
				}
			}
			if !readOnly {
				block = true
			}
		}
	}
	return block, nil
}
