// Command inspect prints the VMs, VMIs, pods and nodes of a namespace of a test
// cluster: a debugging aid for a failing end-to-end test.
//
//	go run ./hack/inspect KUBECONFIG NAMESPACE
package main

import (
	"context"
	"fmt"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/nodeinfo"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: inspect KUBECONFIG NAMESPACE")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "inspect:", err)
		os.Exit(1)
	}
}

func run(kubeconfig, ns string) error {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	kv, err := nodeinfo.NewKubeVirtClient(cfg)
	if err != nil {
		return err
	}
	ctx := context.Background()
	vms := &kubevirtv1.VirtualMachineList{}
	if err := kv.Get().Namespace(ns).Resource(nodeinfo.ResourceVMs).Do(ctx).Into(vms); err != nil {
		return err
	}
	for _, v := range vms.Items {
		fmt.Printf("VM   %s status=%s ready=%v\n", v.Name, v.Status.PrintableStatus, v.Status.Ready)
	}
	vmis := &kubevirtv1.VirtualMachineInstanceList{}
	if err := kv.Get().Namespace(ns).Resource(nodeinfo.ResourceVMIs).Do(ctx).Into(vmis); err != nil {
		return err
	}
	for _, v := range vmis.Items {
		fmt.Printf("VMI  %s uid=%s phase=%s node=%s evac=%q deleting=%v finalizers=%v conds=%d\n", v.Name, v.UID, v.Status.Phase,
			v.Status.NodeName, v.Status.EvacuationNodeName, v.DeletionTimestamp != nil, v.Finalizers, len(v.Status.Conditions))
	}
	ms := &kubevirtv1.VirtualMachineInstanceMigrationList{}
	if err := kv.Get().Namespace(ns).Resource(nodeinfo.ResourceMigrations).Do(ctx).Into(ms); err != nil {
		return err
	}
	for _, m := range ms.Items {
		fmt.Printf("VMIM %s vmi=%s phase=%s\n", m.Name, m.Spec.VMIName, m.Status.Phase)
	}
	pods, err := kube.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, p := range pods.Items {
		fmt.Printf("POD  %s phase=%s node=%s deleting=%v\n", p.Name, p.Status.Phase, p.Spec.NodeName, p.DeletionTimestamp != nil)
	}
	nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, n := range nodes.Items {
		fmt.Printf("NODE %s unschedulable=%v taints=%v annotations=%v\n", n.Name, n.Spec.Unschedulable, n.Spec.Taints, n.Annotations)
	}
	return nil
}
