"""Compose, Sentinel, NATS, Consul and Docker files parse and agree with each other and the code."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from loom_ha.cli import build_parser
from loom_ha.config import create_transport, transport_from_env
from loom_ha.discovery.consul import ConsulRegistry
from loom_ha.ha import HATransport
from loom_ha.redis.url import parse_redis_url
from loom_ha.routing import BalancedTransport

from ._hcl import loads as load_hcl

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
CONFIG = COMPOSE / "config"
CONSUL = ROOT / "consul"
COMPOSE_FILES = sorted(COMPOSE.glob("*.yml"))
HCL_FILES = sorted(CONSUL.glob("*.hcl"))
URL = re.compile(r"""\b(?:memory|rediss?|redis\+sentinel|nats|tls)://[^\s"'`)<>]*""")
LOOM_IMAGE = "loom-ha:local"

# Variables that configure something other than the transport, and the source that reads each.
OTHER_READERS: dict[str, Path | str] = {
    "LOOM_NODE_ID": COMPOSE / "app" / "loom_app.py",
    "LOOM_HA_REGISTRY": "loom_ha.routing.config",
    "CONSUL_HTTP_ADDR": "loom_ha.discovery._consul_http",
    "CONSUL_HTTP_TOKEN": "loom_ha.discovery.consul",
}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def _services(name: str) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _load(COMPOSE / name)["services"]
    return services


