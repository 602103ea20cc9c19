"""No credential of a NATS transport shows anywhere a user may look or send a log: its
statistics, its repr, the text of the errors it raises, and what loom-ha and nats-py log.
Passwords and tokens; nkey seeds and JWTs, which loom-ha only ever names by their file.

The credentials of a server URL (``nats://user:password@host``, ``nats://token@host``) are
taken out of it once, when the options are built (`loom_ha.nats.options`); every later use
of the URL is of the plain one.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loom_ha.config import create_transport
from loom_ha.errors import ConfigurationError, ConnectionLostError, LoomHAError
from loom_ha.event import CloudEvent
from loom_ha.nats import JetStreamTransport, NatsCoreTransport, NatsOptions
from loom_ha.testing._nats_auth import make_nkey_user, make_operator_auth
from loom_ha.testing.collect import Collector
from loom_ha.testing.nats_servers import NatsServer
from loom_ha.testing.plugin import ServerLauncher
from loom_ha.testing.servers import free_port
from loom_ha.transport import Transport

from ._restart import restart_and_reconnect

pytestmark = pytest.mark.nats

MARK = "SECRET"
"""Every secret below contains it, in plain and in percent-encoded form alike."""
PASSWORD = "pa55:W\u00f6rd/SECRET"  # needs percent-encoding in a URL
TOKEN = "t0ken-SECRET"
WRONG = "wr0ng-SECRET"


def _texts_of(transport: Transport) -> list[str]:
    """What a user sees of a transport: repr, statistics, inner transport and its options."""
    seen = [repr(transport), str(transport.statistics()), repr(transport.statistics())]
    inner: Any = getattr(transport, "inner", transport)
    seen += [repr(inner), repr(getattr(inner, "options", None))]
    return seen


def _error_texts(exc: BaseException) -> list[str]:
    """str, repr and the whole formatted traceback (causes included)."""
    return [str(exc), repr(exc), "".join(traceback.format_exception(exc))]


async def _round_trip(transport: Transport, topic: str) -> None:
    got = Collector()
    await transport.subscribe(topic, got)
    await transport.publish(topic, CloudEvent.create(source="/secrets", type="t", data=1))
    await got.wait_for(1, within=10)


async def _raises(make: Callable[[], Any], kind: type[LoomHAError]) -> list[str]:
    """Build and connect; the error must be `kind`; returns its texts."""
    transport: Transport | None = None
    try:
        transport = make()
        await transport.connect()
    except kind as exc:
        return _error_texts(exc)
    finally:
        if transport is not None:
            await transport.disconnect()
    raise AssertionError(f"{make} did not raise {kind.__name__}")


async def test_credentials_never_show(
    server_launcher: ServerLauncher, caplog: pytest.LogCaptureFixture
) -> None:
    """User/password and token URLs (and options) on real servers that require them:
    connect, deliver, reconnect after a restart, fail in every way a URL can; the secret is
    in no statistics, repr, exception text or log record."""
    caplog.set_level(logging.DEBUG)  # everything loom-ha and nats-py log
    users: NatsServer = await asyncio.to_thread(
        server_launcher.nats, jetstream=True, user="loom", password=PASSWORD
    )
    tokens: NatsServer = await asyncio.to_thread(server_launcher.nats, jetstream=False, token=TOKEN)
    assert MARK in users.url and MARK in tokens.url  # the URLs do carry the secrets
    plain_users = f"nats://127.0.0.1:{users.port}"
    texts: list[str] = []
    working: list[Callable[[], Transport]] = [
        lambda: create_transport(users.url),  # HATransport over JetStream
        lambda: JetStreamTransport([users.url]),
        lambda: NatsCoreTransport([plain_users], user="loom", password=PASSWORD),
        lambda: create_transport(f"{tokens.url}?mode=core"),
        lambda: NatsCoreTransport([tokens.url]),
    ]
    for n, make in enumerate(working):
        async with make() as transport:
            await _round_trip(transport, f"secrets/{n}")
            texts += _texts_of(transport)
    # A reconnect (with its log lines) to a server that requires the credentials.
    async with create_transport(f"{users.url}?mode=core") as transport:
        await restart_and_reconnect(transport, users)
        await _round_trip(transport, "secrets/after-restart")
        texts += _texts_of(transport)

    wrong_password = f"nats://loom:{WRONG}@127.0.0.1:{users.port}"
    texts += await _raises(lambda: NatsCoreTransport([wrong_password]), ConfigurationError)
    wrong_token = f"nats://{WRONG}@127.0.0.1:{tokens.port}"
    texts += await _raises(lambda: NatsCoreTransport([wrong_token]), ConfigurationError)
    nobody = f"nats://loom:{WRONG}@127.0.0.1:{free_port()}"
    texts += await _raises(
        lambda: NatsCoreTransport([nobody], connect_timeout=1.0), ConnectionLostError
    )
    for bad in (
        [f"nats://loom:{WRONG}@127.0.0.1:99999"],  # bad port
        [f"nats://loom:{WRONG}@127.0.0.1:1/path"],  # a path
        [users.url, f"nats://loom:{WRONG}@127.0.0.1:2"],  # two different passwords
    ):
        texts += await _raises(lambda bad=bad: NatsCoreTransport(bad), ConfigurationError)  # type: ignore[misc]
    for bad_url in (f"{users.url}?ping_interval", f"{users.url}?ping_interval=soon"):
        texts += await _raises(
            lambda bad_url=bad_url: create_transport(bad_url), ConfigurationError
        )  # type: ignore[misc]

    texts += [caplog.text] + [record.getMessage() for record in caplog.records]
    leaks = [text for text in texts if MARK in text]
    assert not leaks, leaks[:3]


@pytest.mark.parametrize(
    ("servers", "options"),
    [
        (["nats://a:SECRET1@h:1", "nats://a:SECRET2@h:2"], {}),  # two passwords
        (["nats://SECRET1@h:1", "nats://a:SECRET2@h:2"], {}),  # a token and a password
        (["nats://a:SECRET1@h:1"], {"token": "SECRET3"}),  # the URL and the options disagree
        (["nats://a:SECRET1@h:1"], {"user": "a", "password": "SECRET4"}),
    ],
)
def test_conflicting_credentials_are_refused_without_repeating_them(
    servers: list[str], options: dict[str, str]
) -> None:
    """Credentials that disagree raise ConfigurationError; its text holds none of them."""
    with pytest.raises(ConfigurationError) as info:
        NatsOptions.build(servers, **options)
    assert MARK not in "".join(_error_texts(info.value))


def test_url_credentials_move_to_the_options() -> None:
    """``user:password@`` and ``token@`` leave the URLs, percent-decoded into the options,
    and apply to every server; the same credentials given twice are fine."""
    users = NatsOptions.build(["nats://loom:p%40ss%3Aw@h:1", "nats://h:2"])
    assert users.servers == ("nats://h:1", "nats://h:2")
    assert (users.user, users.password, users.token) == ("loom", "p@ss:w", None)
    assert "p@ss" not in repr(users)
    tokens = NatsOptions.build("tls://t%2Fk@h:1")
    assert tokens.servers == ("tls://h:1",) and (tokens.user, tokens.token) == (None, "t/k")
    twice = NatsOptions.build(["nats://loom:pw@h:1"], user="loom", password="pw")
    assert (twice.user, twice.password) == ("loom", "pw")


def _creds_secrets(creds: Path) -> list[str]:
    """The user JWT and seed in a .creds file (the line after each BEGIN marker)."""
    lines = creds.read_text().splitlines()
    return [lines[n + 1] for n, line in enumerate(lines) if "-----BEGIN" in line]


async def test_nkey_seeds_and_jwts_never_show(
    server_launcher: ServerLauncher, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """nkey seed and .creds files on servers that require them: connect, deliver, reconnect
    after a restart, fail with a stranger's identity, with a malformed file, and with a seed
    or JWT given where a path belongs; no seed, JWT or JWT signature is in any statistics,
    repr, exception text or log record."""
    caplog.set_level(logging.DEBUG)  # everything loom-ha and nats-py log
    nkey: NatsServer = await asyncio.to_thread(
        server_launcher.start, NatsServer(auth="nkey", jetstream=False)
    )
    jwt: NatsServer = await asyncio.to_thread(
        server_launcher.start, NatsServer(auth="jwt", jetstream=True)
    )
    seed_file, creds_file = nkey.nkey_seed_file, jwt.creds_file
    assert seed_file is not None and creds_file is not None
    stranger_seed = make_nkey_user(tmp_path).seed_file
    stranger_creds = make_operator_auth(tmp_path).creds_file
    seed, user_jwt = seed_file.read_text().strip(), _creds_secrets(creds_file)[0]
    secrets = [seed, stranger_seed.read_text().strip(), *_creds_secrets(creds_file)]
    secrets += _creds_secrets(stranger_creds)
    secrets += [token.rpartition(".")[2] for token in secrets if token.count(".") == 2]
    assert len(secrets) == 8 and all(len(s) > 40 for s in secrets)

    texts: list[str] = []
    working: list[Callable[[], Transport]] = [
        lambda: create_transport(f"{nkey.url}?mode=core&nkeys_seed={seed_file}"),
        lambda: NatsCoreTransport([nkey.url], nkeys_seed=seed_file),
        lambda: JetStreamTransport([jwt.url], user_credentials=creds_file),
    ]
    for n, make in enumerate(working):
        async with make() as transport:
            await _round_trip(transport, f"secrets/nkey/{n}")
            texts += _texts_of(transport)
    async with create_transport(f"{jwt.url}?user_credentials={creds_file}") as transport:
        await _round_trip(transport, "secrets/jwt")
        await restart_and_reconnect(transport, jwt)
        await _round_trip(transport, "secrets/jwt-after-restart")
        texts += _texts_of(transport)

    failing: list[Callable[[], Transport]] = [
        lambda: NatsCoreTransport([nkey.url], nkeys_seed=stranger_seed),
        lambda: create_transport(f"{jwt.url}?user_credentials={stranger_creds}"),
        lambda: NatsCoreTransport([jwt.url], nkeys_seed=stranger_creds),  # not a seed file
        lambda: NatsCoreTransport([nkey.url], nkeys_seed=seed),  # the seed, not its path
        lambda: create_transport(f"{nkey.url}?nkeys_seed={seed}"),
        lambda: NatsCoreTransport([jwt.url], user_credentials=user_jwt),
    ]
    for make in failing:
        texts += await _raises(make, ConfigurationError)

    texts += [caplog.text] + [record.getMessage() for record in caplog.records]
    leaks = [(n, text) for text in texts for n, secret in enumerate(secrets) if secret in text]
    assert not leaks, leaks[:3]
