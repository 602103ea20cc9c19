# Consul client agent: one per host running loom-ha instances. Instances register with
# this local agent (CONSUL_HTTP_ADDR=127.0.0.1:8500), which forwards to the servers; when
# the host dies its services go critical with it (micro/go-micro #244: loom-ha's ejector
# reacts sooner, on failed calls).

datacenter = "dc1"
data_dir   = "/consul/data"
log_level  = "INFO"

server = false

bind_addr   = "0.0.0.0"
client_addr = "127.0.0.1"

retry_join     = ["consul-1", "consul-2", "consul-3"]
retry_interval = "5s"

ports {
  http = 8500
  dns  = 8600
  grpc = 8502
}

# The agent token (consul acl set-agent-token agent <token>) needs node:write on this
# node; tokens set that way survive restarts. When an agent restart forgets a loom-ha
# instance, its next heartbeat registers it again (protoactor-dotnet #442).
acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}
