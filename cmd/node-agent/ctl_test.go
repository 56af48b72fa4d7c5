package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// The workstation commands' usage, help and exit statuses, without a cluster.
func TestCtlUsage(t *testing.T) {
	tests := []struct {
		name      string
		args      []string
		want      int
		stdoutHas []string
		stderrHas []string
	}{
		{name: "no node", args: []string{"drain"}, want: exitUsage, stderrHas: []string{"node-agent drain: which node?", "See 'node-agent drain --help' for usage."}},
		{name: "two nodes", args: []string{"undrain", "a", "b"}, want: exitUsage, stderrHas: []string{"one node at a time"}},
		{name: "unknown output", args: []string{"status", "x", "-o", "yaml"}, want: exitUsage, stderrHas: []string{`-o "yaml": want text or json`}},
		{name: "unknown flag", args: []string{"drain", "x", "--bogus"}, want: exitUsage, stderrHas: []string{"unknown flag: --bogus"}},
		{name: "zero stall timeout", args: []string{"status", "x", "--migration-stall-timeout=0s"}, want: exitUsage, stderrHas: []string{"--migration-stall-timeout 0s: must be positive"}},
		{name: "invalid taint key", args: []string{"drain", "x", "--drain-taint-key=not a key!"}, want: exitUsage, stderrHas: []string{"--drain-taint-key: invalid taint key"}},
		{name: "a kubeconfig that is not there", args: []string{"status", "x", "--kubeconfig=/nonexistent/kubeconfig"}, want: exitFailed, stderrHas: []string{"node-agent status:", "/nonexistent/kubeconfig"}},
		{name: "help in kubectl's layout", args: []string{"drain", "--help"}, want: exitOK, stdoutHas: []string{
			"Examples:\n", "Options:\n", "    --timeout=30m0s:\n", "Usage:\n  node-agent drain NODE [options]",
			`Use "node-agent options" for a list of global command-line options`,
		}},
		{name: "the deprecated --interval is no option any more", args: []string{"drain", "-h"}, want: exitOK},
		{name: "options: kubectl's connection flags", args: []string{"options"}, want: exitOK, stdoutHas: []string{
			"--kubeconfig=''", "--context=''", "--cluster=''", "--user=''", "--server=''", "--token=''", "--as=''",
			"--request-timeout='0'", "--kubevirt-namespace='kubevirt'", "--drain-taint-key=''",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if got := run(context.Background(), nil, tt.args, func(string) string { return "" }, &stdout, &stderr); got != tt.want {
				t.Errorf("run(%q) = %d, want %d\nstdout:\n%s\nstderr:\n%s", tt.args, got, tt.want, stdout.String(), stderr.String())
			}
			for _, w := range tt.stdoutHas {
				if !strings.Contains(stdout.String(), w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout.String())
				}
			}
			for _, w := range tt.stderrHas {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr.String())
				}
			}
			if strings.Contains(stdout.String(), "--interval") {
				t.Errorf("the help shows the deprecated --interval:\n%s", stdout.String())
			}
		})
	}
}
