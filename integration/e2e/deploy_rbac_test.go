package e2e

// What the agent's service account may do, rule by rule, with the code path that needs
// each rule; and what the agent really did, from the API server's audit log.

import (
	"fmt"
	"sort"
	"strings"

	rbacv1 "k8s.io/api/rbac/v1"
)

// permission is one verb on one resource (resource/subresource), in one namespace ("":
// every namespace, from the ClusterRole) and for one object name ("": any).
type permission struct {
	ns, group, resource, name, verb string
}

func (p permission) String() string {
	s := p.verb + " " + p.resource
	if p.group != "" {
		s += "." + p.group
	}
	if p.name != "" {
		s += " named " + p.name
	}
	if p.ns != "" {
		s += " in " + p.ns
	}
	return s
}

// neededRule is a rule the agent needs, and why.
type neededRule struct {
	ns       string // "" for the ClusterRole, else the Role's namespace
	group    string
	resource string
	names    []string
	verbs    []string
	// why names the code path that makes these requests.
	why string
	// notInDrain lists the verbs that the deployment test's drain does not make, and why:
	// every other verb must show in the audit log.
	notInDrain map[string]string
}

// watchListFallback says why an informer's list does not show: client-go (v0.35+) starts
// an informer with a streaming list (a watch with sendInitialEvents=true, audited as
// "watch"), and lists only where the API server does not serve that (older servers, or
// the WatchList feature off), as its reflector's fallback.
const watchListFallback = "informers list only as client-go's fallback where the API server serves no streaming list; this one does"

// agentNeeds is every permission `node-agent run` needs; manifests/base/rbac.yaml must grant
// exactly these. A rule added to the manifests without a line here fails the test.
var agentNeeds = []neededRule{
	{group: "", resource: "nodes", verbs: []string{"get", "update"},
		why: "agent/shutdown.go updateNode: the drain taint and the cordon on a host shutdown, removed again when the node is re-enabled"},
	{group: "", resource: "nodes", verbs: []string{"patch"},
		why: "agent/record.go patchAnnotations: the drain record and the state annotation"},
	{group: "", resource: "nodes", verbs: []string{"list", "watch"},
		why:        "nodeinfo/view.go: the informer of its own Node (fieldSelector metadata.name)",
		notInDrain: map[string]string{"list": watchListFallback}},
	{group: "", resource: "pods", verbs: []string{"list", "watch"},
		why: "nodeinfo/view.go: the node's virt-launcher pods (fieldSelector spec.nodeName); kubectl's drain.GetPodsForDeletion (--all-pods)"},
	{group: "", resource: "pods/eviction", verbs: []string{"create"},
		why: "agent/actions.go evict and its dry-run probe, for VMs and (--all-pods) the other pods"},
	{group: "", resource: "events", verbs: []string{"create", "patch"},
		why:        "client-go's event recorder (cmd/node-agent/agent.go): create, and patch for a repeated event",
		notInDrain: map[string]string{"patch": "only a repeated event is patched"}},
	{group: "apps", resource: "daemonsets", verbs: []string{"get"},
		why: "kubectl's drain daemonSetFilter: a DaemonSet's pod stays if its DaemonSet exists (--all-pods)"},
	{group: "kubevirt.io", resource: "virtualmachineinstances", verbs: []string{"list", "watch"},
		why:        "nodeinfo/view.go: the informer of the node's VMIs (labelSelector kubevirt.io/nodeName)",
		notInDrain: map[string]string{"list": watchListFallback}},
	{group: "kubevirt.io", resource: "virtualmachineinstancemigrations", verbs: []string{"list", "create", "delete"},
		why: "nodeinfo/view.go Migrations (one unfinished migration per VMI); agent/actions.go createMigration where no eviction webhook intercepts, deleteOwnMigrations when such a drain is withdrawn",
		notInDrain: map[string]string{"create": "the fallback for a cluster without KubeVirt's eviction webhook; this cluster has it",
			"delete": "only migrations the agent created, in a cluster without KubeVirt's eviction webhook"}},
	{group: "subresources.kubevirt.io", resource: "virtualmachineinstances/evacuate", verbs: []string{"update"},
		why: "agent/actions.go cancelEvacuation: PUT .../evacuate/cancel when a drain is withdrawn"},
	{group: "flowcontrol.apiserver.k8s.io", resource: "prioritylevelconfigurations", verbs: []string{"list"},
		why: "nodeinfo/apf.go PriorityLevel: the name of the API priority level of the agent's requests, which decides how many VMs are asked at once"},
	{ns: "node-agent", group: "coordination.k8s.io", resource: "leases", verbs: []string{"get", "list", "watch", "create", "update", "delete"},
		why: "fleet/turns.go: the queue of host-shutdown drains (--max-concurrent-drains), the informer of its Leases (labelSelector node-agent.kubevirt.io/turn), a node's ticket and the drain slots",
		notInDrain: map[string]string{"list": watchListFallback,
			"get": "only during a host shutdown", "create": "only during a host shutdown", "update": "only during a host shutdown", "delete": "only during a host shutdown"}},
	{ns: "kubevirt", group: "", resource: "configmaps", names: []string{"kubevirt-config"}, verbs: []string{"list", "watch"},
		why:        "nodeinfo/view.go: the legacy kubevirt-config ConfigMap (fieldSelector metadata.name)",
		notInDrain: map[string]string{"list": watchListFallback}},
	{ns: "kubevirt", group: "kubevirt.io", resource: "kubevirts", verbs: []string{"list", "watch"},
		why:        "nodeinfo/view.go: the KubeVirt CR (migrations.nodeDrainTaintKey, evictionStrategy)",
		notInDrain: map[string]string{"list": watchListFallback}},
}

