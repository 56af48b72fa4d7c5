package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// env is a getenv over a map.
func env(vars map[string]string) func(string) string {
	return func(k string) string { return vars[k] }
}

func defaultArgs(node string) runArgs {
	return runArgs{
		NodeName:          node,
		KubeVirtNamespace: "kubevirt",
		ListenAddress:     ":8095",
		Resync:            5 * time.Second,
		MigrationStall:    5 * time.Minute,
		PodEvictionRetry:  5 * time.Second,
		QPS:               100,
		Burst:             300,
		LogFormat:         "text",
		LogLevel:          "info",
		ShutdownInhibitor: true,
		ShutdownTimeout:   10 * time.Minute,
		InhibitMode:       "delay",
		LogindDropInDir:   "/etc/systemd/logind.conf.d",
		Namespace:         "node-agent",
		MaxDrains:         1,
		MaxTurnWait:       5 * time.Minute,
	}
}

func TestParseRunArgs(t *testing.T) {
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, []byte("apiVersion: v1\nkind: Config\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	with := func(change func(*runArgs)) runArgs {
		a := defaultArgs("node-a")
		change(&a)
		return a
	}
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want runArgs
	}{
		{
			name: "defaults",
			args: []string{"--node-name", "node-a"},
			want: defaultArgs("node-a"),
		},
		{
			name: "NODE_NAME from the environment",
			env:  map[string]string{"NODE_NAME": "node-a"},
			want: defaultArgs("node-a"),
		},
		{
			name: "--node-name beats NODE_NAME",
			args: []string{"--node-name=node-a"},
			env:  map[string]string{"NODE_NAME": "node-z"},
			want: defaultArgs("node-a"),
		},
		{
			name: "every flag given",
			args: []string{
				"--node-name=node-a", "--kubeconfig", kubeconfig, "--drain-taint-key=example.com/drain",
				"--kubevirt-namespace=kv", "--all-pods", "--listen-address=127.0.0.1:9000", "--resync=1m",
				"--migration-stall-timeout=90s", "--pod-eviction-retry=2s", "--kube-api-qps=5", "--kube-api-burst=10", "--log-format=json", "--log-level=debug",
				"--namespace=agents", "--max-concurrent-drains=3", "--max-turn-wait=7m", "--profiling",
			},
			want: runArgs{
				Kubeconfig: kubeconfig, NodeName: "node-a", DrainTaintKey: "example.com/drain", KubeVirtNamespace: "kv",
				AllPods: true, ListenAddress: "127.0.0.1:9000", Resync: time.Minute, MigrationStall: 90 * time.Second, PodEvictionRetry: 2 * time.Second,
				QPS: 5, Burst: 10, LogFormat: "json", LogLevel: "debug",
				ShutdownInhibitor: true, ShutdownTimeout: 10 * time.Minute, InhibitMode: "delay", LogindDropInDir: "/etc/systemd/logind.conf.d",
				Namespace: "agents", MaxDrains: 3, MaxTurnWait: 7 * time.Minute, Profiling: true,
			},
		},
		{
			name: "NODE_AGENT_<FLAG> environment values",
			env: map[string]string{
				"NODE_NAME":                          "node-a",
				"NODE_AGENT_KUBECONFIG":              kubeconfig,
				"NODE_AGENT_DRAIN_TAINT_KEY":         "example.com/drain",
				"NODE_AGENT_KUBEVIRT_NAMESPACE":      "kv",
				"NODE_AGENT_ALL_PODS":                "true",
				"NODE_AGENT_LISTEN_ADDRESS":          "127.0.0.1:9000",
				"NODE_AGENT_RESYNC":                  "1m",
				"NODE_AGENT_MIGRATION_STALL_TIMEOUT": "90s",
				"NODE_AGENT_POD_EVICTION_RETRY":      "2s",
				"NODE_AGENT_KUBE_API_QPS":            "5",
				"NODE_AGENT_KUBE_API_BURST":          "10",
				"NODE_AGENT_LOG_FORMAT":              "json",
				"NODE_AGENT_LOG_LEVEL":               "debug",
				"NODE_AGENT_UNRELATED_IS_IGNORED":    "x",
				"NODE_AGENT_NAMESPACE":               "agents",
			},
			want: runArgs{
				Kubeconfig: kubeconfig, NodeName: "node-a", DrainTaintKey: "example.com/drain", KubeVirtNamespace: "kv",
				AllPods: true, ListenAddress: "127.0.0.1:9000", Resync: time.Minute, MigrationStall: 90 * time.Second, PodEvictionRetry: 2 * time.Second,
				QPS: 5, Burst: 10, LogFormat: "json", LogLevel: "debug",
				ShutdownInhibitor: true, ShutdownTimeout: 10 * time.Minute, InhibitMode: "delay", LogindDropInDir: "/etc/systemd/logind.conf.d",
				Namespace: "agents", MaxDrains: 1, MaxTurnWait: 5 * time.Minute,
			},
		},
		{
			name: "a flag given beats its environment value",
			args: []string{"--resync=3s", "--log-level=warn", "--all-pods=false", "--drain-taint-key=example.com/flag"},
			env: map[string]string{
				"NODE_NAME":                  "node-a",
				"NODE_AGENT_RESYNC":          "1m",
				"NODE_AGENT_LOG_LEVEL":       "debug",
				"NODE_AGENT_ALL_PODS":        "true",
				"NODE_AGENT_DRAIN_TAINT_KEY": "example.com/env",
			},
			want: with(func(a *runArgs) {
				a.Resync, a.LogLevel, a.DrainTaintKey = 3*time.Second, "warn", "example.com/flag"
			}),
		},
		{
			name: "NODE_AGENT_NODE_NAME is --node-name's variable; NODE_NAME is the fallback",
			env:  map[string]string{"NODE_AGENT_NODE_NAME": "node-a", "NODE_NAME": "node-z"},
			want: defaultArgs("node-a"),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			got, err := parseRunArgs(tt.args, env(tt.env), &out)
			if err != nil {
				t.Fatalf("parseRunArgs() error: %v", err)
			}
			if got != tt.want {
				t.Errorf("parseRunArgs() =\n%+v\nwant\n%+v", got, tt.want)
			}
			if out.Len() != 0 {
				t.Errorf("unexpected output: %s", out.String())
			}
		})
	}
}

