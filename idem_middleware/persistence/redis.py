"""RedisPersistenceLayer: records in Redis, one hash per key, claimed and fenced by Lua scripts.

Each record is one Redis hash whose fields mirror the DynamoDB attributes (``status``,
``expiration``, ``in_progress_expiration``, ``data``, ``validation``, ``lease_id``). Every
operation touches that one key only, so the layout also satisfies Redis Cluster's single-slot
rule for scripts. The claim is a Lua script that creates the record, takes over a dead one, or
returns the live one it found, in one round trip; completion, lease renewal and release are Lua
compare-and-set operations on the status and the lease (``lease_id`` and
``in_progress_expiration``; a record written before lease ids existed has no ``lease_id`` and is
fenced on ``in_progress_expiration`` alone). Keys carry a native expiry, so Redis itself
discards old records.

"Now" is passed into every script from the layer's clock (never Redis ``TIME``), so the expiry
logic is the same as the other layers' and tests can move time.

Under ASGI the layer runs on the event loop through redis-py's asyncio client (``native_async``):
the same scripts, one asyncio client per event loop, and no worker thread per store call; WSGI
and the CLI use the blocking client. A ``RedisCluster`` client (blocking or asyncio) works as is:
each script touches exactly one key, hence one hash slot.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript, Script
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
    TimeoutError,
)
from redis.retry import Retry

from idem_middleware.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreRecordUnreadableError,
    StoreUnreachableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord

DEFAULT_URL = "redis://localhost:6379/0"

# KEYS[1] record key. ARGV: now (s), now (ms), INPROGRESS, status, expiration,
# in_progress_expiration, validation ("" for none), ttl (ms), lease id ("" for none).
# Returns nil when the claim succeeded, else the live record as a flat field/value list.
_CLAIM_SCRIPT = """
local existing = redis.call('HGETALL', KEYS[1])
if #existing > 0 then
  local fields = {}
  for i = 1, #existing, 2 do fields[existing[i]] = existing[i + 1] end
  local expiration = tonumber(fields['expiration'])
  local lease = tonumber(fields['in_progress_expiration'])
  local expired = expiration ~= nil and expiration < tonumber(ARGV[1])
  local lease_expired = fields['status'] == ARGV[3] and lease ~= nil
    and lease < tonumber(ARGV[2])
  if not expired and not lease_expired then
    return existing
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'expiration', ARGV[5],
           'in_progress_expiration', ARGV[6])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'validation', ARGV[7])
end
if ARGV[9] ~= '' then
  redis.call('HSET', KEYS[1], 'lease_id', ARGV[9])
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return false
"""

# KEYS[1] record key. ARGV: INPROGRESS, lease token, status, expiration, data ("" with
# ARGV[6] == "0" for none), has data ("1"/"0"), validation ("" for unchanged), ttl (ms),
# lease id ("" for a lease without one).
# Returns 1 when the record was completed, 0 when the lease is no longer held.
_COMPLETE_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'status', 'in_progress_expiration', 'lease_id')
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] or (current[3] or '') ~= ARGV[9] then
  return 0
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'expiration', ARGV[4])
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'data', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'data')
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'validation', ARGV[7])
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return 1
"""