// neededPermissions flattens agentNeeds, each permission with its rule.
func neededPermissions() map[permission]neededRule {
	out := map[permission]neededRule{}
	for _, r := range agentNeeds {
		names := r.names
		if len(names) == 0 {
			names = []string{""}
		}
		for _, v := range r.verbs {
			for _, n := range names {
				out[permission{ns: r.ns, group: r.group, resource: r.resource, name: n, verb: v}] = r
			}
		}
	}
	return out
}

// grantedPermissions flattens RBAC rules; ns is "" for a ClusterRole. It returns an
// error for what this flattening cannot express: wildcards and non-resource URLs.
func grantedPermissions(ns string, rules []rbacv1.PolicyRule) (map[permission]bool, error) {
	out := map[permission]bool{}
	var errs []string
	for _, r := range rules {
		if len(r.NonResourceURLs) > 0 {
			errs = append(errs, fmt.Sprintf("non-resource URLs %v", r.NonResourceURLs))
		}
		names := r.ResourceNames
		if len(names) == 0 {
			names = []string{""}
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					if g == "*" || res == "*" || strings.HasPrefix(res, "*/") || strings.HasSuffix(res, "/*") || v == "*" {
						errs = append(errs, fmt.Sprintf("wildcard in %q %q %q", g, res, v))
					}
					for _, n := range names {
						out[permission{ns: ns, group: g, resource: res, name: n, verb: v}] = true
					}
				}
			}
		}
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return out, nil
}

func (p permission) covers(ev auditEvent) bool {
	ref := ev.ObjectRef
	res := ref.Resource
	if ref.Subresource != "" {
		res += "/" + ref.Subresource
	}
	return p.verb == ev.Verb && p.group == ref.APIGroup && p.resource == res &&
		(p.ns == "" || p.ns == ref.Namespace) && (p.name == "" || p.name == ref.Name)
}

// discoveryPath says whether a non-resource request is API discovery, which every
// authenticated user may read (system:discovery): kubectl's drain helper asks /api/v1
// whether the Eviction API is served.
func discoveryPath(uri string) bool {
	path, _, _ := strings.Cut(uri, "?")
	return path == "/api" || path == "/apis" || strings.HasPrefix(path, "/api/") || strings.HasPrefix(path, "/apis/") || path == "/version"
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
