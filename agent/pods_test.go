package agent

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kubevirtv1 "kubevirt.io/api/core/v1"
)

func TestHotplugOwner(t *testing.T) {
	pod := func(app string, refs ...metav1.OwnerReference) *corev1.Pod {
		p := &corev1.Pod{}
		p.Labels = map[string]string{kubevirtv1.AppLabel: app}
		p.OwnerReferences = refs
		return p
	}
	launcher := metav1.OwnerReference{APIVersion: "v1", Kind: "Pod", Name: "virt-launcher-vm-abcde"}
	rs := metav1.OwnerReference{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web"}
	for _, tt := range []struct {
		name string
		pod  *corev1.Pod
		want string
	}{
		{"a hotplug attachment pod: its virt-launcher pod", pod(hotplugDiskLabel, launcher), launcher.Name},
		{"a hotplug pod without a pod owner", pod(hotplugDiskLabel, rs), ""},
		{"another pod owned by a pod", pod("other", launcher), ""},
		{"a plain pod", pod(""), ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := hotplugOwner(tt.pod); got != tt.want {
				t.Errorf("hotplugOwner() = %q, want %q", got, tt.want)
			}
		})
	}
}
