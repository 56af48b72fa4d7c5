package nodeinfo

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"

	flowcontrolv1 "k8s.io/api/flowcontrol/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// levelServer answers every request with the priority level header it is set to, and
// lists the levels it holds; it counts the lists.
type levelServer struct {
	mu     sync.Mutex
	header string
	levels []flowcontrolv1.PriorityLevelConfiguration
	lists  int
	forbid bool // lists are refused, as by a ClusterRole without them
}

func (s *levelServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.header != "" {
		w.Header().Set(flowcontrolv1.ResponseHeaderMatchedPriorityLevelConfigurationUID, s.header)
	}
	w.Header().Set("Content-Type", "application/json")
	if r.URL.Path == "/apis/flowcontrol.apiserver.k8s.io/v1/prioritylevelconfigurations" {
		s.lists++
		if s.forbid {
			w.WriteHeader(http.StatusForbidden)
			_ = json.NewEncoder(w).Encode(metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
				Status: metav1.StatusFailure, Reason: metav1.StatusReasonForbidden, Code: http.StatusForbidden})
			return
		}
		_ = json.NewEncoder(w).Encode(flowcontrolv1.PriorityLevelConfigurationList{
			TypeMeta: metav1.TypeMeta{Kind: "PriorityLevelConfigurationList", APIVersion: "flowcontrol.apiserver.k8s.io/v1"},
			Items:    s.levels})
		return
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"kind": "Node", "apiVersion": "v1", "metadata": map[string]any{"name": "n"}})
}

func (s *levelServer) set(header string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.header = header
}

func newLevelClient(t *testing.T, srv *levelServer) (*PriorityLevel, kubernetes.Interface) {
	t.Helper()
	ts := httptest.NewServer(srv)
	t.Cleanup(ts.Close)
	p := NewPriorityLevel()
	cfg := &rest.Config{Host: ts.URL}
	cfg.Wrap(p.Wrap)
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	p.SetClient(kube.FlowcontrolV1().PriorityLevelConfigurations())
	return p, kube
}

func level(name, uid string) flowcontrolv1.PriorityLevelConfiguration {
	return flowcontrolv1.PriorityLevelConfiguration{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(uid)}}
}

// The level is the one the API server named in its last answer, by name; the levels are
// listed once per UID not met before, and a UID no level has is no level.
func TestPriorityLevelFollowsTheAnswers(t *testing.T) {
	srv := &levelServer{levels: []flowcontrolv1.PriorityLevelConfiguration{level("workload-low", "uid-low"), level(OwnPriorityLevel, "uid-own")}}
	p, kube := newLevelClient(t, srv)
	ctx := context.Background()
	name := func() string {
		t.Helper()
		n, err := p.Name(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	answer := func(header string) {
		t.Helper()
		srv.set(header)
		if _, err := kube.CoreV1().Nodes().Get(ctx, "n", metav1.GetOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if got := name(); got != "" {
		t.Errorf("before any answer: level %q, want none", got)
	}
	answer("") // API Priority and Fairness off, or an exempt request without the header
	if got := name(); got != "" {
		t.Errorf("after an answer without the header: level %q, want none", got)
	}
	for _, step := range []struct {
		header, want string
		lists        int
	}{
		{"uid-low", "workload-low", 1},
		{"uid-own", OwnPriorityLevel, 1}, // met in the first list
		{"", OwnPriorityLevel, 1},        // an answer without the header changes nothing
		{"uid-gone", "", 2},              // a level deleted since: listed again, none
		{"uid-gone", "", 2},              // not listed again for it
		{"uid-own", OwnPriorityLevel, 2},
	} {
		answer(step.header)
		if got := name(); got != step.want {
			t.Errorf("after an answer naming %q: level %q, want %q", step.header, got, step.want)
		}
		srv.mu.Lock()
		lists := srv.lists
		srv.mu.Unlock()
		if lists != step.lists {
			t.Errorf("after an answer naming %q: %d lists of the levels, want %d", step.header, lists, step.lists)
		}
	}
}

// Without the right to list the levels (a ClusterRole from before), the level is not
// known: the refusal is an error once, and the list is not tried again for that level.
func TestPriorityLevelRefused(t *testing.T) {
	srv := &levelServer{header: "uid-own", forbid: true, levels: []flowcontrolv1.PriorityLevelConfiguration{level(OwnPriorityLevel, "uid-own")}}
	p, kube := newLevelClient(t, srv)
	ctx := context.Background()
	if _, err := kube.CoreV1().Nodes().Get(ctx, "n", metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	}
	if name, err := p.Name(ctx); err == nil || name != "" {
		t.Errorf("first look: level %q, error %v; want none and the refusal", name, err)
	}
	if name, err := p.Name(ctx); err != nil || name != "" {
		t.Errorf("second look: level %q, error %v; want none and no error", name, err)
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if srv.lists != 1 {
		t.Errorf("%d lists of the levels, want 1", srv.lists)
	}
}
