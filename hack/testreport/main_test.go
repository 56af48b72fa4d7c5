package main

import (
	"bytes"
	"strings"
	"testing"
)

// A run as `go test -json` reports it: a package with no tests, one with a passing, a
// skipped (with a subtest skipped) and no failed test.
const run = `{"Action":"start","Package":"example.com/a"}
{"Action":"output","Package":"example.com/a","Output":"?   \texample.com/a\t[no test files]\n"}
{"Action":"skip","Package":"example.com/a","Elapsed":0}
{"Action":"run","Package":"example.com/e2e","Test":"TestPass"}
{"Action":"output","Package":"example.com/e2e","Test":"TestPass","Output":"=== RUN   TestPass\n"}
{"Action":"output","Package":"example.com/e2e","Test":"TestPass","Output":"    x_test.go:1: a log line of a passing test\n"}
{"Action":"pass","Package":"example.com/e2e","Test":"TestPass","Elapsed":1}
{"Action":"output","Package":"example.com/e2e","Test":"TestTier","Output":"=== RUN   TestTier\n"}
{"Action":"output","Package":"example.com/e2e","Test":"TestTier","Output":"    nspawn_test.go:9: tier 2 skipped: no systemd-nspawn\n"}
{"Action":"output","Package":"example.com/e2e","Test":"TestTier","Output":"--- SKIP: TestTier (0.00s)\n"}
{"Action":"skip","Package":"example.com/e2e","Test":"TestTier","Elapsed":0}
{"Action":"output","Package":"example.com/e2e","Test":"TestLayouts/v2","Output":"    nspawn_test.go:7: no cgroup2\n"}
{"Action":"skip","Package":"example.com/e2e","Test":"TestLayouts/v2","Elapsed":0}
{"Action":"output","Package":"example.com/e2e","Output":"ok  \texample.com/e2e\t1.0s\n"}
{"Action":"pass","Package":"example.com/e2e","Elapsed":1}
`

func TestSkipsAreListedAndFailCI(t *testing.T) {
	var out bytes.Buffer
	res, err := report(strings.NewReader(run), &out)
	if err != nil {
		t.Fatal(err)
	}
	if res.failed {
		t.Errorf("a run without failures reported as failed")
	}
	if len(res.skips) != 2 || res.skips[0].Test != "TestTier" || res.skips[0].Reason != "nspawn_test.go:9: tier 2 skipped: no systemd-nspawn" || res.skips[1].Test != "TestLayouts/v2" {
		t.Errorf("skips %+v, want TestTier with its reason and TestLayouts/v2", res.skips)
	}
	if s := out.String(); strings.Contains(s, "a log line of a passing test") || !strings.Contains(s, "ok  \texample.com/e2e") || !strings.Contains(s, "tier 2 skipped") {
		t.Errorf("output:\n%s\nwant the skip's reason and the package's result, not a passing test's log", s)
	}
	for _, c := range []struct {
		ci, allow string
		pass      bool
	}{
		{"", "", true},                           // a developer's run: listed only
		{"false", "", true},                      // the same
		{"true", "", false},                      // CI: a skip fails it
		{"true", "TestTier", false},              // TestLayouts/v2 is not allowed
		{"true", "TestTier, TestLayouts", true},  // a name allows its subtests
		{"true", "TestTi,TestLayouts/v1", false}, // names, not prefixes
		{"true", "all", true},                    // everything allowed
	} {
		var out bytes.Buffer
		if got := verdict(&out, res, c.ci, c.allow); got != c.pass {
			t.Errorf("CI=%q NODE_AGENT_ALLOW_SKIP=%q: pass %v, want %v; said:\n%s", c.ci, c.allow, got, c.pass, out.String())
		}
		if !strings.Contains(out.String(), "SKIP example.com/e2e TestTier") {
			t.Errorf("CI=%q: the skip is not listed:\n%s", c.ci, out.String())
		}
	}
}

func TestFailureIsShownAndFails(t *testing.T) {
	in := `{"Action":"output","Package":"p","Test":"TestX","Output":"    x_test.go:3: boom\n"}
{"Action":"fail","Package":"p","Test":"TestX","Elapsed":0}
{"Action":"output","Package":"p","Output":"FAIL\tp\t0.1s\n"}
{"Action":"fail","Package":"p","Elapsed":0}
`
	var out bytes.Buffer
	res, err := report(strings.NewReader(in), &out)
	if err != nil {
		t.Fatal(err)
	}
	if !res.failed || !strings.Contains(out.String(), "boom") {
		t.Errorf("failed %v, output %q: want failed with the test's output", res.failed, out.String())
	}
	if verdict(&bytes.Buffer{}, res, "", "") {
		t.Errorf("a failed run passes")
	}
}

// The slowest top-level tests are listed longest first, subtests and skips not.
func TestSlowestTests(t *testing.T) {
	res, err := report(strings.NewReader(run+`{"Action":"pass","Package":"example.com/e2e","Test":"TestSlow","Elapsed":42.5}
{"Action":"pass","Package":"example.com/e2e","Test":"TestSlow/sub","Elapsed":40}
`), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	slowest(&out, res.times, 1)
	want := "testreport: the 1 slowest of 2 tests:\n     42.5s example.com/e2e TestSlow\n"
	if out.String() != want {
		t.Errorf("got\n%q\nwant\n%q", out.String(), want)
	}
}

// A test that waited for its turn (the e2e package's slots) is timed from its turn: 100 s
// elapsed, of which 70 s waiting, is 30 s.
func TestSlowestTestsCountFromTheirTurn(t *testing.T) {
	res, err := report(strings.NewReader(`{"Time":"2026-11-30T04:00:00Z","Action":"run","Package":"example.com/e2e","Test":"TestWaits"}
{"Time":"2026-11-30T04:01:10Z","Action":"output","Package":"example.com/e2e","Test":"TestWaits","Output":"    schedule_test.go:1: e2e: its turn after 1m10s\n"}
{"Time":"2026-11-30T04:01:40Z","Action":"pass","Package":"example.com/e2e","Test":"TestWaits","Elapsed":100}
{"Time":"2026-11-30T04:01:40Z","Action":"pass","Package":"example.com/e2e","Test":"TestAlone","Elapsed":50}
`), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	slowest(&out, res.times, 2)
	want := "testreport: the 2 slowest of 2 tests:\n     50.0s example.com/e2e TestAlone\n     30.0s example.com/e2e TestWaits\n"
	if out.String() != want {
		t.Errorf("got\n%q\nwant\n%q", out.String(), want)
	}
}
