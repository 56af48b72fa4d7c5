package cluster

import "testing"

func TestIsErrorLine(t *testing.T) {
	for _, tc := range []struct {
		line string
		want bool
	}{
		{`{"component":"virt-controller","level":"error","msg":"failed","pos":"x.go:1"}`, true},
		{`{"component":"virt-api","level":"fatal","msg":"dead"}`, true},
		{`{"component":"virt-controller","level":"info","msg":"reenqueuing VirtualMachineInstance a/b","reason":"level error"}`, false},
		{`{"component":"virt-controller","level":"warning","msg":"slow"}`, false},
		{`E1129 20:33:20.301755   28639 util.go:66] "Unhandled Error" err="conflict"`, true},
		{`F1129 20:33:20.301755   28639 main.go:1] "fatal"`, true},
		{`I1129 20:33:11.246857   28639 shared_informer.go:682] "Warning: resync period"`, false},
		{`panic: runtime error: invalid memory address`, true},
		{`Error: not a klog header`, false},
	} {
		if got := isErrorLine(tc.line); got != tc.want {
			t.Errorf("isErrorLine(%q) = %t, want %t", tc.line, got, tc.want)
		}
	}
}
