package agent

import (
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// expectationTTL bounds how long an action is taken as done while the cache does not
// show it: after that the VM is acted on again (its eviction was lost, say).
const expectationTTL = 30 * time.Second

// expectations remember, per VM, an action taken and not yet seen in the informer's
// cache (the VMI marked for evacuation, the pod terminating), as client-go
// controllers do, so that a look at the node that comes before the cache has caught
// up does not send the same eviction twice. Memory only: a restarted agent lists the
// cluster afresh, and the cluster is the truth.
type expectations struct {
	mu sync.Mutex
	m  map[string]expectation
}

type expectation struct {
	pod types.UID // the virt-launcher pod acted on
	o   outcome
	at  time.Time
}

func (x *expectations) expect(v *vm, o outcome, now time.Time) {
	pod := v.sourcePod()
	if pod == nil {
		return
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.m == nil {
		x.m = map[string]expectation{}
	}
	x.m[v.key] = expectation{pod: pod.UID, o: o, at: now}
}

// awaiting says whether the VM was acted on (on the same pod, recently) and the
// cache does not show it yet; it returns what acting on it left it as.
func (x *expectations) awaiting(v *vm, now time.Time) (outcome, bool) {
	pod := v.sourcePod()
	x.mu.Lock()
	defer x.mu.Unlock()
	exp, ok := x.m[v.key]
	if !ok {
		return outcome{}, false
	}
	if pod == nil || pod.UID != exp.pod || now.Sub(exp.at) > expectationTTL {
		delete(x.m, v.key)
		return outcome{}, false
	}
	return exp.o, true
}

// seen drops the expectation: the cache shows the VM moving.
func (x *expectations) seen(key string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.m, key)
}

// keep drops the expectations of VMs that are no longer on the node.
func (x *expectations) keep(present map[string]bool) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for key := range x.m {
		if !present[key] {
			delete(x.m, key)
		}
	}
}

func (x *expectations) reset() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.m = nil
}
