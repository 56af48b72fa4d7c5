package nodeinfo

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"

	flowcontrolv1 "k8s.io/api/flowcontrol/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	flowcontrolclient "k8s.io/client-go/kubernetes/typed/flowcontrol/v1"
)

// OwnPriorityLevel is the API Priority and Fairness level that manifests/base gives the
// agent's requests (a PriorityLevelConfiguration and a FlowSchema, both "node-agent").
const OwnPriorityLevel = "node-agent"

// PriorityLevel finds out which API Priority and Fairness level the API server puts the
// agent's requests in. The API server names it in every response, by UID
// (X-Kubernetes-PF-PriorityLevel-UID); Wrap records the last one seen, and Name turns it
// into the level's name, listing the PriorityLevelConfigurations once per UID it has not
// met before (a handful of objects; a refused list is not tried again for that UID).
type PriorityLevel struct {
	seen atomic.Pointer[string] // the UID in the last response that had one

	mu     sync.Mutex
	levels flowcontrolclient.PriorityLevelConfigurationInterface
	names  map[types.UID]string // "" for a UID the list did not hold
}

// NewPriorityLevel returns a PriorityLevel that knows no level yet: install Wrap on the
// clients' rest.Config, then SetClient.
func NewPriorityLevel() *PriorityLevel {
	return &PriorityLevel{names: map[types.UID]string{}}
}

// SetClient gives it the client that lists the PriorityLevelConfigurations.
func (p *PriorityLevel) SetClient(levels flowcontrolclient.PriorityLevelConfigurationInterface) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.levels = levels
}

// Wrap is a rest.Config's WrapTransport: it records the priority level of each response.
func (p *PriorityLevel) Wrap(rt http.RoundTripper) http.RoundTripper {
	return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
		resp, err := rt.RoundTrip(req)
		if resp != nil {
			if uid := resp.Header.Get(flowcontrolv1.ResponseHeaderMatchedPriorityLevelConfigurationUID); uid != "" {
				if last := p.seen.Load(); last == nil || *last != uid {
					p.seen.Store(&uid)
				}
			}
		}
		return resp, err
	})
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(req *http.Request) (*http.Response, error) { return f(req) }

// Name is the name of the level the API server put the agent's last request in; ""
// while no response named one (API Priority and Fairness off, or no answer yet), or when
// no PriorityLevelConfiguration has that UID.
func (p *PriorityLevel) Name(ctx context.Context) (string, error) {
	seen := p.seen.Load()
	if seen == nil {
		return "", nil
	}
	uid := types.UID(*seen)
	p.mu.Lock()
	defer p.mu.Unlock()
	if name, ok := p.names[uid]; ok {
		return name, nil
	}
	if p.levels == nil {
		return "", nil
	}
	list, err := p.levels.List(ctx, metav1.ListOptions{})
	if apierrors.IsForbidden(err) {
		// A ClusterRole from before the agent read levels: said once, not asked again
		// for this level.
		p.names[uid] = ""
	}
	if err != nil {
		return "", fmt.Errorf("listing the API server's priority levels: %w", err)
	}
	p.names[uid] = ""
	for _, l := range list.Items {
		p.names[l.UID] = l.Name
	}
	return p.names[uid], nil
}