def _loom_services(services: Mapping[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, spec in services.items():
        if spec.get("image") == LOOM_IMAGE:
            yield name, spec


def _env(spec: Mapping[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(spec: Mapping[str, Any]) -> list[str]:
    command = spec.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _flag(command: list[str], flag: str) -> list[str]:
    """Every value following `flag` in `command`."""
    return [command[i + 1] for i, arg in enumerate(command[:-1]) if arg == flag]


def _conf_lines(path: Path) -> list[list[str]]:
    """Non-comment lines of a redis/sentinel config, split into words."""
    lines = (line.split("#", 1)[0].split() for line in path.read_text().splitlines())
    return [words for words in lines if words]


def _conf_value(path: Path, *key: str) -> list[str]:
    for words in _conf_lines(path):
        if tuple(words[: len(key)]) == key:
            return words[len(key) :]
    raise AssertionError(f"{path.name}: no {' '.join(key)!r} line")


def _mounted(spec: Mapping[str, Any], target: str) -> Path:
    """The host file a service mounts at `target` (relative paths are from compose/)."""
    for volume in spec.get("volumes") or []:
        parts = volume.split(":")
        if len(parts) >= 2 and parts[1] == target:
            return Path(COMPOSE / parts[0]).resolve()
    raise AssertionError(f"nothing mounted at {target}")


def _names_read_by_transport_from_env() -> set[str]:
    """Names transport_from_env looks up, recorded for each transport kind."""
    seen: set[str] = set()

    class Recording(dict[str, str]):
        def get(self, key: str, default: Any = None) -> Any:
            seen.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            seen.add(key)
            return super().__getitem__(key)

    for kind in ("memory", "redis", "nats"):
        transport_from_env(Recording(LOOM_TRANSPORT=kind))
    return seen


# -- every file parses ---------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_parses_and_references_only_existing_things(path: Path) -> None:
    """Each compose file is YAML whose depends_on, build contexts and mounted files exist."""
    data = _load(path)
    services = data["services"]
    volumes = set(data.get("volumes") or {})
    for name, spec in services.items():
        depends = spec.get("depends_on") or []
        for dep in depends if isinstance(depends, list) else list(depends):
            assert dep in services, f"{path.name}: {name} depends on unknown {dep}"
        if "build" in spec:
            context = (COMPOSE / spec["build"]["context"]).resolve()
            assert (context / spec["build"].get("dockerfile", "Dockerfile")).is_file()
        for volume in spec.get("volumes") or []:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{path.name}: {name} mounts missing {source}"
            else:
                assert source in volumes, f"{path.name}: {name} uses undeclared volume {source}"


@pytest.mark.parametrize("path", HCL_FILES, ids=lambda p: p.name)
def test_consul_file_parses(path: Path) -> None:
    """Each Consul HCL file is in the HCL subset our reader accepts (balanced, one per line)."""
    assert load_hcl(path.read_text())


def test_expected_files_exist() -> None:
    """Every deployment file the docs describe is present."""
    expected = ["dev.yml", "prod-redis.yml", "prod-nats.yml"]
    assert [p.name for p in COMPOSE_FILES] == sorted(expected)
    assert [p.name for p in HCL_FILES] == ["acl-policy.hcl", "client.hcl", "server.hcl"]
    for name in ("redis.conf", "sentinel.conf", "nats-server.conf"):
        assert (CONFIG / name).is_file()


# -- environment and URLs agree with loom_ha.config -----------------------------------------


def test_environment_names_are_the_ones_the_code_reads() -> None:
    """Every variable given to loom-ha instances is read by transport_from_env or a named reader."""
    transport_names = _names_read_by_transport_from_env()
    assert {"LOOM_TRANSPORT", "REDIS_URL", "NATS_SERVERS", "LOOM_HA_OPTIONS"} <= transport_names
    for path in COMPOSE_FILES:
        for name, spec in _loom_services(_load(path)["services"]):
            env = _env(spec)
            assert "LOOM_TRANSPORT" in env, f"{path.name}: {name} sets no LOOM_TRANSPORT"
            for var in env:
                if var in transport_names:
                    continue
                reader = OTHER_READERS.get(var)
                assert reader is not None, f"{path.name}: {name} sets {var}, which nothing reads"
                if isinstance(reader, str):
                    spec_ = importlib.util.find_spec(reader)
                    assert spec_ is not None and spec_.origin is not None
                    reader = Path(spec_.origin)
                assert f'"{var}"' in reader.read_text(), f"{reader.name} does not read {var}"


@pytest.mark.parametrize(
    ("file", "backend"),
    [
        ("dev.yml", "InMemoryTransport"),
        ("prod-redis.yml", "RedisStreamsTransport"),
        ("prod-nats.yml", "JetStreamTransport"),
    ],
)
def test_compose_environment_builds_the_expected_transport(file: str, backend: str) -> None:
    """transport_from_env, given a service's environment, builds HATransport over the backend
    (inside a BalancedTransport on the registry the file names, if it names one)."""
    loom = dict(_loom_services(_services(file)))
    assert loom, f"{file}: no loom-ha service"
    for spec in loom.values():
        env = _env(spec)
        transport = transport_from_env(env)  # builds, does not connect
        if "LOOM_HA_REGISTRY" in env:
            assert isinstance(transport, BalancedTransport)
            assert isinstance(transport.registry, ConsulRegistry)
            host = env["LOOM_HA_REGISTRY"].removeprefix("consul://").split(":")[0]
            assert host == env["CONSUL_HTTP_ADDR"].split(":")[0]
            transport = transport.inner
        assert isinstance(transport, HATransport)
        assert type(transport.inner).__name__ == backend


def _files_with_urls() -> list[Path]:
    files = [*COMPOSE.rglob("*.yml"), *CONFIG.iterdir(), *HCL_FILES]
    return [*files, ROOT / "docs" / "deployment.md"]


def test_every_transport_url_in_the_files_parses() -> None:
    """Each transport URL in the compose, config and Consul files and deployment doc is valid."""
    found = 0
    for path in _files_with_urls():
        for url in URL.findall(path.read_text()):
            create_transport(url.rstrip(".,;"))
            found += 1
    assert found >= 3


# -- Redis: sentinels, master and URL agree -------------------------------------------------


def test_redis_url_sentinels_and_master_agree() -> None:
    """REDIS_URL lists every sentinel service on its port and names the master they monitor."""
    services = _services("prod-redis.yml")
    (loom,) = (spec for _, spec in _loom_services(services))
    settings = parse_redis_url(_env(loom)["REDIS_URL"].split("?")[0])
    sentinels = {n: s for n, s in services.items() if n.startswith("sentinel-")}
    assert len(sentinels) == 3
    sentinel_conf = _mounted(next(iter(sentinels.values())), "/etc/redis/sentinel.conf")
    sentinel_port = int(_conf_value(sentinel_conf, "port")[0])
    assert sorted(settings.addresses) == sorted((n, sentinel_port) for n in sentinels)

    name, host, port, quorum = _conf_value(sentinel_conf, "sentinel", "monitor")
    assert settings.master_name == name
    assert host in services
    redis_conf = _mounted(services[host], "/usr/local/etc/redis/redis.conf")
    assert int(port) == int(_conf_value(redis_conf, "port")[0])
    assert len(sentinels) // 2 < int(quorum) <= len(sentinels)
    for sentinel, spec in sentinels.items():
        assert _mounted(spec, "/etc/redis/sentinel.conf") == sentinel_conf
        assert f"announce-ip {sentinel}" in " ".join(_command(spec))
    for option in ("down-after-milliseconds", "failover-timeout", "parallel-syncs"):
        assert _conf_value(sentinel_conf, "sentinel", option)[0] == name


def test_redis_replicas_follow_the_monitored_master() -> None:
    """Both replicas replicate the master service on its port and announce their own names."""
    services = _services("prod-redis.yml")
    sentinel_conf = CONFIG / "sentinel.conf"
    _, master, port, _ = _conf_value(sentinel_conf, "sentinel", "monitor")
    replicas = {n: s for n, s in services.items() if n.startswith("redis-replica-")}
    assert len(replicas) == 2
    for name, spec in replicas.items():
        command = _command(spec)
        at = command.index("--replicaof")
        assert command[at + 1 : at + 3] == [master, port]
        assert _flag(command, "--replica-announce-ip") == [name]
    assert _flag(_command(services[master]), "--replica-announce-ip") == [master]


# -- NATS: cluster routes, client URLs and server names agree -------------------------------


def _nats_conf() -> tuple[int, int, list[tuple[str, int]]]:
    text = (CONFIG / "nats-server.conf").read_text()
    client = int(re.search(r"^listen:\s*[\d.]+:(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    cluster = re.search(r"cluster\s*\{(.*?)\n\}", text, re.S).group(1)  # type: ignore[union-attr]
    cluster_port = int(re.search(r"listen:\s*[\d.]+:(\d+)", cluster).group(1))  # type: ignore[union-attr]
    routes = [(h, int(p)) for h, p in re.findall(r"nats-route://([\w.-]+):(\d+)", cluster)]
    assert re.search(r"^jetstream\s*\{", text, re.M), "JetStream is not enabled"
    return client, cluster_port, routes


def test_nats_routes_reference_existing_services_and_ports() -> None:
    """Cluster routes name every NATS service once, on the cluster port each one listens on."""
    services = _services("prod-nats.yml")
    nats = {n: s for n, s in services.items() if n.startswith("nats-")}
    _, cluster_port, routes = _nats_conf()
    assert sorted(routes) == sorted((n, cluster_port) for n in nats)
    names = [name for spec in nats.values() for name in _flag(_command(spec), "--server_name")]
    assert sorted(names) == sorted(nats), "server names must be unique, one per node"
    for spec in nats.values():
        conf = _mounted(spec, _flag(_command(spec), "--config")[0])
        assert conf == CONFIG / "nats-server.conf"


def test_nats_servers_url_lists_every_node_on_the_client_port() -> None:
    """NATS_SERVERS names each NATS service on the client port of the server config."""
    services = _services("prod-nats.yml")
    (loom,) = (spec for _, spec in _loom_services(services))
    client_port, _, _ = _nats_conf()
    servers = _env(loom)["NATS_SERVERS"].split(",")
    hosts = [re.fullmatch(r"nats://([\w.-]+):(\d+)", s).groups() for s in servers]  # type: ignore[union-attr]
    assert sorted((h, int(p)) for h, p in hosts) == sorted(
        (n, client_port) for n in services if n.startswith("nats-")
    )


# -- Consul: joins, address, ACL ------------------------------------------------------------


def test_consul_servers_join_each_other_and_match_compose() -> None:
    """retry_join and bootstrap_expect match the Consul services; clients join the same ones."""
    services = _services("prod-nats.yml")
    consuls = sorted(n for n in services if n.startswith("consul-"))
    server = load_hcl((CONSUL / "server.hcl").read_text())
    client = load_hcl((CONSUL / "client.hcl").read_text())
    assert server["server"] is True and client["server"] is False
    assert sorted(server["retry_join"]) == consuls == sorted(client["retry_join"])
    assert server["bootstrap_expect"] == len(consuls)
    assert server["datacenter"] == client["datacenter"]
    for name in consuls:
        spec = services[name]
        assert _mounted(spec, "/consul/config/server.hcl") == CONSUL / "server.hcl"
        assert _command(spec) == ["agent", f"-node={name}"]


def test_consul_address_and_ports_agree() -> None:
    """CONSUL_HTTP_ADDR names a Consul server on the HTTP port its config sets."""
    services = _services("prod-nats.yml")
    (loom,) = (spec for _, spec in _loom_services(services))
    host, port = _env(loom)["CONSUL_HTTP_ADDR"].split(":")
    assert host in services and host.startswith("consul-")
    http_port = load_hcl((CONSUL / "server.hcl").read_text())["ports"][0]["http"]
    assert int(port) == http_port
    assert f"{http_port}:{http_port}" in services[host].get("ports", [])


def test_acl_policy_lets_instances_register_and_discover() -> None:
    """The policy grants service write on the node ids compose registers, reads for discovery."""
    policy = load_hcl((CONSUL / "acl-policy.hcl").read_text())
    write = [p for p, rule in policy["service_prefix"].items() if rule["policy"] == "write"]
    assert policy["service_prefix"][""]["policy"] == "read"
    assert policy["node_prefix"][""]["policy"] in ("read", "write")
    for rule_set in policy.values():
        assert all(rule["policy"] in ("read", "write", "deny") for rule in rule_set.values())
    (loom,) = (spec for _, spec in _loom_services(_services("prod-nats.yml")))
    assert any(_env(loom)["LOOM_NODE_ID"].startswith(p) for p in write)
    server = load_hcl((CONSUL / "server.hcl").read_text())
    assert server["acl"][0]["enabled"] is True


# -- Docker image and commands agree with the package ---------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_matches_the_package() -> None:
    """The image is python:3.11-slim, installs existing extras, and runs the loom-ha script."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    instructions = _dockerfile()
    assert all(arg.split()[0] == "python:3.11-slim" for op, arg in instructions if op == "FROM")
    (entrypoint,) = (ast.literal_eval(a) for op, a in instructions if op == "ENTRYPOINT")
    assert entrypoint == list(pyproject["project"]["scripts"])
    (cmd,) = (ast.literal_eval(a) for op, a in instructions if op == "CMD")
    build_parser().parse_args(cmd)
    extras = set(pyproject["project"]["optional-dependencies"])
    for run in (a for op, a in instructions if op == "RUN"):
        for group in re.findall(r"\[([\w,]+)\]", run):
            assert set(group.split(",")) <= extras - {"dev"}


def test_docker_build_context_keeps_what_the_dockerfile_copies() -> None:
    """Every COPY source exists and is not excluded by .dockerignore."""
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for op, arg in _dockerfile():
        if op != "COPY" or arg.startswith("--from"):
            continue
        for source in arg.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: missing"
            assert source not in ignored and source.rstrip("/") not in ignored
    assert ".venv" in ignored and ".git" in ignored


def test_loom_service_commands_are_valid() -> None:
    """Commands given to the loom-ha entrypoint parse; overridden entrypoints run a mounted app."""
    for path in COMPOSE_FILES:
        for name, spec in _loom_services(_load(path)["services"]):
            entrypoint = spec.get("entrypoint")
            if entrypoint is None:
                build_parser().parse_args(_command(spec))
                continue
            assert entrypoint[0] == "python", f"{path.name}: {name}"
            script = entrypoint[1]
            host = _mounted(spec, str(Path(script).parent))
            source = (host / Path(script).name).read_text()
            compile(source, script, "exec")
            assert "loom_transport()" in source


def test_prod_files_run_several_instances() -> None:
    """Production files run more than one loom-ha instance behind the brokers."""
    for file in ("prod-redis.yml", "prod-nats.yml"):
        for _, spec in _loom_services(_services(file)):
            assert int(spec["deploy"]["replicas"]) >= 2
