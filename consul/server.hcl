# Consul server agent (compose/prod-nats.yml runs three: consul-1..3, named with -node).
# Three servers tolerate one failure; loom-ha instances register through the agent at
# CONSUL_HTTP_ADDR and keep a TTL check alive (heartbeat every TTL/3).

datacenter = "dc1"
data_dir   = "/consul/data"
log_level  = "INFO"

server           = true
bootstrap_expect = 3

# Containers have one interface; clients (loom-ha, the UI) reach the HTTP API on all of them.
bind_addr   = "0.0.0.0"
client_addr = "0.0.0.0"

# Keep trying to join the other servers (by compose service name) until they are up.
retry_join     = ["consul-1", "consul-2", "consul-3"]
retry_interval = "5s"

ports {
  http     = 8500
  dns      = 8600
  grpc     = 8502
  server   = 8300
  serf_lan = 8301
}

ui_config {
  enabled = true
}

# Remove dead servers once a replacement joins, so quorum math stays right.
autopilot {
  cleanup_dead_servers      = true
  last_contact_threshold    = "1s"
  server_stabilization_time = "10s"
}

# Deny by default: loom-ha instances need a token with consul/acl-policy.hcl.
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}

performance {
  raft_multiplier = 1
}
