"""nkey and JWT (``.creds``) auth, and TLS trust, of the NATS backends on real servers that
enforce them: the right identity delivers, a wrong one is one clear non-retryable error."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from loom_ha.config import create_transport
from loom_ha.errors import ConfigurationError, TransientError
from loom_ha.event import CloudEvent
from loom_ha.nats import JetStreamTransport, NatsCoreTransport
from loom_ha.testing._nats_auth import make_nkey_user, make_operator_auth
from loom_ha.testing.collect import Collector
from loom_ha.testing.durability import eventually
from loom_ha.testing.nats_servers import NatsServer
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import make_test_certificates
from loom_ha.transport import Transport, TransportState, TransportStatistics

from ._restart import restart_and_reconnect

pytestmark = pytest.mark.nats

# Far above how long a refusal takes: a client that retried instead of failing would raise
# ConnectionLostError (transient) only when this runs out.
PATIENT = 20.0


async def _round_trip(transport: Transport, topic: str) -> None:
    got = Collector()
    await transport.subscribe(topic, got)
    await transport.publish(topic, CloudEvent.create(source="/auth", type="t", data=1))
    await got.wait_for(1, within=10)


async def _refused(make: Callable[[], Transport], match: str) -> ConfigurationError:
    """connect() raises one ConfigurationError matching `match`, not a transient error."""
    transport = make()
    try:
        with pytest.raises(ConfigurationError, match=match) as info:
            await transport.connect()
    finally:
        await transport.disconnect()
    assert not isinstance(info.value, TransientError)
    assert transport.statistics().state is not TransportState.CONNECTED
    return info.value


async def _delivers_and_survives_a_restart(server: NatsServer, url: str) -> None:
    """Core, JetStream and HA (from `url`) deliver; a restart re-authenticates (new nonce)."""
    option: dict[str, object] = (
        {"nkeys_seed": server.nkey_seed_file}
        if server.auth == "nkey"
        else {"user_credentials": server.creds_file}
    )
    async with NatsCoreTransport([server.url], **option) as core:  # type: ignore[arg-type]
        await _round_trip(core, "auth/core")
    async with JetStreamTransport([server.url], **option) as js:  # type: ignore[arg-type]
        await _round_trip(js, "auth/js")
    async with create_transport(url) as ha:
        await _round_trip(ha, "auth/ha")
        await restart_and_reconnect(ha, server)
        await _round_trip(ha, "auth/ha-after-restart")


async def test_nkey_seed_file_authenticates(server_launcher: ServerLauncher) -> None:
    """A server that admits one nkey user: its seed file (option or URL) connects, delivers
    and reconnects after a restart."""
    server = await asyncio.to_thread(server_launcher.start, NatsServer(auth="nkey", jetstream=True))
    assert server.nkey_seed_file is not None
    await _delivers_and_survives_a_restart(
        server, f"{server.url}?nkeys_seed={server.nkey_seed_file}"
    )


async def test_creds_file_authenticates(server_launcher: ServerLauncher) -> None:
    """An operator-mode server (JWTs): the user's .creds file (option or URL) connects,
    delivers through JetStream too, and reconnects after a restart."""
    server = await asyncio.to_thread(server_launcher.start, NatsServer(auth="jwt", jetstream=True))
    assert server.creds_file is not None
    url = f"{server.url}?user_credentials={server.creds_file}"
    await _delivers_and_survives_a_restart(server, url)


async def test_wrong_nkey_or_creds_is_one_clear_error(
    server_launcher: ServerLauncher, tmp_path: Path
) -> None:
    """Another identity, none, a missing file or a malformed one: each is one
    ConfigurationError naming the file (never a retry until connect_timeout), bare or
    through HATransport."""
    nkey = await asyncio.to_thread(server_launcher.start, NatsServer(auth="nkey", jetstream=False))
    jwt = await asyncio.to_thread(server_launcher.start, NatsServer(auth="jwt", jetstream=True))
    stranger_seed = make_nkey_user(tmp_path).seed_file  # a user no server knows
    stranger_creds = make_operator_auth(tmp_path).creds_file  # of an operator no server trusts
    missing = tmp_path / "missing.nk"
    t = f"&connect_timeout={PATIENT}"
    refused = "refused the credentials"
    for make, match in [
        (lambda: _core(nkey, nkeys_seed=stranger_seed), f"{refused}.*nkeys_seed=.*user.nk"),
        (lambda: create_transport(f"{nkey.url}?mode=core&nkeys_seed={stranger_seed}{t}"), refused),
        (lambda: _core(nkey), f"{refused}.*none were given"),
        (lambda: create_transport(f"{jwt.url}?user_credentials={stranger_creds}{t}"), refused),
        (lambda: _core(jwt, user_credentials=stranger_creds), f"{refused}.*user.creds"),
        (lambda: _core(jwt, nkeys_seed=stranger_seed), refused),
        (lambda: _core(nkey, nkeys_seed=missing), "missing.nk.*cannot read"),
        (lambda: create_transport(f"{jwt.url}?user_credentials={missing}{t}"), "cannot read"),
        # A seed file given as .creds: nats-py would read it forever looking for the JWT.
        (lambda: _core(jwt, user_credentials=stranger_seed), "not a .creds"),
        (lambda: _core(nkey, nkeys_seed=stranger_creds), "user's nkey seed"),
    ]:
        await _refused(make, match)


def _core(server: NatsServer, **options: object) -> NatsCoreTransport:
    return NatsCoreTransport([server.url], connect_timeout=PATIENT, **options)  # type: ignore[arg-type]


async def test_tls_with_the_wrong_ca_is_one_clear_error(
    server_launcher: ServerLauncher, tmp_path: Path
) -> None:
    """A server whose certificate comes from another CA than the one trusted (as a file, a
    context or the system's), or a wrong hostname: one ConfigurationError naming TLS
    certificate verification, not a retry until connect_timeout, bare or through HA."""
    server = await asyncio.to_thread(server_launcher.nats, jetstream=True, tls=True)
    other_ca = str(make_test_certificates(tmp_path).ca_file)
    right_ca = str(server.ca_file)
    match = "TLS certificate verification of the server failed"
    for make in [
        lambda: NatsCoreTransport([server.url], tls_ca_file=other_ca, connect_timeout=PATIENT),
        lambda: JetStreamTransport(
            [server.url], tls=ssl.create_default_context(cafile=other_ca), connect_timeout=PATIENT
        ),
        lambda: NatsCoreTransport([server.url], connect_timeout=PATIENT),  # system CAs
        lambda: create_transport(f"{server.url}?tls_ca_file={other_ca}&connect_timeout={PATIENT}"),
        lambda: NatsCoreTransport(
            [server.url],
            tls_ca_file=right_ca,
            tls_hostname="other.example",
            connect_timeout=PATIENT,
        ),
    ]:
        await _refused(make, match)
    # The right CA, from the URL: connects.
    async with create_transport(f"{server.url}?tls_ca_file={right_ca}") as ha:
        await _round_trip(ha, "auth/tls")


async def test_a_certificate_that_stops_verifying_is_retried_and_disconnect_finishes(
    server_launcher: ServerLauncher, tmp_path: Path
) -> None:
    """After the first connect, a server restarted with a certificate of another CA is
    retried (its certificate may be fixed: the client reconnects once it is), and
    disconnect() finishes while the last attempt failed its TLS handshake."""
    server = await asyncio.to_thread(server_launcher.nats, jetstream=False, tls=True)
    files = server.tls_files
    assert files is not None
    kept = tmp_path / "kept"
    kept.mkdir()
    originals = [files.ca_file, files.cert_file, files.key_file]
    for path in originals:
        shutil.copy2(path, kept / path.name)

    async def restart_with(certificates: str) -> None:
        def swap() -> None:
            server.kill()
            for path in originals:
                path.unlink()
                if certificates == "original":
                    shutil.copy2(kept / path.name, path)
            server.start()  # "new": a fresh CA is made on start

        await asyncio.to_thread(swap)

    async def statistics() -> TransportStatistics:
        return transport.statistics()

    async def failed_reconnects() -> tuple[int, str]:
        extra = transport.statistics().extra or {}
        return extra["reconnect_attempts"], str(extra["last_error"])

    async def refused_by_tls() -> None:
        """Restart with a new CA; return once a reconnect attempt failed its handshake."""
        before, _ = await failed_reconnects()
        await restart_with("new")
        await eventually(
            failed_reconnects,
            lambda seen: seen[0] > before and "CERTIFICATE_VERIFY_FAILED" in seen[1],
            what="a reconnect refused by TLS",
        )

    transport = NatsCoreTransport([server.url], tls_ca_file=str(files.ca_file), reconnect_wait=0.1)
    await transport.connect()
    try:
        await refused_by_tls()
        assert transport.statistics().state is TransportState.RECONNECTING
        await restart_with("original")
        await eventually(
            statistics,
            lambda stats: stats.state is TransportState.CONNECTED,
            what="reconnected once the certificate verifies again",
        )
        await _round_trip(transport, "auth/tls-back")
        await refused_by_tls()
    finally:
        await transport.disconnect()  # hung for good before (see _liveness.close_client)
    assert transport.statistics().state is TransportState.DISCONNECTED
