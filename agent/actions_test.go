package agent

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The label on the migrations the agent creates is valid for every valid node name: a
// node name may have 253 characters, a label value 63.
func TestOwnMigrationLabelValue(t *testing.T) {
	long := strings.Repeat("rack-12.", 31) + "n1" // 250 characters, a valid node name
	for _, tt := range []struct {
		node     string
		wantName bool
	}{
		{"node-1", true},
		{"worker.example.com", true},
		{strings.Repeat("a", 63), true},
		{strings.Repeat("a", 64), false},
		{long, false},
	} {
		v := ownMigrationLabelValue(tt.node)
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			t.Errorf("node %q: label value %q is invalid: %v", tt.node, v, errs)
		}
		if (v == tt.node) != tt.wantName {
			t.Errorf("node %q: label value %q, want the name itself: %v", tt.node, v, tt.wantName)
		}
		if _, err := labels.Parse(ownMigrationSelector(tt.node)); err != nil {
			t.Errorf("node %q: selector %q: %v", tt.node, ownMigrationSelector(tt.node), err)
		}
	}
	if ownMigrationLabelValue(long) == ownMigrationLabelValue(long+"x") {
		t.Error("two long node names share a label value")
	}
}
