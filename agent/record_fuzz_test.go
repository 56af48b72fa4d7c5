package agent

import (
	"encoding/json"
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// nodeWith is this node with the given annotations and boot ID.
func nodeWith(bootID string, annotations map[string]string) *corev1.Node {
	n := &corev1.Node{}
	n.Name = thisNode
	n.Annotations = annotations
	n.Status.NodeInfo.BootID = bootID
	return n
}

// checkRecord reads raw as the annotation key into a new value of into's type, as the
// agent reads it back from its Node. Properties: an error leaves the value untouched
// (the agent goes on with the zero value, never with half a record); a record that
// reads writes back (the agent rewrites what it read), and what it writes reads as the
// same record: written again, the same bytes (nothing lost in a write-read round).
func checkRecord(t *testing.T, key, raw string, into any) {
	t.Helper()
	zero := reflect.New(reflect.TypeOf(into).Elem()).Interface()
	ok, err := readAnnotation(nodeWith("", map[string]string{key: raw}), key, into)
	if err != nil {
		if ok {
			t.Fatalf("%s %q: both read and in error: %v", key, raw, err)
		}
		if !reflect.DeepEqual(into, zero) {
			t.Fatalf("%s %q: unreadable (%v), yet half read: %+v", key, raw, err, into)
		}
		return
	}
	if ok != (raw != "") {
		t.Fatalf("%s %q: read %v", key, raw, ok)
	}
	if !ok {
		return
	}
	written, err := json.Marshal(into)
	if err != nil {
		t.Fatalf("%s %q reads as %+v, which cannot be written back: %v", key, raw, into, err)
	}
	again := reflect.New(reflect.TypeOf(into).Elem()).Interface()
	if ok, err := readAnnotation(nodeWith("", map[string]string{key: string(written)}), key, again); !ok || err != nil {
		t.Fatalf("%s %q written back as %s does not read: %v", key, raw, written, err)
	}
	rewritten, err := json.Marshal(again)
	if err != nil || string(rewritten) != string(written) {
		t.Fatalf("%s %q: written %s, read and written again %s (%v)", key, raw, written, rewritten, err)
	}
}

// FuzzNodeAnnotations feeds the annotations the agent reads back from its Node: the
// drain record, the ownership and the shutdown record (the same bytes as each), then
// asks the readers the engine and `node-agent status` use. Properties: see
// checkRecord; and no reader panics on any of them (TaintTriggersDrain,
// ShutdownPendingOnNode), a shutdown is pending only when its record reads and names
// this boot, and the agent's own taint triggers no drain only when the ownership reads.
func FuzzNodeAnnotations(f *testing.F) {
	for _, s := range []string{
		``,
		`null`,
		`{}`,
		`[]`,
		`"text"`,
		`{"trigger":"taint","taintKey":"kubevirt.io/drain","started":"2030-01-02T03:04:05Z","requested":{"ns/vm":"migrate","ns/other":"shutdown"}}`,
		`{"trigger":"shutdown","started":"2030-01-02T03:04:05Z","completed":"2030-01-02T03:05:05Z"}`,
		`{"trigger":"taint","started":"2030-01-02T03:04:05+02:00","requested":{"ns/vm":"bogus"}}`,
		`{"taintKey":"kubevirt.io/drain","cordoned":true,"bootID":"boot-1","reason":"shutdown","since":"2030-01-02T03:04:05Z"}`,
		`{"bootID":"boot-1","started":"2030-01-02T03:04:05Z","deadline":"2030-01-02T03:09:05Z"}`,
		`{"bootID":"boot-1","started":"2030-01-02T03:04:05Z","cancelled":"2030-01-02T03:06:05Z"}`,
		`{"bootID":"boot-1","started":"0001-01-01T00:00:00Z","deadline":"9999-12-31T23:59:59.999999999-23:59"}`,
		`{"bootID":"boot-1","started":1}`,
		`{"bootID":2,"started":"2030-01-02T03:04:05Z"}`,
		`{"trigger":"taint","started":"2030-01-02T03:04:05Z","requested":{"ns/vm":1}}`,
		`{"trigger":"taint","started":"not a time"}`,
		`{"bootID":"boot-1","cancelled":null}`,
		`{"bootID":"boot-1"`,
		`{"bootID":"boot-1"} trailing`,
		`{"BOOTID":"boot-1","Started":"2030-01-02T03:04:05Z"}`,
		`{"bootID":"boot-1","bootID":"boot-2"}`,
		`{"cordoned":"yes"}`,
	} {
		f.Add(s, "boot-1", "kubevirt.io/drain", true)
	}
	f.Fuzz(func(t *testing.T, raw, bootID, taintKey string, tainted bool) {
		checkRecord(t, AnnotationDrain, raw, &DrainRecord{})
		checkRecord(t, AnnotationOwned, raw, &Ownership{})
		checkRecord(t, AnnotationShutdown, raw, &ShutdownRecord{})

		node := nodeWith(bootID, map[string]string{AnnotationDrain: raw, AnnotationOwned: raw, AnnotationShutdown: raw})
		if tainted {
			node.Spec.Taints = []corev1.Taint{{Key: taintKey, Effect: corev1.TaintEffectNoSchedule}}
		}
		var sd ShutdownRecord
		sdOK, sdErr := readAnnotation(node, AnnotationShutdown, &sd)
		if got, want := ShutdownPendingOnNode(node), sdOK && sdErr == nil && sd.Cancelled == nil && sd.BootID == bootID; got != want {
			t.Fatalf("ShutdownPendingOnNode = %v, want %v (record %+v, %v)", got, want, sd, sdErr)
		}
		var own Ownership
		ownOK, ownErr := readAnnotation(node, AnnotationOwned, &own)
		want := tainted && (!ownOK || ownErr != nil || own.TaintKey != taintKey)
		if got := TaintTriggersDrain(node, taintKey); got != want {
			t.Fatalf("TaintTriggersDrain = %v, want %v (ownership %+v, %v)", got, want, own, ownErr)
		}
	})
}
