package e2e

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/node-agent/node-agent/integration/cluster"
)

// allowedError is an error line of virt-api or virt-controller that a suite run may
// show, and why.
type allowedError struct {
	program string
	match   *regexp.Regexp
}

// allowedErrors are the only error lines virt-api and virt-controller may log during
// the suite, on the shared cluster and on every cluster a test starts itself
// (checkControlPlaneLogs). Each is KubeVirt
// working as in any cluster, not KubeVirt finding something wrong with an object the
// simulators made. Keep it short: a new line means a new cause to find first.
var allowedErrors = []allowedError{
	// virt-operator's install mounts the export and backup CAs from secrets; there is
	// no virt-operator here and no test exports or backs up a VM.
	{"virt-controller", regexp.MustCompile(`(failed to load the certificate|Failed to establish a watch on) /etc/virt-controller/(exportca|backupca)/`)},
	// virt-controller re-syncs an object before its informer has delivered its own
	// JSON patch of a moment before, so the patch's "test" of the old value fails
	// (422 "the server rejected our request due to an error in our request") and it
	// retries, as its code says it does (vmi/lifecycle.go: "We could not retry if the
	// test fails ... So just retry"). Each such 422 in the audit log of a suite run
	// followed virt-controller's own same patch by 30-130 ms; none tested a value a
	// simulator had written. Logged as an error for a launcher pod's labels, and for a
	// VMI's finalizers (under the VM status message).
	{"virt-controller", regexp.MustCompile(`failed to sync dynamic pod annotations and labels during sync: the server rejected our request due to an error in our request`)},
	{"virt-controller", regexp.MustCompile(`"Updating the VirtualMachine status failed\.".*"reason":"the server rejected our request due to an error in our request"`)},
	// Optimistic-concurrency conflicts on VMs and VMIRSs: virt-controller writes them
	// several times off its cache (a VM's api-version annotation, finalizer and status,
	// vm.go; a VMIRS's status after each replica change, replicaset.go), and tests patch
	// VMs too (pinned's nodeSelector); it retries on the next sync. Seen in runs where
	// no test writes either; the simulators never write VMs or VMIRSs.
	{"virt-controller", regexp.MustCompile(`Operation cannot be fulfilled on (virtualmachines|virtualmachineinstancereplicasets)\.kubevirt\.io \\"[^"\\]+\\": the object has been modified`)},
	// A VM, or its VMI, deleted at the end of its test while the VM controller was
	// syncing it (the test's cleanup deletes both; kube-controller-manager's garbage
	// collector deletes the VMI of a deleted VM too).
	{"virt-controller", regexp.MustCompile(`"Updating the VirtualMachine status failed\.".*virtualmachine(instance)?s\.kubevirt\.io \\"[^"\\]+\\" not found`)},
	// Deleting a VMI with a source and a target pod (after a migration), the VMI
	// controller records one deletion expectation per pod in a loop, the second
	// replacing the first (deleteAllMatchingPods): every migrated VMI's deletion.
	{"virt-controller", regexp.MustCompile(`Clobbering existing delete keys`)},
	// Injected migration failures (sim.WithMigrationFailures): the migration controller
	// reports the failure and holds the retry back.
	{"virt-controller", regexp.MustCompile(`reported migration failed|vmi in migration backoff, re-enqueueing`)},
	// A migration still pending when its VM is deleted at the end of a test.
	{"virt-controller", regexp.MustCompile(`Unable to migrate vmi because vmi is shutdown`)},
	// A failed migration's target virt-launcher exits before virt-controller has marked
	// the migration Failed. This is KubeVirt's own race, not a simulator shortcut: the
	// real target virt-handler signals its virt-launcher to clean up as soon as the VMI's
	// migrationState says Failed (v1.8.0 pkg/virt-handler/migration-target.go
	// finalCleanup, SignalTargetPodCleanup), without waiting for the migration object,
	// and the simulated one does the same (sim migrationCleanup). virt-controller's
	// updateStatus (pkg/virt-controller/watch/migration/migration.go:591) checks
	// "target pod down" before it reads the VMI's failure, so a loaded virt-controller
	// that sees the pod event first logs this error and fails the migration anyway, with
	// the same outcome. Seen only with the scenarios in parallel (injected failures,
	// TestFaultAPIServerUnreachableDuringHeldShutdown, the container tier's engine
	// kill). The second form is the same race with the target pod already deleted
	// (migration.go:607).
	{"virt-controller", regexp.MustCompile(`"target pod [a-z0-9-]+/virt-launcher-[a-z0-9-]+ shutdown during migration"|"target pod disappeared during migration"`)},
	// The same stale-cache JSON patch (422) for a VM whose template's nodeSelector a test
	// changed (sc.pinned, patchVMNodeSelector): virt-controller's patch of the VMI's node
	// selector tests the VMI it last saw, fails, and is retried on the next sync (a warm
	// CI run, 2026-11-30, one VM of the container tier).
	{"virt-controller", regexp.MustCompile(`"unable to patch vmi to update node selector: the server rejected our request due to an error in our request"|"Reconciling the VirtualMachine failed\.".*"Error encountered while handling node affinity change request: the server rejected our request due to an error in our request"`)},
	// virt-api's own call to kube-apiserver (client-go request.go) cancelled while it read
	// the answer, because the request virt-api was serving was cancelled: its caller (the
	// API server relaying a webhook or subresource call for an agent or a test) went away.
	// Seen once (a cold CI run, 2026-11-30, two lines in the same millisecond, while
	// TestFaultAPIServerUnreachableDuringHeldShutdown cut an agent's connections and
	// TestDrainSurvivesAgentKill killed agents on the shared cluster).
	{"virt-api", regexp.MustCompile(`"Unexpected error when reading response body" err="context canceled"`)},
	// The harness's wait for virt-controller's /leader at its start (integration/cluster,
	// as the kubelet's readiness probe on a real cluster, which virt-operator delays by
	// 15 s) can connect before virt-controller's certificate manager has read its
	// serving certificate: KubeVirt's TLS setup (pkg/util/tls SetupPromTLS) refuses
	// the handshake and logs this, and the wait tries again. Seen once (a warm CI run,
	// 2026-11-30, the start of TestRandomHistory's own cluster).
	{"virt-controller", regexp.MustCompile(`"msg":"No server certificate, server is not yet ready to receive traffic"`)},
	// A host that powered off with its VMs on it (BenchmarkFleetReboot without
	// coordination: every host held to its deadline): the VMIs end Failed with the
	// reboot, and KubeVirt's evacuation controller, which had marked them for the drain
	// taint, still asks for their migration; virt-api's migration webhook refuses it.
	{"virt-api", regexp.MustCompile(`"msg":"admission generic error".*"reason":"Cannot migrate VMI in finalized state\."`)},
}

