// Package monitoring checks manifests/monitoring: the alerting rules with promtool
// (Debian's prometheus package), their unit tests, and that every node_agent_* metric
// the rules and the Grafana dashboard use is one the agent exports.
package monitoring

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/node-agent/node-agent/agent"
)

func monitoringDir(t *testing.T) string {
	t.Helper()
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "manifests", "monitoring")
}

// rules extracts spec.groups of the PrometheusRule as a Prometheus rules file.
func rules(t *testing.T) []byte {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(monitoringDir(t), "prometheusrule.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var pr struct {
		Kind string `json:"kind"`
		Spec struct {
			Groups []any `json:"groups"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(raw, &pr); err != nil {
		t.Fatalf("prometheusrule.yaml: %v", err)
	}
	if pr.Kind != "PrometheusRule" || len(pr.Spec.Groups) == 0 {
		t.Fatalf("prometheusrule.yaml is not a PrometheusRule with groups")
	}
	out, err := yaml.Marshal(map[string]any{"groups": pr.Spec.Groups})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func promtool(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool is not installed (Debian package prometheus; hack/setup.sh installs it): %v", err)
	}
	return path
}

func TestAlertingRulesPassPromtool(t *testing.T) {
	dir := t.TempDir()
	rulesFile := filepath.Join(dir, "rules.yaml")
	if err := os.WriteFile(rulesFile, rules(t), 0o644); err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile(filepath.Join(monitoringDir(t), "alerts-test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	testsFile := filepath.Join(dir, "alerts-test.yaml")
	if err := os.WriteFile(testsFile, tests, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"check", "rules", rulesFile}, {"test", "rules", testsFile}} {
		out, err := exec.Command(promtool(t), args...).CombinedOutput()
		if err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args[:2], " "), err, out)
		}
	}
}

// TestEveryAlertHasAFiringCase fails when an alert of prometheusrule.yaml has no promtool
// case in alerts-test.yaml in which it fires: an alert nobody has seen fire may never fire.
func TestEveryAlertHasAFiringCase(t *testing.T) {
	var pr struct {
		Groups []struct {
			Rules []struct {
				Alert string `json:"alert"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := yaml.Unmarshal(rules(t), &pr); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(monitoringDir(t), "alerts-test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var cases struct {
		Tests []struct {
			AlertRuleTest []struct {
				AlertName string `json:"alertname"`
				ExpAlerts []any  `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(raw, &cases); err != nil {
		t.Fatalf("alerts-test.yaml: %v", err)
	}
	fires := map[string]bool{}
	for _, tc := range cases.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.AlertName] = true
			}
		}
	}
	n := 0
	for _, g := range pr.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			if !fires[r.Alert] {
				t.Errorf("alert %s has no case in alerts-test.yaml in which it fires", r.Alert)
			}
		}
	}
	if n == 0 {
		t.Fatal("prometheusrule.yaml has no alerts")
	}
}

var metricName = regexp.MustCompile(`\bnode_agent_[a-z_]+`)

// exported lists the metric families the agent exports, each series touched once.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	m := agent.NewMetrics("n1")
	m.RegisterInhibitor(func() (bool, bool, time.Duration) { return true, true, time.Minute })
	m.VMs.WithLabelValues("LiveMigrate", "migrating").Set(1)
	m.Requests.WithLabelValues("migrate", "evacuation").Inc()
	m.DrainsStarted.WithLabelValues("taint").Inc()
	m.DrainDuration.WithLabelValues("taint").Observe(1)
	m.ConfigErrors.WithLabelValues("config").Inc()
	m.ShutdownReleases.WithLabelValues("safe").Inc()
	m.ShutdownDelay.Observe(1)
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range families {
		names[f.GetName()] = true
		if f.GetType().String() == "HISTOGRAM" {
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				names[f.GetName()+s] = true
			}
		}
	}
	return names
}

func TestRulesAndDashboardUseExportedMetrics(t *testing.T) {
	names := exported(t)
	dashboard, err := os.ReadFile(filepath.Join(monitoringDir(t), "grafana-dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	for file, text := range map[string]string{"prometheusrule.yaml": string(rules(t)), "grafana-dashboard.json": string(dashboard)} {
		used := map[string]bool{}
		for _, name := range metricName.FindAllString(text, -1) {
			used[name] = true
		}
		if len(used) == 0 {
			t.Errorf("%s uses no node_agent_* metric", file)
		}
		var missing []string
		for name := range used {
			if !names[name] {
				missing = append(missing, name)
			}
		}
		sort.Strings(missing)
		if len(missing) > 0 {
			t.Errorf("%s uses metrics the agent does not export: %v", file, missing)
		}
	}
}
