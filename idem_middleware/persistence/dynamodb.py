"""DynamoDBPersistenceLayer: the fleet backend, compatible with Powertools' idempotency table.

Same attribute names and defaults as Powertools for AWS Lambda, so a table can be shared or
migrated. The claim is one conditional ``PutItem`` that returns the existing item on collision
(``ReturnValuesOnConditionCheckFailure=ALL_OLD``); completion, lease renewal and release are
conditional on the lease (``in_progress_expiration`` and the extra ``lease_id`` attribute, a
random token per claim), so a request whose lease ran out cannot touch the record of the request
that took over. Items
written without ``lease_id`` (by Powertools or earlier versions) are read, and fenced on
``in_progress_expiration`` alone.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from idem_middleware.exceptions import (
    IdempotencyInvalidStatusError,
    IdempotencyItemAlreadyExistsError,
    IdempotencyItemNotFoundError,
    IdempotencyLeaseLostError,
    IdempotencyPersistenceLayerError,
    StoreNotAuthorisedError,
    StoreNotFoundError,
    StoreRecordUnreadableError,
    StoreRequestRejectedError,
    StoreUnreachableError,
)
from idem_middleware.persistence.base import BasePersistenceLayer
from idem_middleware.persistence.dynamodb_async import (
    CLAIM,
    FINISH,
    AsyncDynamoDB,
    aiobotocore_installed,
)
from idem_middleware.persistence.record import STATUS_INPROGRESS, DataRecord
from idem_middleware.responses import StoredResponse

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_dynamodb.type_defs import AttributeValueTypeDef

logger = logging.getLogger(__name__)

#: DynamoDB's item size limit, less room for attribute names and the other attributes.
MAX_ITEM_BYTES = 400 * 1024
_ITEM_OVERHEAD_BYTES = 2 * 1024
#: Responses smaller than this are stored as plain text: compressing them saves nothing.
COMPRESS_MIN_BYTES = 1024

_CLAIM_CONDITION = (
    "attribute_not_exists(#id) OR #expiry < :now OR "
    "(#status = :inprogress AND attribute_exists(#in_progress_expiry) "
    "AND #in_progress_expiry < :now_in_millis)"
)
_LEASE_CONDITION = (
    "#status = :inprogress AND #in_progress_expiry = :lease AND #lease_id = :lease_id"
)
#: The lease of an item written without a lease id (Powertools, earlier versions).
_LEGACY_LEASE_CONDITION = (
    "#status = :inprogress AND #in_progress_expiry = :lease AND attribute_not_exists(#lease_id)"
)
_NOT_AUTHORISED = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "MissingAuthenticationTokenException",
        "InvalidClientTokenId",
        "IncompleteSignature",
    }
)


class DynamoDBPersistenceLayer(BasePersistenceLayer):
    """Records in a DynamoDB table (one item each), keyed by ``key_attr``.

    With ``sort_key_attr`` the table has a composite key: every record shares the partition key
    ``static_pk_value`` and the idempotency key goes in the sort key (Powertools' layout).
    Pass ``boto3_client`` (e.g. one pointed at DynamoDB Local), or a ``boto3_session`` and
    ``boto_config`` to build one. ``lease_id_attr`` is the one attribute Powertools' table does
    not have (an extra attribute, so the table stays shared-compatible).

    Under ASGI, with aiobotocore installed (the ``dynamodb-async`` extra), the store calls run
    on the event loop through an aiobotocore client built from the boto3 client's region,
    endpoint, config and credentials, one per event loop; ``async_client=False`` keeps them
    in worker threads, ``async_client=True`` insists on aiobotocore.
    """

    #: Store calls in flight per lane under ASGI, in worker threads or on the event loop
    #: (``IdempotencyMiddleware.max_store_threads``, when not set, is this): botocore's request
    #: path is CPU-bound Python, so more calls at once only queue at the GIL, and the event
    #: loop queues behind them (BENCHMARKS.md, section 4). Over a real network, where a call
    #: mostly waits, a higher bound (the ``max_store_threads`` argument) serves more requests.
    max_store_threads: int = 2

    def __init__(
        self,
        table_name: str,
        key_attr: str = "id",
        static_pk_value: str | None = None,
        sort_key_attr: str | None = None,
        expiry_attr: str = "expiration",
        in_progress_expiry_attr: str = "in_progress_expiration",
        status_attr: str = "status",
        data_attr: str = "data",
        validation_key_attr: str = "validation",
        boto_config: Config | None = None,
        boto3_session: boto3.session.Session | None = None,
        boto3_client: DynamoDBClient | None = None,
        lease_id_attr: str = "lease_id",
        async_client: bool | None = None,
        max_store_threads: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(table_name, str) or not table_name:
            raise ValueError(f"table_name must be a non-empty string, got {table_name!r}")
        if max_store_threads is not None:
            if isinstance(max_store_threads, bool) or not isinstance(max_store_threads, int):
                raise TypeError(f"max_store_threads must be an int, got {max_store_threads!r}")
            if max_store_threads < 1:
                raise ValueError(f"max_store_threads must be at least 1, got {max_store_threads}")
            self.max_store_threads = max_store_threads
        _check_attribute_names(
            {
                "key_attr": key_attr,
                "sort_key_attr": sort_key_attr,
                "expiry_attr": expiry_attr,
                "in_progress_expiry_attr": in_progress_expiry_attr,
                "status_attr": status_attr,
                "data_attr": data_attr,
                "validation_key_attr": validation_key_attr,
                "lease_id_attr": lease_id_attr,
            }
        )
        if boto3_client is None:
            session = boto3_session or boto3.session.Session()
            boto3_client = session.client("dynamodb", config=boto_config or Config())
        self.client = boto3_client
        self.table_name = table_name
        self.key_attr = key_attr
        self.static_pk_value = static_pk_value or "idempotency"
        self.sort_key_attr = sort_key_attr
        self.expiry_attr = expiry_attr
        self.in_progress_expiry_attr = in_progress_expiry_attr
        self.status_attr = status_attr
        self.data_attr = data_attr
        self.validation_key_attr = validation_key_attr
        self.lease_id_attr = lease_id_attr
        if async_client is None:
            async_client = aiobotocore_installed()
        elif async_client and not aiobotocore_installed():
            raise ValueError(
                "async_client=True needs aiobotocore: pip install 'idem-middleware[dynamodb-async]'"
            )
        self._async = AsyncDynamoDB(boto3_client, self.max_store_threads) if async_client else None
        #: Whether store calls run on the event loop (through aiobotocore) under ASGI.
        self.native_async = self._async is not None

    # Primitives: each builds its request, sends it blocking or awaited, and reads the answer --

    def _put_record(self, data_record: DataRecord) -> None:
        request = self._claim_request(data_record)
        with self._claiming():
            self.client.put_item(**request)

    async def _aput_record(self, data_record: DataRecord) -> None:
        request = self._claim_request(data_record)
        with self._claiming():
            await self._acall(CLAIM, "put_item", request)

    def _claim_request(self, data_record: DataRecord) -> dict[str, Any]:
        now = self.clock()
        item = self._key(data_record.idempotency_key)
        item[self.expiry_attr] = _number(data_record.expiry_timestamp)
        item[self.status_attr] = {"S": data_record.status}
        item[self.in_progress_expiry_attr] = _number(data_record.in_progress_expiry_timestamp)
        if data_record.payload_hash is not None:
            item[self.validation_key_attr] = {"S": data_record.payload_hash}
        if data_record.lease_id is not None:
            item[self.lease_id_attr] = {"S": data_record.lease_id}
        return {
            "TableName": self.table_name,
            "Item": item,
            "ConditionExpression": _CLAIM_CONDITION,
            "ExpressionAttributeNames": {
                "#id": self.key_attr,
                "#expiry": self.expiry_attr,
                "#in_progress_expiry": self.in_progress_expiry_attr,
                "#status": self.status_attr,
            },
            "ExpressionAttributeValues": {
                ":now": {"N": str(int(now))},
                ":now_in_millis": {"N": str(int(now * 1000))},
                ":inprogress": {"S": STATUS_INPROGRESS},
            },
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    @contextmanager
    def _claiming(self) -> Iterator[None]:
        """A claim: a failed condition is the record another request holds."""
        try:
            yield
        except ClientError as exc:
            if _error_code(exc) == "ConditionalCheckFailedException":
                old_item: dict[str, Any] | None = exc.response.get("Item")  # type: ignore[assignment]
                raise IdempotencyItemAlreadyExistsError(
                    self._item_to_data_record(old_item) if old_item else None
                ) from None
            self._raise_store_error("PutItem", exc)
        except BotoCoreError as exc:
            self._raise_store_error("PutItem", exc)

    def _get_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("GetItem"):
            response = self.client.get_item(**self._get_request(idempotency_key))
        return self._got(idempotency_key, response)

    async def _aget_record(self, idempotency_key: str) -> DataRecord:
        with self._store_errors("GetItem"):
            response = await self._acall(CLAIM, "get_item", self._get_request(idempotency_key))
        return self._got(idempotency_key, response)

    def _get_request(self, idempotency_key: str) -> dict[str, Any]:
        return {
            "TableName": self.table_name,
            "Key": self._key(idempotency_key),
            "ConsistentRead": True,
        }

    def _got(self, idempotency_key: str, response: Any) -> DataRecord:
        item = response.get("Item")
        if item is None:
            raise IdempotencyItemNotFoundError(idempotency_key)
        return self._item_to_data_record(item)

    def _update_record(self, data_record: DataRecord) -> None:
        """Over the item limit even compressed, the response is stored without its body, and
        ``data_record.response_data`` says so: the record this process keeps (and caches) must
        replay what every other process replays.
        """
        data = self._completion_data(data_record)
        try:
            with self._completing(data_record, retry=False):
                self.client.update_item(**self._completion_request(data_record, data))
        except ClientError as exc:
            data = self._without_body_after(data_record, exc)
            with self._completing(data_record, retry=True):
                self.client.update_item(**self._completion_request(data_record, data))

    async def _aupdate_record(self, data_record: DataRecord) -> None:
        data = self._completion_data(data_record)
        try:
            with self._completing(data_record, retry=False):
                await self._acall(
                    FINISH, "update_item", self._completion_request(data_record, data)
                )
        except ClientError as exc:
            data = self._without_body_after(data_record, exc)
            with self._completing(data_record, retry=True):
                await self._acall(
                    FINISH, "update_item", self._completion_request(data_record, data)
                )

    def _completion_data(self, data_record: DataRecord) -> AttributeValueTypeDef | None:
        data = self._encode_data(data_record.response_data)
        if data is not None and self._item_size(data_record, data) > MAX_ITEM_BYTES:
            data_record.response_data = self._without_body(data_record.response_data)
            data = self._encode_data(data_record.response_data)
        return data

    def _without_body_after(
        self, data_record: DataRecord, exc: ClientError
    ) -> AttributeValueTypeDef | None:
        """Our estimate of the item size was short of DynamoDB's: drop the body rather than
        fail a request whose handler has already run (any other error is raised again).
        """
        if not _is_item_too_large(exc):
            raise exc
        data_record.response_data = self._without_body(data_record.response_data)
        return self._encode_data(data_record.response_data)

    def _completing(self, data_record: DataRecord, *, retry: bool) -> AbstractContextManager[None]:
        """The completion's error mapping: the first attempt lets an item-too-large error
        through (retried without the body), the retry does not (too large even without the
        body: huge headers).
        """
        if retry:
            return self._fenced("UpdateItem", data_record.idempotency_key)
        return self._fenced("UpdateItem", data_record.idempotency_key, passes=_is_item_too_large)

    def _completion_request(
        self, data_record: DataRecord, data: AttributeValueTypeDef | None
    ) -> dict[str, Any]:
        condition, names, values = self._lease_condition(data_record)
        names["#expiry"] = self.expiry_attr
        values[":expiry"] = _number(data_record.expiry_timestamp)
        values[":status"] = {"S": data_record.status}
        assignments = ["#expiry = :expiry", "#status = :status"]
        if data is not None:
            names["#data"] = self.data_attr
            values[":data"] = data
            assignments.append("#data = :data")
        if data_record.payload_hash is not None:
            names["#validation"] = self.validation_key_attr
            values[":validation"] = {"S": data_record.payload_hash}
            assignments.append("#validation = :validation")
        return {
            "TableName": self.table_name,
            "Key": self._key(data_record.idempotency_key),
            "UpdateExpression": "SET " + ", ".join(assignments),
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }

    @contextmanager
    def _fenced(
        self,
        operation: str,
        idempotency_key: str,
        *,
        passes: Callable[[ClientError], bool] = lambda exc: False,
    ) -> Iterator[None]:
        """A write conditional on the lease: a failed condition is a lost lease, an error the
        caller handles itself (``passes``) goes through, anything else is a store error.
        """
        try:
            yield
        except ClientError as exc:
            if _error_code(exc) == "ConditionalCheckFailedException":
                raise IdempotencyLeaseLostError(idempotency_key) from None
            if passes(exc):
                raise
            self._raise_store_error(operation, exc)
        except BotoCoreError as exc:
            self._raise_store_error(operation, exc)

    @contextmanager
    def _store_errors(self, operation: str) -> Iterator[None]:
        """An unconditional call: any error is a store error."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            self._raise_store_error(operation, exc)

    def _lease_condition(
        self, lease: DataRecord
    ) -> tuple[str, dict[str, str], dict[str, AttributeValueTypeDef]]:
        """The condition that the item is still in progress under ``lease``."""
        names = {
            "#status": self.status_attr,
            "#in_progress_expiry": self.in_progress_expiry_attr,
            "#lease_id": self.lease_id_attr,
        }
        values: dict[str, AttributeValueTypeDef] = {
            ":inprogress": {"S": STATUS_INPROGRESS},
            ":lease": _number(lease.in_progress_expiry_timestamp),
        }
        if lease.lease_id is None:
            return _LEGACY_LEASE_CONDITION, names, values
        values[":lease_id"] = {"S": lease.lease_id}
        return _LEASE_CONDITION, names, values

    def _renew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        with self._fenced("UpdateItem (lease renewal)", lease.idempotency_key):
            self.client.update_item(**self._renew_request(lease, renewed))

    async def _arenew_record(self, lease: DataRecord, renewed: DataRecord) -> None:
        with self._fenced("UpdateItem (lease renewal)", lease.idempotency_key):
            await self._acall(FINISH, "update_item", self._renew_request(lease, renewed))

    def _renew_request(self, lease: DataRecord, renewed: DataRecord) -> dict[str, Any]:
        condition, names, values = self._lease_condition(lease)
        names["#expiry"] = self.expiry_attr
        values[":renewed"] = _number(renewed.in_progress_expiry_timestamp)
        values[":expiry"] = _number(renewed.expiry_timestamp)
        return {
            "TableName": self.table_name,
            "Key": self._key(lease.idempotency_key),
            "UpdateExpression": "SET #in_progress_expiry = :renewed, #expiry = :expiry",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }

    def _delete_record(self, data_record: DataRecord) -> None:
        with self._fenced("DeleteItem", data_record.idempotency_key):
            self.client.delete_item(**self._release_request(data_record))

    async def _adelete_record(self, data_record: DataRecord) -> None:
        with self._fenced("DeleteItem", data_record.idempotency_key):
            await self._acall(FINISH, "delete_item", self._release_request(data_record))

    def _release_request(self, data_record: DataRecord) -> dict[str, Any]:
        condition, names, values = self._lease_condition(data_record)
        return {
            "TableName": self.table_name,
            "Key": self._key(data_record.idempotency_key),
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }

    async def _acall(self, lane: str, operation: str, request: dict[str, Any]) -> Any:
        """``operation`` on the running event loop's aiobotocore client, in ``lane``."""
        if self._async is None:
            raise RuntimeError("this DynamoDBPersistenceLayer has no asyncio client")
        return await self._async.call(lane, operation, request)

    async def aclose(self) -> None:
        """Close the asyncio client this layer built for the running event loop, if any."""
        if self._async is not None:
            await self._async.aclose()

    def _remove_record(self, idempotency_key: str) -> bool:
        try:
            response = self.client.delete_item(
                TableName=self.table_name,
                Key=self._key(idempotency_key),
                ReturnValues="ALL_OLD",
            )
        except (ClientError, BotoCoreError) as exc:
            self._raise_store_error("DeleteItem", exc)
        return bool(response.get("Attributes"))

    def check(self) -> None:
        """DescribeTable: a missing table, refused credentials or an unreachable endpoint raise
        a typed store error naming the table. A role allowed only the item operations (as
        Powertools' documented policy) may not describe tables; it is then probed with GetItem.
        """
        try:
            self.client.describe_table(TableName=self.table_name)
        except ClientError as exc:
            if _error_code(exc) != "AccessDeniedException":
                self._raise_store_error("DescribeTable", exc)
            super().check()
        except BotoCoreError as exc:
            self._raise_store_error("DescribeTable", exc)

    # Table management ---------------------------------------------------------------------

    def create_table(self) -> bool:
        """Create the table (on-demand billing, TTL on ``expiry_attr``) unless it exists, and
        make sure TTL is enabled. Safe to call twice; returns whether the table was created.
        """
        key_schema: list[Any] = [{"AttributeName": self.key_attr, "KeyType": "HASH"}]
        attributes: list[Any] = [{"AttributeName": self.key_attr, "AttributeType": "S"}]
        if self.sort_key_attr is not None:
            key_schema.append({"AttributeName": self.sort_key_attr, "KeyType": "RANGE"})
            attributes.append({"AttributeName": self.sort_key_attr, "AttributeType": "S"})
        created = True
        try:
            self.client.create_table(
                TableName=self.table_name,
                KeySchema=key_schema,
                AttributeDefinitions=attributes,
                BillingMode="PAY_PER_REQUEST",
            )
        except ClientError as exc:
            if _error_code(exc) != "ResourceInUseException":
                self._raise_store_error("CreateTable", exc)
            created = False
        except BotoCoreError as exc:
            self._raise_store_error("CreateTable", exc)
        try:
            self.client.get_waiter("table_exists").wait(
                TableName=self.table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60}
            )
            ttl = self.client.describe_time_to_live(TableName=self.table_name)
            ttl_status = ttl["TimeToLiveDescription"].get("TimeToLiveStatus")
            if ttl_status not in ("ENABLED", "ENABLING"):
                self.client.update_time_to_live(
                    TableName=self.table_name,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": self.expiry_attr},
                )
        except (ClientError, BotoCoreError) as exc:
            self._raise_store_error("UpdateTimeToLive", exc)
        return created

    # Items --------------------------------------------------------------------------------

    def _key(self, idempotency_key: str) -> dict[str, AttributeValueTypeDef]:
        if self.sort_key_attr is None:
            return {self.key_attr: {"S": idempotency_key}}
        return {
            self.key_attr: {"S": self.static_pk_value},
            self.sort_key_attr: {"S": idempotency_key},
        }

    def _item_to_data_record(self, item: dict[str, Any]) -> DataRecord:
        try:
            return self._parse_item(item)
        except (KeyError, TypeError, ValueError, zlib.error, IdempotencyInvalidStatusError) as exc:
            # A record this layer cannot read is a store fault (503), never a 500.
            raise StoreRecordUnreadableError(
                f"unreadable idempotency record in table {self.table_name!r}: {exc!r}"
            ) from exc

    def _parse_item(self, item: dict[str, Any]) -> DataRecord:
        key_attr = self.sort_key_attr or self.key_attr
        data = item.get(self.data_attr)
        if data is None:
            response_data = None
        elif "B" in data:
            response_data = zlib.decompress(data["B"]).decode("utf-8")
        else:
            response_data = data["S"]
        in_progress = item.get(self.in_progress_expiry_attr)
        validation = item.get(self.validation_key_attr)
        lease_id = item.get(self.lease_id_attr)
        return DataRecord(
            idempotency_key=item[key_attr]["S"],
            status=item[self.status_attr]["S"],
            expiry_timestamp=int(item[self.expiry_attr]["N"]),
            in_progress_expiry_timestamp=int(in_progress["N"]) if in_progress else None,
            response_data=response_data,
            payload_hash=validation["S"] if validation else None,
            lease_id=lease_id["S"] if lease_id else None,
        )

    @staticmethod
    def _encode_data(response_data: str | None) -> AttributeValueTypeDef | None:
        """The ``data`` attribute: text as Powertools stores it, or zlib-compressed binary when
        that is smaller (JSON bodies typically shrink four- to tenfold).
        """
        if response_data is None:
            return None
        raw = response_data.encode("utf-8")
        if len(raw) >= COMPRESS_MIN_BYTES:
            compressed = zlib.compress(raw, 6)
            if len(compressed) < len(raw) * 0.9:
                return {"B": compressed}
        return {"S": response_data}

    @staticmethod
    def _without_body(response_data: str | None) -> str | None:
        if response_data is None:
            return None
        return StoredResponse.decode(response_data).without_body().encode()

    def _item_size(self, data_record: DataRecord, data: AttributeValueTypeDef) -> int:
        value = data.get("B") or data.get("S") or ""
        size = len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8"))
        return size + len(data_record.idempotency_key) + _ITEM_OVERHEAD_BYTES

    def _raise_store_error(self, operation: str, exc: Exception) -> NoReturn:
        message = (
            f"DynamoDB {operation} on table {self.table_name!r} ({self._where()}) failed: {exc}"
        )
        code = _error_code(exc) if isinstance(exc, ClientError) else ""
        if code == "ResourceNotFoundException":
            raise StoreNotFoundError(
                f"{message}; create the table (DynamoDBPersistenceLayer.create_table() or "
                "`idem-middleware create-table --table <name>`), or fix table_name and the region"
            ) from exc
        if code in _NOT_AUTHORISED or isinstance(exc, NoCredentialsError | PartialCredentialsError):
            raise StoreNotAuthorisedError(
                f"{message}; give this process AWS credentials allowed dynamodb:GetItem, "
                "PutItem, UpdateItem and DeleteItem on the table"
            ) from exc
        if code == "ValidationException":
            raise StoreRequestRejectedError(message) from exc
        if isinstance(exc, ConnectionError):
            raise StoreUnreachableError(
                f"{message}; check the region, the endpoint URL and the network route to it"
            ) from exc
        raise IdempotencyPersistenceLayerError(message) from exc

    def _where(self) -> str:
        meta = self.client.meta
        return f"region {meta.region_name}, endpoint {meta.endpoint_url}"


def _number(value: int | None) -> AttributeValueTypeDef:
    return {"N": str(value if value is not None else 0)}


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_item_too_large(exc: ClientError) -> bool:
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return _error_code(exc) == "ValidationException" and "item size" in message.lower()


def _check_attribute_names(names: dict[str, str | None]) -> None:
    """Every attribute name is a non-empty string and names one attribute only: two options
    naming the same attribute make every completion fail (or overwrite the status), so the
    record stays in progress and the retry after the lease runs the handler again.
    """
    seen: dict[str, str] = {}
    for option, name in names.items():
        if name is None and option == "sort_key_attr":
            continue
        if not isinstance(name, str) or not name:
            raise ValueError(f"{option} must be a non-empty attribute name, got {name!r}")
        if name in seen:
            raise ValueError(f"{option} and {seen[name]} must differ (both are {name!r})")
        seen[name] = option