// checkControlPlaneLogs fails the suite on every error line of a cluster's virt-api
// and virt-controller that allowedErrors does not explain: each is a place where
// KubeVirt found the simulated cluster different from a real one. TestMain checks the
// shared cluster after the tests, stopPrivateCluster a test's own when it ends.
func checkControlPlaneLogs(c *cluster.Cluster, extra ...allowedError) error {
	byProgram, err := c.ErrorLines()
	if err != nil {
		return err
	}
	return unexplainedErrors(byProgram, extra...)
}

// unavailable matches what KubeVirt logs as an error when the API server, its etcd or
// virt-api does not answer (a refused or dropped connection, a timeout, a lost leader
// lease), and nothing else. "TLS handshake timeout": a kube-apiserver that has just
// started again accepts connections before it answers them (a cold CI run, 2026-11-30:
// two reflectors of virt-controller, 20 s after the restart).
var unavailable = regexp.MustCompile(`connection refused|context deadline exceeded|the server was unable to return a response|` +
	`client connection lost|unexpected EOF|: EOF|etcdserver: |Timeout: request did not complete|timed out|i/o timeout|TLS handshake timeout|` +
	`the server is currently unable to handle the request|connection reset by peer|use of closed network connection|` +
	`leaderelection|failed to renew lease|Failed to update lock|error retrieving resource lock|failed calling webhook`)

// faultErrors are the error lines a cluster that a test breaks on purpose
// (faults_test.go: kube-apiserver restarted, etcd paused, virt-api and virt-controller
// restarted) may show besides allowedErrors: KubeVirt's own reports of the part that
// did not answer. Only such tests pass them to stopPrivateCluster (env.faulted).
var faultErrors = []allowedError{
	{"virt-controller", unavailable}, {"virt-api", unavailable},
	{"virt-controller", forbiddenAfterRestart}, {"virt-api", forbiddenAfterRestart},
	{"virt-controller", crdStorageUnavailable}, {"virt-api", crdStorageUnavailable},
}

// crdStorageUnavailable matches a watch of a KubeVirt resource that the kube-apiserver
// answered "error resolving resource" because it could not build the CRD's storage
// while etcd was paused (its own log: "failed to update store with options: etcd grpc
// connection not ready: context deadline exceeded"; a CI run, 2026-12-02, virt-api's
// reflector of VirtualMachineInstancePresets, once). The API server does not say why in
// its answer, so unavailable cannot match it.
var crdStorageUnavailable = regexp.MustCompile(`"Failed to watch" err="Internal error occurred: error resolving resource"`)

// forbiddenAfterRestart matches a watch refused by a kube-apiserver that has just
// started again: until its RBAC authorizer has read the roles and bindings it refuses
// a service account's requests (403), and virt-api's and virt-controller's reflectors
// report each refused watch once (a CI run: ten such lines within 0.1 s of the
// restart, then none). The programs held cluster-admin before they ran with KubeVirt's
// own roles (3d55378), which RBAC does not decide, so this never showed then.
var forbiddenAfterRestart = regexp.MustCompile(`"Failed to watch" err=".*is forbidden: User \\"system:serviceaccount:kubevirt:kubevirt-`)

