// Package e2e holds the end-to-end tests: KubeVirt's own drain behaviour and
// node-agent's, on a real etcd, kube-apiserver, virt-api and virt-controller, with
// the scheduler, kubelets and virt-handlers simulated (integration/sim). The tests
// share one cluster; each has a namespace and nodes of its own.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/node-agent/node-agent/integration/cluster"
	"github.com/node-agent/node-agent/integration/sim"
)

// env is what every test shares: the cluster, the simulators, the agent binary.
type env struct {
	cluster  *cluster.Cluster
	sim      *sim.Sim
	agentBin string
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
	c, err := cluster.Start(ctx, cluster.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	s, err := sim.Start(ctx, c.RESTConfig, sim.Options{Log: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		c.Stop(true)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: cluster, simulators and agent ready in %s\n", time.Since(start).Round(100*time.Millisecond))
	shared = &env{cluster: c, sim: s, agentBin: agentBin}
	code := m.Run()
	if code != 0 {
		c.DumpLogs(os.Stderr, 4000)
	}
	cancel()
	c.Stop(code != 0)
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
