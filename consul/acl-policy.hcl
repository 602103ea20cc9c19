# ACL policy for loom-ha instances and `loom-ha status`.
#
#   consul acl policy create -name loom-ha -rules @consul/acl-policy.hcl
#   consul acl token create -description "loom-ha instances" -policy-name loom-ha
#
# Give the token to instances as CONSUL_HTTP_TOKEN. Loom services are the node ids an app
# registers; this policy expects them to start with "loom-" (compose uses loom-echo).
# Widen or narrow the prefix to match your naming.

# Register, deregister and heartbeat (TTL check updates) loom services.
service_prefix "loom-" {
  policy = "write"
}

# Discover instances of any service (health/service, catalog/services) for balancing.
service_prefix "" {
  policy = "read"
}

# Health queries join services to their nodes; the agent checks endpoint filters by node.
node_prefix "" {
  policy = "read"
}

# `loom-ha status` reads the agent's own view of check outputs (heartbeat times).
agent_prefix "" {
  policy = "read"
}
