package e2e

// How the scenarios share the machine: how many run at once (scenarioSlots), which
// start first (startFirst), and the second shared cluster where the tests that change
// a cluster's configuration take turns beside the others (wideEnv).

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
)

// parallelEnv names the number of scenarios that run at once (default
// defaultParallel). go test's own -parallel must be at least as high: hack/test.sh
// sets it far higher, so that a test waiting for its turn on the cluster-wide cluster
// or the container tier holds no slot.
const (
	parallelEnv     = "NODE_AGENT_E2E_PARALLEL"
	defaultParallel = 3
)

// startFirst are the tests that take a minute or more (hack/testreport prints the ten
// slowest of each run), most of it waiting on KubeVirt's backoffs, a fault's recovery
// or a container's boot: they get a slot before the others, so that a run does not
// end on one of them started last.
var startFirst = map[string]bool{
	"TestDrainRefusedEvictionsBackOff":    true,
	"TestNoEvictionWebhook":               true,
	"TestFaultEtcdPausedMidDrain":         true,
	"TestFaultAPIServerRestartedMidDrain": true,
	"TestFaultKubeVirtRestartedMidDrain":  true,
	"TestRandomHistory":                   true,
	"TestDrainAllPodsNeverSpins":          true,
	"TestShutdownHeldAcrossEngineKills":   true,
	"TestDrainMigrationStatusRequests":    true,
	"TestDrainRollingMaintenance":         true,
	"TestAgentWithoutKubeVirtCRDs":        true,
}

// scenarioSlots limits how many tests run a scenario or a cluster of their own at
// once. A test holds one slot from its first scenario to its end, its subtests
// included (held counts per top-level test). The tests that take turns among
// themselves (the cluster-wide tests, the container tier) are lanes of their own,
// each one test at a time beside the slots: a test that holds its lane's turn never
// waits for a slot behind the others (laned).
type scenarioSlots struct {
	mu           sync.Mutex
	cond         *sync.Cond
	free         int
	held         map[string]int
	laned        map[string]bool
	firstWaiting int
}

func newScenarioSlots() (*scenarioSlots, error) {
	n := defaultParallel
	if v := os.Getenv(parallelEnv); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			return nil, fmt.Errorf("%s=%q: want a number of scenarios, 1 or more", parallelEnv, v)
		}
	}
	s := &scenarioSlots{free: n, held: map[string]int{}, laned: map[string]bool{}}
	s.cond = sync.NewCond(&s.mu)
	return s, nil
}

// turnMarker starts the line a test logs when it gets its turn: hack/testreport times
// the test from there (its elapsed time counts the waiting too).
const turnMarker = "e2e: its turn after "

// lane marks t's top-level test as holding its lane's turn (since waiting began at
// asked): it takes no slot.
func (s *scenarioSlots) lane(t testing.TB, asked time.Time) {
	top, _, _ := strings.Cut(t.Name(), "/")
	t.Logf("%s%s", turnMarker, time.Since(asked).Round(100*time.Millisecond))
	s.mu.Lock()
	s.laned[top] = true
	s.mu.Unlock()
	t.Cleanup(func() {
		s.mu.Lock()
		delete(s.laned, top)
		s.mu.Unlock()
	})
}

// take waits for a slot for t's top-level test, unless it holds one or its lane's
// turn, and gives it back when t ends.
func (s *scenarioSlots) take(t testing.TB) {
	t.Helper()
	top, _, _ := strings.Cut(t.Name(), "/")
	first := startFirst[top]
	asked := time.Now()
	s.mu.Lock()
	if s.laned[top] {
		s.mu.Unlock()
		return
	}
	if s.held[top] == 0 {
		defer func() { t.Logf("%s%s", turnMarker, time.Since(asked).Round(100*time.Millisecond)) }()
		if first {
			s.firstWaiting++
		}
		for s.free == 0 || (!first && s.firstWaiting > 0) {
			s.cond.Wait()
		}
		if first {
			s.firstWaiting--
		}
		s.free--
	}
	s.held[top]++
	s.mu.Unlock()
	t.Cleanup(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.held[top]--; s.held[top] == 0 {
			delete(s.held, top)
			s.free++
			s.cond.Broadcast()
		}
	})
}

// lazyEnv is a shared cluster started by the first test that asks for it.
type lazyEnv struct {
	ctx  context.Context
	opts cluster.Options
	once sync.Once
	env  *env
	err  error
	// turn: the cluster-wide tests take turns on it.
	turn sync.Mutex
}

// get starts the cluster the first time.
func (l *lazyEnv) get(agentBin string) (*env, error) {
	l.once.Do(func() { l.env, l.err = startEnv(l.ctx, l.opts, agentBin) })
	return l.env, l.err
}

// startEnv starts a cluster and its simulators.
func startEnv(ctx context.Context, opts cluster.Options, agentBin string) (*env, error) {
	c, err := cluster.Start(ctx, opts)
	if err != nil {
		return nil, err
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	s, err := sim.Start(ctx, c.RESTConfig, sim.Options{Log: log})
	if err != nil {
		c.Stop(true)
		return nil, err
	}
	return &env{cluster: c, sim: s, agentBin: agentBin, ctx: ctx}, nil
}

// check checks the cluster's logs when the tests are done and says how it went,
// with the logs' tails if a test or the check failed; false if the check failed.
func (e *env) check(name string, failed bool) bool {
	fmt.Fprintf(os.Stderr, "e2e: %d nodes of finished tests removed from the %s cluster, %d kept (still busy)\n",
		e.retired.Load(), name, e.kept.Load())
	ok := true
	if err := checkControlPlaneLogs(e.cluster); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: the %s cluster: %v\n", name, err)
		ok = false
	}
	if failed || !ok {
		e.cluster.DumpLogs(os.Stderr, 4000)
	}
	return ok
}

// wideCluster is the cluster the tests that change a cluster's configuration run on,
// one at a time, beside the parallel scenarios on the shared cluster (see
// newClusterWideScenario); started by the first of them. slots is shared by both
// clusters. Both are set once by TestMain, read-only afterwards.
var (
	wideCluster *lazyEnv
	slots       *scenarioSlots
)

// wideEnv returns the cluster-wide tests' cluster, started if need be (about as long
// as the shared cluster's start).
func wideEnv(t testing.TB) *env {
	t.Helper()
	start := time.Now()
	e, err := wideCluster.get(shared.agentBin)
	if err != nil {
		t.Fatalf("starting the cluster of the cluster-wide tests: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Logf("the cluster of the cluster-wide tests up in %s", d.Round(100*time.Millisecond))
	}
	return e
}
