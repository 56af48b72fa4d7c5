package cluster

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// kubevirtRBAC are the service accounts, roles and bindings virt-operator creates for
// virt-api, virt-controller and virt-handler, as the pinned KubeVirt generates them
// (pkg/virt-operator/resource/generate/rbac: apiserver.go, controller.go, handler.go),
// printed by integration/build/kubevirt/cmd/kubevirt-manifests.
type kubevirtRBAC struct {
	ServiceAccounts     []*corev1.ServiceAccount     `json:"serviceAccounts"`
	ClusterRoles        []*rbacv1.ClusterRole        `json:"clusterRoles"`
	ClusterRoleBindings []*rbacv1.ClusterRoleBinding `json:"clusterRoleBindings"`
	Roles               []*rbacv1.Role               `json:"roles"`
	RoleBindings        []*rbacv1.RoleBinding        `json:"roleBindings"`
}

// createKubeVirtRBAC creates KubeVirt's service accounts, roles and bindings as
// generated: virt-api and virt-controller run with these rights only (see
// serviceAccountKubeconfig), as in a real install.
func (c *Cluster) createKubeVirtRBAC(ctx context.Context, r kubevirtRBAC) error {
	if len(r.ClusterRoles) == 0 || len(r.ClusterRoleBindings) == 0 {
		return fmt.Errorf("KubeVirt's generated manifests have no ClusterRoles or bindings")
	}
	for _, sa := range r.ServiceAccounts {
		if _, err := c.Kube.CoreV1().ServiceAccounts(sa.Namespace).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating KubeVirt's service account %s: %w", sa.Name, err)
		}
	}
	rbac := c.Kube.RbacV1()
	for _, o := range r.ClusterRoles {
		if _, err := rbac.ClusterRoles().Create(ctx, o, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating KubeVirt's ClusterRole %s: %w", o.Name, err)
		}
	}
	for _, o := range r.ClusterRoleBindings {
		if _, err := rbac.ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating KubeVirt's ClusterRoleBinding %s: %w", o.Name, err)
		}
	}
	for _, o := range r.Roles {
		if _, err := rbac.Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating KubeVirt's Role %s/%s: %w", o.Namespace, o.Name, err)
		}
	}
	for _, o := range r.RoleBindings {
		if _, err := rbac.RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating KubeVirt's RoleBinding %s/%s: %w", o.Namespace, o.Name, err)
		}
	}
	return nil
}
