package drainctl

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/agent"
)

// evictionServer answers the two requests `drain --all-pods` makes: the node's pods
// (the list kubectl's drain filters read) and their evictions, which it refuses with a
// budget's 429 and a Retry-After (as a PodDisruptionBudget does) until allow is set.
// What is under test is the client side of the HTTP exchange (how often the eviction
// is posted: client-go retries a 429 with Retry-After unless told not to), which a
// fake clientset cannot show; the e2e tests run the same path on a real API server.
type evictionServer struct {
	pods []corev1.Pod

	mu     sync.Mutex
	allow  bool
	posted map[string]int // evictions posted, by pod name
}

func (s *evictionServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/api/v1/pods":
		_ = json.NewEncoder(w).Encode(&corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, Items: s.pods})
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/eviction"):
		parts := strings.Split(r.URL.Path, "/")
		s.mu.Lock()
		s.posted[parts[len(parts)-2]]++
		allow := s.allow
		s.mu.Unlock()
		if allow {
			_ = json.NewEncoder(w).Encode(&metav1.Status{Status: metav1.StatusSuccess})
			return
		}
		w.Header().Set("Retry-After", "1")
		w.WriteHeader(http.StatusTooManyRequests)
		_ = json.NewEncoder(w).Encode(&metav1.Status{
			TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: metav1.StatusFailure,
			Reason: metav1.StatusReasonTooManyRequests, Code: http.StatusTooManyRequests,
			Message: "Cannot evict pod as it would violate the pod's disruption budget.",
		})
	default:
		http.NotFound(w, r)
	}
}

func (s *evictionServer) count(pod string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.posted[pod]
}

// `drain --all-pods` evicts the other pods by the agent's rule: one request per pod
// and backoff (a budget's 429 is not retried by the client), the refusal reported once,
// the pod asked again once its backoff has passed, and a hotplug pod of a VM still on
// the node left alone.
func TestOtherPodsEvictOncePerBackoff(t *testing.T) {
	pod := func(name string, mutate ...func(*corev1.Pod)) corev1.Pod {
		p := corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "app", Name: name, UID: types.UID("uid-" + name)}}
		p.Spec.NodeName, p.Status.Phase = thisNode, corev1.PodRunning
		for _, m := range mutate {
			m(&p)
		}
		return p
	}
	launcher := pod("virt-launcher-vm-abcde", func(p *corev1.Pod) {
		p.Labels = map[string]string{kubevirtv1.AppLabel: "virt-launcher"}
	})
	hotplug := pod("hp-volume-xyz", func(p *corev1.Pod) {
		p.Labels = map[string]string{kubevirtv1.AppLabel: "hotplug-disk"}
		p.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Pod", Name: launcher.Name, UID: launcher.UID}}
	})
	srv := &evictionServer{pods: []corev1.Pod{pod("web"), hotplug}, posted: map[string]int{}}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	kube, err := kubernetes.NewForConfig(&rest.Config{Host: ts.URL})
	if err != nil {
		t.Fatal(err)
	}
	var errOut bytes.Buffer
	log := logrus.New()
	log.SetOutput(&errOut)
	log.SetLevel(logrus.WarnLevel)
	clk := clocktesting.NewFakeClock(time.Now())
	p := (&Client{Kube: kube}).otherPods(thisNode, clk, log)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	launchers := []*corev1.Pod{&launcher}

	if left := p.evict(ctx, launchers); left != 1 {
		t.Errorf("first pass: %d pods left, want 1 (web; the hotplug pod of a VM on the node stays)", left)
	}
	// One request: client-go did not retry the 429 after its Retry-After (1 s) itself
	// (a wall-clock bound here failed on a loaded machine and proved no more).
	if n := srv.count("web"); n != 1 {
		t.Errorf("after the first pass: %d evictions of web posted, want 1 (no client-side retry of a 429)", n)
	}
	if n := srv.count(hotplug.Name); n != 0 {
		t.Errorf("the hotplug pod of a VM on the node was evicted %d times", n)
	}

	p.evict(ctx, launchers)
	if n := srv.count("web"); n != 1 {
		t.Errorf("a pass within the backoff posted again: %d evictions, want 1", n)
	}
	clk.Step(agent.DefaultPodEvictionRetry + time.Second)
	p.evict(ctx, launchers)
	if n := srv.count("web"); n != 2 {
		t.Errorf("a pass after the backoff: %d evictions of web posted, want 2", n)
	}
	if got := strings.Count(errOut.String(), "pod eviction refused"); got != 1 {
		t.Errorf("the refusal was reported %d times, want once:\n%s", got, errOut.String())
	}

	srv.mu.Lock()
	srv.allow = true
	srv.mu.Unlock()
	clk.Step(2*agent.DefaultPodEvictionRetry + time.Second)
	p.evict(ctx, launchers)
	if n := srv.count("web"); n != 3 {
		t.Errorf("once allowed: %d evictions of web posted, want 3", n)
	}
}