func TestParseRunArgsErrors(t *testing.T) {
	node := []string{"--node-name=node-a"}
	args := func(extra ...string) []string { return append(append([]string{}, node...), extra...) }
	tests := []struct {
		name string
		args []string
		env  map[string]string
		// want are substrings of the error: each says what is wrong and what to fix.
		want []string
	}{
		{"missing node name", nil, nil, []string{"no node name", "set --node-name or NODE_NAME"}},
		{"invalid taint key", args("--drain-taint-key=not a key"), nil, []string{"--drain-taint-key", `invalid taint key "not a key"`}},
		{"invalid taint key from the environment", node, map[string]string{"NODE_AGENT_DRAIN_TAINT_KEY": "-bad"}, []string{"--drain-taint-key", `"-bad"`}},
		{"bad listen address", args("--listen-address=8095"), nil, []string{`--listen-address "8095"`, "want host:port, such as :8095"}},
		{"zero resync", args("--resync=0s"), nil, []string{"--resync 0s", "must be positive"}},
		{"negative resync", args("--resync=-1s"), nil, []string{"--resync -1s", "must be positive"}},
		{"zero migration-stall-timeout", args("--migration-stall-timeout=0s"), nil, []string{"--migration-stall-timeout 0s", "must be positive"}},
		{"zero pod-eviction-retry", args("--pod-eviction-retry=0"), nil, []string{"--pod-eviction-retry 0s", "must be positive"}},
		{"empty KubeVirt namespace", args("--kubevirt-namespace="), nil, []string{"--kubevirt-namespace must not be empty"}},
		{"zero QPS", args("--kube-api-qps=0"), nil, []string{"--kube-api-qps", "must be positive"}},
		{"zero burst", args("--kube-api-burst=0"), nil, []string{"--kube-api-burst", "must be positive"}},
		{"zero shutdown timeout", args("--shutdown-timeout=0s"), nil, []string{"--shutdown-timeout 0s", "must be positive"}},
		{"negative max-concurrent-drains", args("--max-concurrent-drains=-1"), nil, []string{"--max-concurrent-drains -1", "0 (no coordination) or more"}},
		{"zero max-turn-wait", args("--max-turn-wait=0s"), nil, []string{"--max-turn-wait 0s", "must be positive"}},
		{"a namespace that is no name", args("--namespace=Node_Agent"), nil, []string{`--namespace "Node_Agent"`, "not a namespace name"}},
		{"negative shutdown timeout from the environment", node, map[string]string{"NODE_AGENT_SHUTDOWN_TIMEOUT": "-5m"}, []string{"--shutdown-timeout -5m0s", "must be positive"}},
		{"unknown inhibit mode", args("--inhibit-mode=refuse"), nil, []string{`--inhibit-mode "refuse"`, "want delay or block"}},
		{"lock holder not a URL", args("--lock-holder=127.0.0.1:8096"), nil, []string{`--lock-holder "127.0.0.1:8096"`, "want a URL such as http://127.0.0.1:8096"}},
		{"bad log format", args("--log-format=xml"), nil, []string{`--log-format "xml"`, "want text or json"}},
		{"bad log level", args("--log-level=loud"), nil, []string{"--log-level", `"loud"`, "debug, info, warn or error"}},
		{"missing kubeconfig file", args("--kubeconfig=/nonexistent/kubeconfig"), nil, []string{"--kubeconfig", "/nonexistent/kubeconfig", "no such file"}},
		{"stray arguments", args("extra", "more"), nil, []string{`unexpected arguments ["extra" "more"]`, "takes only flags"}},
		{"bad environment value names the variable", node, map[string]string{"NODE_AGENT_RESYNC": "banana"}, []string{`NODE_AGENT_RESYNC="banana"`}},
		{"bad boolean in the environment", node, map[string]string{"NODE_AGENT_ALL_PODS": "perhaps"}, []string{`NODE_AGENT_ALL_PODS="perhaps"`}},
		{
			"several errors reported together",
			[]string{"--resync=0s", "--log-format=xml", "--listen-address=nope"},
			map[string]string{"NODE_AGENT_KUBE_API_BURST": "many"},
			[]string{"no node name", "--resync 0s", `--log-format "xml"`, `--listen-address "nope"`, "NODE_AGENT_KUBE_API_BURST"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseRunArgs(tt.args, env(tt.env), &bytes.Buffer{})
			if err == nil {
				t.Fatal("parseRunArgs() succeeded, want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestParseInhibitArgsErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		env  map[string]string
		want []string
	}{
		{"zero shutdown timeout", []string{"--shutdown-timeout=0s"}, nil, []string{"--shutdown-timeout 0s", "must be positive"}},
		{"unknown inhibit mode from the environment", nil, map[string]string{"NODE_AGENT_INHIBIT_MODE": "never"}, []string{`--inhibit-mode "never"`, "want delay or block"}},
		{"engine URL without a scheme", []string{"--engine-url=127.0.0.1:8095"}, nil, []string{`--engine-url "127.0.0.1:8095"`, "want a URL"}},
		{"bad listen address", []string{"--listen-address=8096"}, nil, []string{`--listen-address "8096"`, "want host:port"}},
		{"stray arguments", []string{"now"}, nil, []string{`unexpected arguments ["now"]`, "takes only flags"}},
		{
			"several errors reported together",
			[]string{"--shutdown-timeout=-1s", "--inhibit-mode=x", "--log-format=xml"},
			nil,
			[]string{"--shutdown-timeout -1s", `--inhibit-mode "x"`, `--log-format "xml"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseInhibitArgs(tt.args, env(tt.env), &bytes.Buffer{})
			if err == nil {
				t.Fatal("parseInhibitArgs() succeeded, want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestParseRunArgsBadFlag(t *testing.T) {
	var out bytes.Buffer
	_, err := parseRunArgs([]string{"--node-name=node-a", "--no-such-flag"}, env(nil), &out)
	if err == nil || !strings.Contains(err.Error(), "no-such-flag") {
		t.Fatalf("error %v, want one naming the unknown flag", err)
	}
	if !strings.Contains(out.String(), "-drain-taint-key") {
		t.Errorf("no usage printed for a bad flag:\n%s", out.String())
	}
}

func TestParseRunArgsHelp(t *testing.T) {
	var out bytes.Buffer
	_, err := parseRunArgs([]string{"-h"}, env(nil), &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("error %v, want flag.ErrHelp", err)
	}
	for _, f := range []string{"-node-name", "-drain-taint-key", "-listen-address", "-resync", "-pod-eviction-retry"} {
		if !strings.Contains(out.String(), f) {
			t.Errorf("help lacks %s:\n%s", f, out.String())
		}
	}
}

func TestRun(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		env        map[string]string
		want       int
		stdoutHas  string
		stderrHas  []string
		stderrNone bool
	}{
		{name: "no arguments: usage", args: nil, want: 2, stderrHas: []string{"Usage:", "node-agent run"}},
		{name: "unknown command", args: []string{"frobnicate"}, want: 2, stderrHas: []string{`unknown command "frobnicate"`, "Usage:"}},
		{name: "help", args: []string{"help"}, want: 0, stdoutHas: "Usage:", stderrNone: true},
		{name: "--help", args: []string{"--help"}, want: 0, stdoutHas: "Usage:", stderrNone: true},
		{name: "run -h", args: []string{"run", "-h"}, want: 0, stderrHas: []string{"-node-name"}},
		{name: "run with an unknown flag", args: []string{"run", "--node-name=node-a", "--bogus"}, want: 2, stderrHas: []string{"node-agent run:", "bogus"}},
		{name: "run with an invalid flag value", args: []string{"run", "--node-name=node-a", "--resync=0s"}, want: 2, stderrHas: []string{"node-agent run:", "--resync 0s: must be positive"}},
		{name: "run without a node name", args: []string{"run"}, want: 2, stderrHas: []string{"node-agent run:", "no node name"}},
		{name: "run with a bad environment value", args: []string{"run"}, env: map[string]string{"NODE_NAME": "node-a", "NODE_AGENT_LOG_FORMAT": "xml"}, want: 2, stderrHas: []string{`--log-format "xml"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var stdout, stderr bytes.Buffer
			if got := run(ctx, nil, tt.args, env(tt.env), &stdout, &stderr); got != tt.want {
				t.Errorf("run(%q) = %d, want %d; stderr:\n%s", tt.args, got, tt.want, stderr.String())
			}
			if !strings.Contains(stdout.String(), tt.stdoutHas) {
				t.Errorf("stdout %q lacks %q", stdout.String(), tt.stdoutHas)
			}
			for _, w := range tt.stderrHas {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr %q lacks %q", stderr.String(), w)
				}
			}
			if tt.stderrNone && stderr.Len() != 0 {
				t.Errorf("unexpected stderr: %s", stderr.String())
			}
		})
	}
}

// --profiling adds Go's profiles beside the agent's endpoints; without it they are not served.
func TestWithProfiling(t *testing.T) {
	agentMux := http.NewServeMux()
	agentMux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, "ok") })
	for _, on := range []bool{false, true} {
		srv := httptest.NewServer(withProfiling(agentMux, on))
		get := func(path string) int {
			resp, err := http.Get(srv.URL + path)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			return resp.StatusCode
		}
		if code := get("/healthz"); code != http.StatusOK {
			t.Errorf("profiling %v: /healthz answered %d, want 200", on, code)
		}
		want := http.StatusNotFound
		if on {
			want = http.StatusOK
		}
		if code := get("/debug/pprof/heap"); code != want {
			t.Errorf("profiling %v: /debug/pprof/heap answered %d, want %d", on, code, want)
		}
		srv.Close()
	}
}
