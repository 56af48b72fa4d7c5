package cluster

import (
	"fmt"
	"os"
	"path/filepath"
)

// auditPolicy logs, at the Metadata level (who, verb, resource, namespace, name, response
// code; no bodies), every request made by a service account, and every eviction
// (pods/eviction) whoever asks, and nothing else: the tests and the KubeVirt control plane
// authenticate with certificates, so the log holds what runs with a service-account token
// (the deployment test's agent) and the evictions of the agents the tests run with the
// admin's kubeconfig (to count, per pod, how often a refused eviction is retried); it
// stays small.
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: Metadata
  resources:
  - group: ""
    resources: ["pods/eviction"]
- level: None
`

// writeAuditPolicy writes the audit policy into dir and sets c.AuditLog, where the API
// server writes one JSON audit.k8s.io/v1 Event per line (before it answers: the log
// backend blocks by default). It returns the policy's path.
func (c *Cluster) writeAuditPolicy(dir string) (string, error) {
	policy := filepath.Join(dir, "audit-policy.yaml")
	if err := os.WriteFile(policy, []byte(auditPolicy), 0o600); err != nil {
		return "", fmt.Errorf("writing the audit policy: %w", err)
	}
	c.AuditLog = filepath.Join(c.Dir, "audit.log")
	return policy, nil
}