// stopPrivateCluster stops a cluster a test started itself (newPrivateEnv,
// TestAgentWithoutKubeVirtCRDs) after checking its control-plane logs as TestMain
// checks the shared cluster's: an unexplained error line fails the test. The logs are
// kept when the test failed.
func stopPrivateCluster(t testing.TB, c *cluster.Cluster, extra ...allowedError) {
	t.Helper()
	if err := checkControlPlaneLogs(c, extra...); err != nil {
		t.Errorf("the cluster of %s (logs in %s): %v", t.Name(), c.Dir, err)
	}
	c.Stop(t.Failed())
}

// unexplainedErrors returns an error that lists, counted, the lines of byProgram
// (error lines by program) that allowedErrors does not explain; nil if there is none.
func unexplainedErrors(byProgram map[string][]string, extra ...allowedError) error {
	counts := map[string]int{}
	allowed := append(append([]allowedError{}, allowedErrors...), extra...)
	for program, lines := range byProgram {
	next:
		for _, line := range lines {
			for _, a := range allowed {
				if a.program == program && a.match.MatchString(line) {
					continue next
				}
			}
			counts[program+": "+line]++
		}
	}
	if len(counts) == 0 {
		return nil
	}
	var out []string
	for line, n := range counts {
		out = append(out, fmt.Sprintf("%dx %s", n, line))
	}
	sort.Strings(out)
	return fmt.Errorf("virt-api and virt-controller logged %d unexplained error lines (see allowedErrors in logcheck_test.go):\n%s",
		len(out), strings.Join(out, "\n"))
}

// The check passes the lines allowedErrors explains, and fails on any other error
// line, counted and named with its program, and on an allowed line from a program
// its entry is not for.
func TestLogCheckFlagsUnexplainedLines(t *testing.T) {
	t.Parallel()
	allowed := `{"component":"virt-controller","level":"error","msg":"Clobbering existing delete keys: map[]"}`
	forbidden := `{"component":"virt-controller","level":"error","msg":"pods is forbidden: User \"system:serviceaccount:kubevirt:kubevirt-controller\" cannot create resource \"pods\""}`
	if err := unexplainedErrors(map[string][]string{"virt-controller": {allowed, allowed}, "virt-api": nil}); err != nil {
		t.Errorf("allowed lines failed the check: %v", err)
	}
	err := unexplainedErrors(map[string][]string{"virt-controller": {allowed, forbidden, forbidden}, "virt-api": {allowed}})
	if err == nil {
		t.Fatal("the check passed an unexplained line")
	}
	for _, want := range []string{"logged 2 unexplained error lines", "\n1x virt-api: " + allowed, "\n2x virt-controller: " + forbidden} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the check's error does not say %q:\n%v", want, err)
		}
	}
	// A watch refused by a kube-apiserver just restarted passes only on a cluster a
	// test broke on purpose (faultErrors); a refused create never does.
	refusedWatch := `E1130 01:15:27.250292   31025 reflector.go:205] "Failed to watch" err="configmaps \"kubevirt-ca\" is forbidden: User \"system:serviceaccount:kubevirt:kubevirt-apiserver\" cannot watch resource \"configmaps\" in API group \"\" in the namespace \"kubevirt\"" logger="UnhandledError"`
	if err := unexplainedErrors(map[string][]string{"virt-api": {refusedWatch}}, faultErrors...); err != nil {
		t.Errorf("a refused watch after a restart failed a faulted cluster's check: %v", err)
	}
	if err := unexplainedErrors(map[string][]string{"virt-api": {refusedWatch}}); err == nil {
		t.Error("a refused watch passed the check of a cluster nobody broke")
	}
	if err := unexplainedErrors(map[string][]string{"virt-controller": {forbidden}}, faultErrors...); err == nil {
		t.Error("a refused create passed a faulted cluster's check")
	}
	// So does a watch the API server could not serve while etcd was paused.
	unresolved := `E1202 05:09:21.304468   27281 reflector.go:205] "Failed to watch" err="Internal error occurred: error resolving resource" logger="UnhandledError" reflector="pkg/mod/k8s.io/client-go@v0.34.2/tools/cache/reflector.go:290" type="*v1.VirtualMachineInstancePreset"`
	if err := unexplainedErrors(map[string][]string{"virt-api": {unresolved}}, faultErrors...); err != nil {
		t.Errorf("a watch unresolved while etcd was paused failed a faulted cluster's check: %v", err)
	}
	if err := unexplainedErrors(map[string][]string{"virt-api": {unresolved}}); err == nil {
		t.Error("a watch unresolved passed the check of a cluster nobody broke")
	}
}