# KEYS[1] record key. ARGV: INPROGRESS, in_progress_expiration, lease id ("" for none),
# renewed in_progress_expiration, renewed expiration, ttl (ms).
# Returns 1 when renewed, 0 when the lease is no longer held.
_RENEW_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'status', 'in_progress_expiration', 'lease_id')
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] or (current[3] or '') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], 'in_progress_expiration', ARGV[4], 'expiration', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# KEYS[1] record key. ARGV: INPROGRESS, in_progress_expiration, lease id ("" for none).
# Returns 1 when deleted, 0 when the lease is not held.
_RELEASE_SCRIPT = """
local current = redis.call('HMGET', KEYS[1], 'status', 'in_progress_expiration', 'lease_id')
if current[1] ~= ARGV[1] or current[2] ~= ARGV[2] or (current[3] or '') ~= ARGV[3] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""


#: The blocking clients the layer accepts, and their asyncio counterparts.
RedisClient: TypeAlias = "redis.Redis | redis.RedisCluster"
AsyncRedisClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.RedisCluster"


class _AsyncRedis:
    """An asyncio client for one event loop, the layer's scripts registered on it, and the
    batching of their calls.

    The script calls made during one turn of the event loop go to Redis as one pipeline: under
    load, the claims and completions of many requests share a round trip and redis-py's cost
    per command (a pipeline of eight costs a third as much per command), while a lone call waits
    for nothing but the end of the current turn. Each call keeps its own answer or error. A
    Redis Cluster client calls each script directly (the keys live on different nodes).
    """

    def __init__(self, client: AsyncRedisClient) -> None:
        self.client = client
        self.claim = client.register_script(_CLAIM_SCRIPT)
        self.complete = client.register_script(_COMPLETE_SCRIPT)
        self.renew = client.register_script(_RENEW_SCRIPT)
        self.release = client.register_script(_RELEASE_SCRIPT)
        self._batches = not isinstance(client, redis.asyncio.RedisCluster)
        self._pending: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # strong references to running batches
        self._loading: asyncio.Future[Any] | None = None
        self._loaded = False

    def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Awaitable[Any]:
        """Run ``script``; the awaitable gives its reply or raises its Redis error."""
        if not self._batches:
            return self._call_directly(script, keys, args)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((script, keys, args, future))
        if len(self._pending) == 1:
            # A task's first step runs after the callbacks already due in this turn of the
            # loop: the calls they make join this batch.
            task = loop.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        return future

    async def _call_directly(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if not self._loaded:
            await self._load_scripts()
        return await script(keys=keys, args=args)

    async def _load_scripts(self) -> None:
        """Load the scripts on every node once, before the first call: the concurrent first
        calls of a fresh Redis Cluster would each find a script missing and load it, a race
        redis-py's asyncio cluster client does not survive. One load serves them all; one that
        failed (the cluster is down) is tried again by the next call.
        """
        loading = self._loading
        if loading is None:
            loading = self._loading = asyncio.ensure_future(
                asyncio.gather(
                    *(
                        self.client.script_load(script.script)
                        for script in (self.claim, self.complete, self.renew, self.release)
                    )
                )
            )
        try:
            await asyncio.shield(loading)
        except BaseException:
            if loading.done() and self._loading is loading:
                self._loading = None
            raise
        self._loaded = True

    async def _send(self) -> None:
        batch, self._pending = self._pending, []
        try:
            if len(batch) == 1:
                script, keys, args, _ = batch[0]
                results: list[Any] = [await _reply(script(keys=keys, args=args))]
            else:
                pipeline = self.client.pipeline(transaction=False)
                for script, keys, args, _ in batch:
                    pipeline.evalsha(script.sha, len(keys), *keys, *args)
                results = await pipeline.execute(raise_on_error=False)
                for index, result in enumerate(results):
                    if isinstance(result, NoScriptError):  # the server lost its scripts
                        script, keys, args, _ = batch[index]
                        results[index] = await _reply(script(keys=keys, args=args))
        except BaseException as exc:  # the connection failed, or the loop is shutting down
            for *_, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


async def _reply(call: Awaitable[Any]) -> Any:
    """A call's reply, or the Redis error it failed with (as a pipeline reports errors)."""
    try:
        return await call
    except RedisError as exc:
        return exc


