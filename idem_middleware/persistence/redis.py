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
"""

from __future__ import annotations

from typing import Any, NoReturn

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import Script
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ConnectionError,
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


class RedisPersistenceLayer(BasePersistenceLayer):
    """Records in Redis, one hash per idempotency key.

    Pass ``url`` (``redis://``, ``rediss://``, ``unix://``) to build a client with short socket
    timeouts and a short retry (a command whose reply was lost is resent; the claim recognises
    its own record), or a ready ``client`` (e.g. a Sentinel ``master_for`` client;
    ``decode_responses`` either way). ``key_namespace`` is put before every stored key, e.g.
    ``"myapp:"``; records are otherwise stored under the idempotency key itself, which already
    starts with the configured key prefix.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        key_namespace: str = "",
        socket_timeout_seconds: float = 2.0,
        socket_connect_timeout_seconds: float = 2.0,
    ) -> None:
        super().__init__()
        if url is not None and client is not None:
            raise ValueError("pass either url or client, not both")
        if client is None:
            client = redis.Redis.from_url(
                url or DEFAULT_URL,
                socket_timeout=socket_timeout_seconds,
                socket_connect_timeout=socket_connect_timeout_seconds,
                # redis-py's default retry backs off up to seconds per attempt: a request would
                # wait that long for its 503 when the server is down.
                retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.02), 2),
            )
        self.client = client
        self.key_namespace = key_namespace
        self._claim: Script = client.register_script(_CLAIM_SCRIPT)
        self._complete: Script = client.register_script(_COMPLETE_SCRIPT)
        self._renew: Script = client.register_script(_RENEW_SCRIPT)
        self._release: Script = client.register_script(_RELEASE_SCRIPT)

    def redis_key(self, idempotency_key: str) -> str:
        """The Redis key a record is stored under."""
        return f"{self.key_namespace}{idempotency_key}"

    # Primitives ---------------------------------------------------------------------------

    def _put_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        try:
            existing = self._claim(
                keys=[self.redis_key(data_record.idempotency_key)],
                args=[
                    int(now),
                    int(now * 1000),
                    STATUS_INPROGRESS,
                    data_record.status,
                    _number(data_record.expiry_timestamp),
                    _number(data_record.in_progress_expiry_timestamp),
                    data_record.payload_hash or "",
                    self._ttl_ms(data_record, now),
                    data_record.lease_id or "",
                ],
            )
        except RedisError as exc:
            self._raise_store_error("claim", exc)
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
        if not fields:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._to_record(idempotency_key, fields)

    def _update_record(self, data_record: DataRecord) -> None:
        now = self.clock()
        try:
            completed = self._complete(
                keys=[self.redis_key(data_record.idempotency_key)],
                args=[
                    STATUS_INPROGRESS,
                    _number(data_record.in_progress_expiry_timestamp),
                    data_record.status,
                    _number(data_record.expiry_timestamp),
                    data_record.response_data or "",
                    "0" if data_record.response_data is None else "1",
                    data_record.payload_hash or "",
                    self._ttl_ms(data_record, now),
                    data_record.lease_id or "",
                ],
            )
        except RedisError as exc:
            self._raise_store_error("completion", exc)
        if completed != 1:
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        try:
            done = self._renew(
                keys=[self.redis_key(lease.idempotency_key)],
                args=[
                    STATUS_INPROGRESS,
                    _number(lease.in_progress_expiry_timestamp),
                    lease.lease_id or "",
                    _number(renewed.in_progress_expiry_timestamp),
                    _number(renewed.expiry_timestamp),
                    self._ttl_ms(renewed, self.clock()),
                ],
            )
        except RedisError as exc:
            self._raise_store_error("lease renewal", exc)
        if done != 1:
            raise IdempotencyLeaseLostError(lease.idempotency_key)

    def _delete_record(self, data_record: DataRecord) -> None:
        try:
            released = self._release(
                keys=[self.redis_key(data_record.idempotency_key)],
                args=[
                    STATUS_INPROGRESS,
                    _number(data_record.in_progress_expiry_timestamp),
                    data_record.lease_id or "",
                ],
            )
        except RedisError as exc:
            self._raise_store_error("release", exc)
        if released != 1:
            raise IdempotencyLeaseLostError(data_record.idempotency_key)

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


def _number(value: int | None) -> str:
    return "" if value is None else str(value)


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
