"""A dedup window shared through a NATS JetStream key-value bucket (for deployments without Redis).

Same contract as `RedisDedup`: a claim is a short, renewed *lease* while the handler runs,
so the claim of an instance that dies mid-handler lapses and a redelivery (or a retry on
another instance) is handled, while a slow but live instance keeps its claim.

One KV entry per event, under a hash of its key (KV keys allow only ``[-/_=.a-zA-Z0-9]``):

- ``run:<deadline>:<owner>`` a lease. `claim` writes it by compare-and-set: on "no entry"
  first, else on the revision it read from the stream leader when that showed a delete
  or a lease whose deadline has passed, so of the instances racing for it exactly one wins.
  One task per window renews every held lease every ``lease / 3`` seconds, again by
  compare-and-set: a failed one means another instance took the lease over.
- ``done`` the handler succeeded (`complete`): a duplicate is dropped until the bucket's
  ``max_age`` removes the entry.
- no entry (or a delete marker): never seen, expired, or released after a failure.

Caveats:
    The lease deadline is wall clock time (``time.time()``) written by the holder and read
    by the others, so the clocks of the machines must agree to well under `lease` (NTP is
    plenty for the 10 s default). The window length is the bucket's ``max_age``: one `ttl`
    per bucket, so windows with another ttl need another bucket name.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Sequence

import nats.js.errors
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from typing_extensions import Unpack

from loom_ha._tasks import TaskSupervisor
from loom_ha.errors import ConfigurationError, TransportClosedError
from loom_ha.nats._errors import map_nats_errors
from loom_ha.nats.connection import ConnectionOptions, NatsConnection, NatsOptions
from loom_ha.retry import within

__all__ = ["NatsDedup"]

log = logging.getLogger("loom_ha.nats.dedup")

BUCKET_READY = within(15.0)
"""How long a new bucket may take to elect its stream leader (an R3 election: seconds)."""

_BUCKET_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
_DONE = b"done"
_RUN = b"run:"
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JSStreamWrongLastSequence(Constant)Err
_STREAM_CONFIG_DIFFERS = 10058  # stream name already in use with a different configuration
_REFUSED = (10074,)  # replicas > 1 not supported in non-clustered mode (a 500)
_MAX_REPLICAS = 5  # JetStream's limit
_ATTEMPTS = 3  # claim: the entry may change between a failed write and the read
_KV_OPERATION = "KV-Operation"  # header of a KV delete marker
_KV_REMOVED = ("DEL", "PURGE")


def _kv_key(key: str) -> str:
    """Any dedup key as a valid KV key (fixed length, only hex digits)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class NatsDedup:
    """A `DedupWindow` shared through the JetStream KV bucket `bucket`; see the module docstring.

    Args:
        servers: ``nats://`` / ``tls://`` URLs of the cluster.
        ttl: how long a completed event is remembered: the bucket's ``max_age``, seconds.
        lease: how long a claim outlives its instance (default: 10 s, or the ttl if shorter).
        bucket: KV bucket name; created on first use if absent.
        replicas: replicas of a bucket this window creates (3 on a cluster survives a node).
        **connect_options: as for the NATS transports (user, password, tls, name, ...).

    The connection is opened on first use, once per window; `close()` ends it.
    """

    def __init__(
        self,
        servers: Sequence[str] | str,
        *,
        ttl: float = 600.0,
        lease: float | None = None,
        bucket: str = "loom_dedup",
        replicas: int = 1,
        **connect_options: Unpack[ConnectionOptions],
    ) -> None:
        if not _is_number(ttl) or not (lease is None or _is_number(lease)):
            raise ConfigurationError(f"dedup ttl and lease must be numbers, got {ttl!r}, {lease!r}")
        lease = min(10.0, ttl) if lease is None else lease
        if ttl <= 0 or lease <= 0 or lease > ttl:
            raise ConfigurationError(
                f"dedup needs ttl > 0 and 0 < lease <= ttl, got ttl={ttl}, lease={lease}"
            )
        if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
            raise ConfigurationError(f"dedup bucket {bucket!r}: use only letters, digits, - and _")
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise ConfigurationError(f"dedup replicas must be an int, got {replicas!r}")
        if not 1 <= replicas <= _MAX_REPLICAS:
            raise ConfigurationError(f"dedup replicas must be 1..{_MAX_REPLICAS}, got {replicas}")
        connect_options.setdefault("name", "loom-ha-dedup")
        self.ttl = float(ttl)
        self.lease = float(lease)
        self.bucket = bucket
        self.replicas = replicas
        self.options = NatsOptions.build(servers, **connect_options)
        # Written into our leases: an entry carrying it is ours whatever its revision says
        # (e.g. a renewal that timed out on our side but was stored).
        self._owner = uuid.uuid4().hex.encode()
        self._held: dict[str, int] = {}  # KV key -> revision of our lease
        self._conn: NatsConnection | None = None
        self._kv: KeyValue | None = None
        self._api: JetStreamContext | None = None  # for reads from the stream leader
        self._connecting = asyncio.Lock()
        self._closed = False
        self._tasks = TaskSupervisor("nats-dedup")
        self._renewer: asyncio.Task[None] | None = None

    # -- DedupWindow ---------------------------------------------------------------------

    async def claim(self, key: str) -> bool:
        """True if this window now holds `key`'s lease (the caller runs the handler).

        Raises:
            ConnectionLostError: NATS is (temporarily) unreachable (a claim stored anyway
                lapses after `lease`).
            TransportClosedError: the window was closed.
        """
        kv = await self._bucket()
        name = _kv_key(key)
        expected = 0  # no entry yet; else the revision last read (a lapsed lease, a delete)
        with map_nats_errors(what=f"nats dedup: claim in {self.bucket}"):
            for _ in range(_ATTEMPTS):
                try:  # compare-and-set: of the instances writing it, exactly one wins
                    revision = await kv.update(name, self._lease_value(), last=expected)
                except nats.js.errors.KeyWrongLastSequenceError:
                    value, expected = await self._read(name)
                    if value is not None and not self._lapsed(value):
                        return False  # held (or done) by someone
                    continue  # absent, deleted or lapsed at `expected`: write over it
                self._hold(name, revision)
                return True
        return False  # the entry kept changing under us: someone else is busy with it

    async def complete(self, key: str) -> None:
        """Mark `key` handled; duplicates are dropped until the bucket's ``max_age`` passes.

        Written unconditionally: even if another instance took a lapsed lease over, the event
        *was* handled, and saying so stops further copies.
        """
        name = _kv_key(key)
        self._held.pop(name, None)
        kv = await self._bucket()
        with map_nats_errors(what=f"nats dedup: complete in {self.bucket}"):
            await kv.put(name, _DONE)

    async def release(self, key: str) -> None:
        """Delete our lease on `key` so a redelivery is handled at once.

        A lease we no longer hold (taken over after it lapsed) is left to its new owner.
        """
        name = _kv_key(key)
        revision = self._held.pop(name, None)
        if revision is None:
            return
        kv = await self._bucket()
        with map_nats_errors(what=f"nats dedup: release in {self.bucket}"):
            for _ in range(_ATTEMPTS):
                try:
                    await kv.delete(name, last=revision)
                    return
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code not in _WRONG_LAST_SEQUENCE:
                        raise
                # Changed since: a renewal racing with us moved the revision, or it is gone.
                value, revision = await self._read(name)
                if not self._ours(value):
                    return

    async def close(self) -> None:
        """Stop renewing and close the connection; idempotent. Held leases lapse.

        The window stays usable: its next use connects again (an `HATransport` closes
        its window on `disconnect()` and may be connected again).
        """
        self._closed = True  # a connect under way gives its connection up
        try:
            await self._tasks.aclose()
        finally:  # even if cancelled meanwhile: never leave the connection behind
            self._held.clear()
            conn, self._conn, self._kv, self._api = self._conn, None, None, None
            try:
                if conn is not None:
                    await conn.close()
            finally:
                self._closed = False
                self._tasks.reopen()

    # -- leases --------------------------------------------------------------------------

    def _lease_value(self) -> bytes:
        return b"%s%.6f:%s" % (_RUN, time.time() + self.lease, self._owner)

    def _ours(self, value: bytes | None) -> bool:
        """True for a lease this window wrote (whatever its deadline)."""
        return value is not None and value.startswith(_RUN) and value.endswith(b":" + self._owner)

    @staticmethod
    def _lapsed(value: bytes | None) -> bool:
        """True for a lease whose deadline passed; `done` and anything unknown never lapse."""
        if not value or not value.startswith(_RUN):
            return False
        try:
            deadline = float(value[len(_RUN) :].split(b":", 1)[0])
        except ValueError:
            return False
        return deadline < time.time()

    def _hold(self, name: str, revision: int) -> None:
        self._held[name] = revision
        if self._closed:
            return  # closed while claiming: nobody renews, the lease lapses
        if self._renewer is None or self._renewer.done():
            self._renewer = self._tasks.spawn(self._renew_leases(), name="renew-leases")

    async def _renew_leases(self) -> None:
        """Extend every held lease each ``lease / 3`` seconds (concurrent CAS updates)."""
        while True:
            await asyncio.sleep(self.lease / 3)
            kv, held = self._kv, list(self._held.items())
            if kv is None or not held:
                continue
            value = self._lease_value()
            results = await asyncio.gather(
                *(kv.update(name, value, last=revision) for name, revision in held),
                return_exceptions=True,
            )
            lost, failed, error = 0, 0, None
            for (name, revision), result in zip(held, results, strict=True):
                if isinstance(result, nats.js.errors.KeyWrongLastSequenceError):
                    lost += await self._lost(kv, name, revision)
                elif isinstance(result, BaseException):
                    failed, error = failed + 1, result  # NATS away: the next round retries
                elif self._held.get(name) == revision:  # not completed/released meanwhile
                    self._held[name] = result
            if lost:
                log.warning(
                    "nats dedup: %d leases were taken over by another instance "
                    "(renewed later than lease=%ss?)",
                    lost,
                    self.lease,
                )
            if failed:
                log.warning("nats dedup: could not renew %d leases: %r", failed, error)

    async def _lost(self, kv: KeyValue, name: str, revision: int) -> bool:
        """After a failed renewal CAS: True (and forget it) if the lease is someone else's now.

        Still ours if the entry carries our owner token (a write of ours we never saw
        acknowledged moved the revision): adopt its revision then.
        """
        if self._held.get(name) != revision:
            return False  # completed or released meanwhile
        try:
            value, current = await self._read(name)
        except Exception:  # NATS away: decide next round
            return False
        if self._held.get(name) != revision:
            return False
        if self._ours(value):
            self._held[name] = current
            return False
        del self._held[name]
        return True

    async def _read(self, name: str) -> tuple[bytes | None, int]:
        """The entry's value and revision, read from the stream leader; None if deleted.

        Not `kv.get`: the bucket allows direct gets, which any replica may answer, and
        NATS does not promise that a replica has seen our own or another instance's last
        write. A lagging replica would show a released lease as still held, and the
        redelivery it was released for would be dropped as a duplicate.
        """
        try:
            msg = await self._stream_api().get_msg(
                f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{name}", direct=False
            )
        except nats.js.errors.NotFoundError:
            return None, 0
        if (msg.headers or {}).get(_KV_OPERATION) in _KV_REMOVED:
            return None, msg.seq or 0
        return msg.data, msg.seq or 0

    # -- connection ----------------------------------------------------------------------

    async def _bucket(self) -> KeyValue:
        """The bound KV bucket; connects (once, guarded by a lock) on first use."""
        kv = self._kv
        if kv is not None:
            return kv
        async with self._connecting:
            if self._closed:
                raise TransportClosedError("nats dedup: the window was closed")
            if self._kv is not None:
                return self._kv
            conn = NatsConnection(self.options, "nats-dedup")
            await conn.open()
            try:
                api = conn.client.jetstream()
                with map_nats_errors(what=f"nats dedup: bucket {self.bucket}"):
                    kv = await self._open_bucket(api)
                # A replicated bucket just created has no stream leader yet: its first
                # operations would get "no response from stream". Wait until it answers.
                await BUCKET_READY.call(lambda: self._answers(kv))
            except BaseException:
                await conn.close()
                raise
            if self._closed:  # close() ran while we connected
                await conn.close()
                raise TransportClosedError("nats dedup: the window was closed")
            self._conn, self._kv, self._api = conn, kv, api
            return kv

    def _stream_api(self) -> JetStreamContext:
        api = self._api
        if api is None:
            raise TransportClosedError("nats dedup: the window was closed")
        return api

    async def _answers(self, kv: KeyValue) -> None:
        with map_nats_errors(what=f"nats dedup: bucket {self.bucket} status"):
            await kv.status()

    async def _open_bucket(self, js: JetStreamContext) -> KeyValue:
        """Create the bucket, or bind it if it exists with our ttl (its ``max_age``)."""
        try:
            return await js.create_key_value(
                bucket=self.bucket,
                description="loom-ha dedup window",
                ttl=self.ttl,
                history=1,
                replicas=self.replicas,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_CONFIG_DIFFERS:
                pass  # exists: bind it below
            elif isinstance(exc, nats.js.errors.BadRequestError) or exc.err_code in _REFUSED:
                raise ConfigurationError(
                    f"dedup bucket {self.bucket!r} (replicas={self.replicas}): {exc.description}"
                ) from exc
            else:
                raise  # e.g. 503 while the cluster elects a leader: transient
        # It exists with other settings (another client version, other replicas): fine as
        # long as it keeps entries for our ttl.
        info = await js.stream_info(f"KV_{self.bucket}")
        max_age = info.config.max_age or 0.0
        if abs(max_age - self.ttl) > 1e-3:
            raise ConfigurationError(
                f"dedup bucket {self.bucket!r} keeps entries for {max_age}s, not ttl={self.ttl}s: "
                "use another bucket name for another ttl"
            )
        return await js.key_value(self.bucket)