class RedisPersistenceLayer(BasePersistenceLayer):
    """Records in Redis, one hash per idempotency key.

    Pass ``url`` (``redis://``, ``rediss://``, ``unix://``) to build a client with short socket
    timeouts and a short retry (a command whose reply was lost is resent; the claim recognises
    its own record), or a ready ``client`` (e.g. a Sentinel ``master_for`` client;
    ``decode_responses`` either way). ``cluster=True`` makes the ``url`` name a node of a Redis
    Cluster; a ready ``redis.RedisCluster`` works as ``client``.

    Under ASGI the store calls run on the event loop through an asyncio client: with ``url``,
    the layer builds one per event loop with the same options; with ``client``, pass its asyncio
    counterpart as ``async_client`` (``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``),
    or the calls run in worker threads. ``key_namespace`` is put before every stored key, e.g.
    ``"myapp:"``; records are otherwise stored under the idempotency key itself, which already
    starts with the configured key prefix.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: RedisClient | None = None,
        async_client: AsyncRedisClient | None = None,
        cluster: bool = False,
        key_namespace: str = "",
        socket_timeout_seconds: float = 2.0,
        socket_connect_timeout_seconds: float = 2.0,
    ) -> None:
        super().__init__()
        if url is not None and client is not None:
            raise ValueError("pass either url or client, not both")
        if cluster and client is not None:
            raise ValueError("cluster: applies to url; pass a redis.RedisCluster as client")
        self._new_async_client: Callable[[], AsyncRedisClient] | None = None
        if client is None:
            url = url or DEFAULT_URL
            options: dict[str, Any] = {
                "socket_timeout": socket_timeout_seconds,
                "socket_connect_timeout": socket_connect_timeout_seconds,
            }
            # redis-py's default retry backs off up to seconds per attempt: a request would
            # wait that long for its 503 when the server is down.
            backoff = ExponentialWithJitterBackoff(cap=0.2, base=0.02)
            blocking = redis.RedisCluster if cluster else redis.Redis
            client = blocking.from_url(url, retry=Retry(backoff, 2), **options)
            asynchronous = redis.asyncio.RedisCluster if cluster else redis.asyncio.Redis
            self._new_async_client = lambda: asynchronous.from_url(
                url, retry=redis.asyncio.retry.Retry(backoff, 2), **options
            )
        self.client: RedisClient = client
        self.async_client = async_client
        #: Whether store calls can run on the event loop (an asyncio client is at hand).
        self.native_async = async_client is not None or self._new_async_client is not None
        self.key_namespace = key_namespace
        self._claim: Script = client.register_script(_CLAIM_SCRIPT)
        self._complete: Script = client.register_script(_COMPLETE_SCRIPT)
        self._renew: Script = client.register_script(_RENEW_SCRIPT)
        self._release: Script = client.register_script(_RELEASE_SCRIPT)
        self._given_async = None if async_client is None else _AsyncRedis(async_client)
        # An asyncio client serves the event loop it was first used on: one per loop, dropped
        # with its loop. The last one used is kept at hand, as a server runs one loop.
        self._async_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncRedis] = (
            weakref.WeakKeyDictionary()
        )
        self._last_async: tuple[asyncio.AbstractEventLoop | None, _AsyncRedis | None] = (
            None,
            None,
        )

    def redis_key(self, idempotency_key: str) -> str:
        """The Redis key a record is stored under."""
        return f"{self.key_namespace}{idempotency_key}"

    def async_redis(self) -> _AsyncRedis:
        """The asyncio client (and its scripts) for the running event loop."""
        if self._given_async is not None:
            return self._given_async
        loop = asyncio.get_running_loop()
        last_loop, last = self._last_async
        if last_loop is loop and last is not None:
            return last
        scripts = self._async_by_loop.get(loop)
        if scripts is None:
            if self._new_async_client is None:
                raise RuntimeError("this RedisPersistenceLayer has no asyncio client")
            scripts = _AsyncRedis(self._new_async_client())
            self._async_by_loop[loop] = scripts
        self._last_async = (loop, scripts)
        return scripts

    async def aclose(self) -> None:
        """Close the asyncio client this layer built for the running event loop, if any
        (a client passed in as ``async_client`` is its owner's to close).
        """
        loop = asyncio.get_running_loop()
        scripts = self._async_by_loop.pop(loop, None)
        if self._last_async[0] is loop:
            self._last_async = (None, None)
        if scripts is not None:
            await scripts.client.aclose()

    # Primitives: each builds its call, makes it blocking or awaited, and reads its answer ------

    def _put_record(self, data_record: DataRecord) -> None:
        keys, args = self._claim_call(data_record)
        try:
            existing = self._claim(keys=keys, args=args)
        except RedisError as exc:
            self._raise_store_error("claim", exc)
        self._claimed(data_record, existing)

    async def _aput_record(self, data_record: DataRecord) -> None:
        keys, args = self._claim_call(data_record)
        scripts = self.async_redis()
        existing = await self._awaited("claim", scripts.call(scripts.claim, keys, args))
        self._claimed(data_record, existing)

    def _claim_call(self, data_record: DataRecord) -> tuple[list[str], list[Any]]:
        now = self.clock()
        return [self.redis_key(data_record.idempotency_key)], [
            int(now),
            int(now * 1000),
            STATUS_INPROGRESS,
            data_record.status,
            _number(data_record.expiry_timestamp),
            _number(data_record.in_progress_expiry_timestamp),
            data_record.payload_hash or "",
            self._ttl_ms(data_record, now),
            data_record.lease_id or "",
        ]

    def _claimed(self, data_record: DataRecord, existing: Any) -> None:
        if existing is not None:
            fields = dict(zip(existing[0::2], existing[1::2], strict=True))
            raise IdempotencyItemAlreadyExistsError(
                self._to_record(data_record.idempotency_key, fields)
            )

    def _get_record(self, idempotency_key: str) -> DataRecord:
        try:
            fields: dict[Any, Any] = self.client.hgetall(self.redis_key(idempotency_key))
        except RedisError as exc:
            self._raise_store_error("HGETALL", exc)
        return self._read(idempotency_key, fields)

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        client = self.async_redis().client
        fields = await self._awaited("HGETALL", client.hgetall(self.redis_key(idempotency_key)))
        return self._read(idempotency_key, fields)

    def _read(self, idempotency_key: str, fields: dict[Any, Any]) -> DataRecord:
        if not fields:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._to_record(idempotency_key, fields)

    def _update_record(self, data_record: DataRecord) -> None:
        keys, args = self._complete_call(data_record)
        try:
            completed = self._complete(keys=keys, args=args)
        except RedisError as exc:
            self._raise_store_error("completion", exc)
        _fenced(completed, data_record)

    async def _aupdate_record(self, data_record: DataRecord) -> None:
        keys, args = self._complete_call(data_record)
        scripts = self.async_redis()
        done = await self._awaited("completion", scripts.call(scripts.complete, keys, args))
        _fenced(done, data_record)

    def _complete_call(self, data_record: DataRecord) -> tuple[list[str], list[Any]]:
        return [self.redis_key(data_record.idempotency_key)], [
            STATUS_INPROGRESS,
            _number(data_record.in_progress_expiry_timestamp),
            data_record.status,
            _number(data_record.expiry_timestamp),
            data_record.response_data or "",
            "0" if data_record.response_data is None else "1",
            data_record.payload_hash or "",
            self._ttl_ms(data_record, self.clock()),
            data_record.lease_id or "",
        ]

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        keys, args = self._renew_call(lease, renewed)
        try:
            done = self._renew(keys=keys, args=args)
        except RedisError as exc:
            self._raise_store_error("lease renewal", exc)
        _fenced(done, lease)

    async def _arenew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        keys, args = self._renew_call(lease, renewed)
        scripts = self.async_redis()
        done = await self._awaited("lease renewal", scripts.call(scripts.renew, keys, args))
        _fenced(done, lease)

    def _renew_call(self, lease: DataRecord, renewed: DataRecord) -> tuple[list[str], list[Any]]:
        return [self.redis_key(lease.idempotency_key)], [
            STATUS_INPROGRESS,
            _number(lease.in_progress_expiry_timestamp),
            lease.lease_id or "",
            _number(renewed.in_progress_expiry_timestamp),
            _number(renewed.expiry_timestamp),
            self._ttl_ms(renewed, self.clock()),
        ]

    def _delete_record(self, data_record: DataRecord) -> None:
        keys, args = self._release_call(data_record)
        try:
            released = self._release(keys=keys, args=args)
        except RedisError as exc:
            self._raise_store_error("release", exc)
        _fenced(released, data_record)

    async def _adelete_record(self, data_record: DataRecord) -> None:
        keys, args = self._release_call(data_record)
        scripts = self.async_redis()
        done = await self._awaited("release", scripts.call(scripts.release, keys, args))
        _fenced(done, data_record)

    def _release_call(self, data_record: DataRecord) -> tuple[list[str], list[Any]]:
        return [self.redis_key(data_record.idempotency_key)], [
            STATUS_INPROGRESS,
            _number(data_record.in_progress_expiry_timestamp),
            data_record.lease_id or "",
        ]

    async def _awaited(self, operation: str, call: Awaitable[Any]) -> Any:
        try:
            return await call
        except RedisError as exc:
            self._raise_store_error(operation, exc)

    def _remove_record(self, idempotency_key: str) -> bool:
        try:
            removed: int = self.client.delete(self.redis_key(idempotency_key))
        except RedisError as exc:
            self._raise_store_error("DEL", exc)
        return removed == 1

    def check(self) -> None:
        """PING the server: raises a typed store error naming the server when it cannot serve."""
        try:
            self.client.ping()
        except RedisError as exc:
            self._raise_store_error("PING", exc)

    # Records ------------------------------------------------------------------------------

    @staticmethod
    def _ttl_ms(data_record: DataRecord, now: float) -> int:
        """Milliseconds until the record expires, as the layer's clock sees it.

        A record is live through the whole second ``expiry_timestamp``, so Redis drops the key
        at the start of the next one. The TTL is relative to the layer's clock rather than an
        absolute PEXPIREAT, so a skew between this host's clock and the Redis server's cannot
        make a live record vanish early.
        """
        if data_record.expiry_timestamp is None:
            raise ValueError("a Redis idempotency record needs an expiry_timestamp")
        return max(1, (data_record.expiry_timestamp + 1) * 1000 - int(now * 1000))

    def _to_record(self, idempotency_key: str, fields: dict[Any, Any]) -> DataRecord:
        try:
            text = {_text(name): _text(value) for name, value in fields.items()}
            expiration = text.get("expiration")
            in_progress = text.get("in_progress_expiration")
            return DataRecord(
                idempotency_key=idempotency_key,
                status=text.get("status", ""),
                expiry_timestamp=int(expiration) if expiration else None,
                in_progress_expiry_timestamp=int(in_progress) if in_progress else None,
                response_data=text.get("data"),
                payload_hash=text.get("validation") or None,
                lease_id=text.get("lease_id") or None,
            )
        except (ValueError, IdempotencyInvalidStatusError) as exc:
            # A record this version cannot read is a store fault (503), never a 500.
            raise StoreRecordUnreadableError(
                f"unreadable idempotency record at Redis key "
                f"{self.redis_key(idempotency_key)!r} on {self._server()}: {exc}"
            ) from exc

    def _server(self) -> str:
        if isinstance(self.client, redis.RedisCluster):
            node = self.client.get_default_node()  # type: ignore[no-untyped-call]
            return f"Redis Cluster node {node.name}" if node is not None else "Redis Cluster"
        kwargs = self.client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    def _raise_store_error(self, operation: str, exc: RedisError) -> NoReturn:
        message = f"Redis {operation} on {self._server()} failed: {exc}"
        # AuthenticationError is a ConnectionError in redis-py: test it first.
        if isinstance(exc, AuthenticationError | AuthorizationError) or (
            isinstance(exc, ResponseError)
            and str(exc).startswith(("NOAUTH", "NOPERM", "WRONGPASS"))
        ):
            raise StoreNotAuthorisedError(
                f"{message}; set the username and password in the URL "
                "(redis://user:password@host:port/db) or the client's credentials"
            ) from exc
        if isinstance(exc, ConnectionError | TimeoutError):
            raise StoreUnreachableError(
                f"{message}; check that Redis is running and the URL's host and port"
            ) from exc
        raise IdempotencyPersistenceLayerError(message) from exc


def _fenced(done: Any, record: DataRecord) -> None:
    """A fenced script's answer: 1 when it wrote, 0 when the lease is no longer held."""
    if done != 1:
        raise IdempotencyLeaseLostError(record.idempotency_key)


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
