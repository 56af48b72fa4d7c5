// Package e2e holds the end-to-end tests: KubeVirt's own drain behaviour and
// node-agent's, on a real etcd, kube-apiserver, kube-scheduler,
// kube-controller-manager, virt-api and virt-controller, with the kubelets and
// virt-handlers simulated (integration/sim). The tests
// share one cluster; each has a namespace and nodes of its own.
//
// # Adding a scenario
//
// TestMain starts the cluster and the simulators once and builds the agent (with
// -race when the tests have it); framework_test.go holds the helpers. A test:
//
//   - calls newScenario(t, n): a namespace named after the test and n simulated
//     nodes labelled with the test's own pool (poolLabel). Every VM the scenario
//     creates (createVM, createVMI, createVMIRS) selects that pool, so no other
//     test's VM lands on its nodes and its VMs land nowhere else; onNode pins a
//     VM's first start to one node. newScenario calls t.Parallel: the scenarios
//     run side by side, NODE_AGENT_E2E_PARALLEL at once (scenarioSlots; go
//     test's -parallel must be at least as high), so a test must change nothing
//     another test sees. A test that changes what every test sees (the KubeVirt
//     CR's configuration, the legacy kubevirt-config ConfigMap, the deployed
//     manifests' cluster-scoped objects) starts with newClusterWideScenario
//     instead: such tests run one at a time on a second cluster configured as
//     the shared one, beside the others, and each puts back what it changed in
//     t.Cleanup, as setClusterEvictionStrategy does. The helpers that change the
//     cluster (setDrainTaintKey, setClusterEvictionStrategy, legacyConfigMap,
//     applyManifests) fail a test on the shared cluster that calls them. Objects a test
//     creates outside its namespace (a ClusterRoleBinding, an admission policy)
//     carry its namespace in their name and match only its own nodes or pods.
//   - runs agents with sc.startAgent(node, flags...) and waits on conditions
//     with a deadline (sc.eventually, a.waitSafe, sc.waitVMIOn, the sim's
//     WaitFor* helpers), never a sleep.
//   - cleans up through t.Cleanup only: the agents it started are stopped and
//     the namespace's migrations, VMs, VMIRSs and VMIs deleted when it ends (an
//     unfinished migration would count against KubeVirt's cluster-wide limit in
//     the tests after it). Its namespace and nodes stay, out of every other
//     test's way by their pool.
//
// A test that needs the cluster configured otherwise (the KubeVirt CR's feature
// gates or migration limits, no eviction webhook, no subresource API) starts a
// cluster of its own with newPrivateEnv(t, cluster.Options{...}) and
// newScenarioIn(t, e, n). It costs a cluster start (15-50 s) and the README's
// table lists it; share the cluster whenever a namespace and nodes of the test's
// own are enough. When the test ends its cluster's virt-api and virt-controller
// logs are checked as the shared cluster's are (stopPrivateCluster).
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/utils/ptr"
	kubevirtv1 "kubevirt.io/api/core/v1"

	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
)

// sharedClusterOptions configure the shared cluster as KubeVirt installs it, except
// for one limit: the scenarios run in parallel, each on nodes of its own, so the
// cluster-wide limit of parallel migrations (KubeVirt's default 5) is raised to 20,
// as an operator of a larger cluster would, lest one test's migrations wait on
// another's. The per-node limit (parallelOutboundMigrationsPerNode, 2) is KubeVirt's.
var sharedClusterOptions = cluster.Options{KubeVirtConfiguration: kubevirtv1.KubeVirtConfiguration{
	MigrationConfiguration: &kubevirtv1.MigrationConfiguration{ParallelMigrationsPerCluster: ptr.To[uint32](20)},
}}

// env is what every test shares: the cluster, the simulators, the agent binary.
type env struct {
	cluster  *cluster.Cluster
	sim      *sim.Sim
	agentBin string
	// faulted: the test breaks this (private) cluster on purpose, and its log check
	// also passes KubeVirt's reports of the part that did not answer (faultErrors).
	faulted bool
	// containerTier: the container tier's tests take turns (oneContainerTestAtATime).
	containerTier sync.Mutex
	// ctx ends with the cluster: it bounds retireNodes.
	ctx context.Context
	// retired and kept count the finished scenarios' nodes that retireNodes removed
	// from the cluster, and those still busy when it gave up.
	retired, kept atomic.Int64
}

var shared *env // set once by TestMain, read-only afterwards

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	binDir, err := os.MkdirTemp("", "node-agent-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(binDir)
	agentBin, err := buildAgent(ctx, binDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if slots, err = newScenarioSlots(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if shared, err = startEnv(ctx, sharedClusterOptions, agentBin); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: cluster, simulators and agent ready in %s\n", time.Since(start).Round(100*time.Millisecond))
	wideCluster = &lazyEnv{ctx: ctx, opts: sharedClusterOptions}
	code := m.Run()
	envs := map[string]*env{"shared": shared}
	if wideCluster.env != nil {
		envs["cluster-wide tests'"] = wideCluster.env
	}
	for name, e := range envs {
		if !e.check(name, code != 0) {
			code = 1
		}
	}
	cancel() // the simulators first
	for _, e := range envs {
		e.cluster.Stop(code != 0)
	}
	return code
}

// buildAgent builds the node-agent binary the tests run, with the race detector when
// the tests have it.
func buildAgent(ctx context.Context, dir string) (string, error) {
	out := filepath.Join(dir, "node-agent")
	args := []string{"build", "-o", out}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "github.com/node-agent/node-agent/cmd/node-agent")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building node-agent: %w", err)
	}
	return out, nil
}
