"""The asyncio DynamoDB client of :class:`DynamoDBPersistenceLayer` (the ``dynamodb-async`` extra).

Under ASGI the layer's store calls then run on the event loop through aiobotocore, with no
worker thread: botocore's request work (validation, serialisation, SigV4, parsing) is CPU-bound
Python, and in worker threads it takes turns at the GIL with the event loop, which then answers
every other request late (BENCHMARKS.md, section 4).

The asyncio client is built from the layer's blocking boto3 client, so the two agree on
everything: region, endpoint, client config (timeouts, retries) and credentials - the asyncio
client signs with the blocking client's own credentials object, refreshed the same way. One
client serves one event loop; the layer keeps one per loop, built on its first store call.

On the event loop, botocore's work for every call in flight is done between two turns of the
loop, so a request the middleware does not cover (``GET /health``) waits behind all of it: at
most ``calls_per_lane`` calls are in flight at once per lane (claims and reads; completions,
renewals and releases), as worker threads are limited (BENCHMARKS.md, section 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import TYPE_CHECKING, Any

import anyio.to_thread

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient


def aiobotocore_installed() -> bool:
    """Whether the ``dynamodb-async`` extra (aiobotocore) can be imported."""
    try:
        import aiobotocore.session  # noqa: F401
    except ImportError:
        return False
    return True


class SharedCredentials:
    """The blocking client's credentials, as aiobotocore's signer asks for them (awaited).

    A refresh (an assumed role, instance credentials) is a blocking HTTP call: it runs in a
    worker thread, once per expiry, never on the event loop.
    """

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    async def get_frozen_credentials(self) -> Any:
        refresh_needed = getattr(self.credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            return await anyio.to_thread.run_sync(self.credentials.get_frozen_credentials)
        return self.credentials.get_frozen_credentials()


#: The lane of a claim and its read.
CLAIM = "claim"
#: The lane of the lease-fenced writes (completion, renewal, release): a finished request never
#: waits behind new claims.
FINISH = "finish"


class _LoopClient:
    """One event loop's client and the semaphores of its lanes."""

    def __init__(self, client: Any, calls_per_lane: int) -> None:
        self.client = client
        self.lanes = {
            CLAIM: asyncio.Semaphore(calls_per_lane),
            FINISH: asyncio.Semaphore(calls_per_lane),
        }


class AsyncDynamoDB:
    """aiobotocore DynamoDB clients with ``blocking``'s settings, one per event loop."""

    def __init__(self, blocking: DynamoDBClient, calls_per_lane: int) -> None:
        self.blocking = blocking
        self.calls_per_lane = calls_per_lane
        # The task building each loop's client: concurrent first calls share one build.
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, asyncio.Task[_LoopClient]
        ] = weakref.WeakKeyDictionary()
        # A server runs one loop: the last client used is kept at hand.
        self._last: tuple[asyncio.AbstractEventLoop | None, _LoopClient | None] = (None, None)

    async def call(self, lane: str, operation: str, request: dict[str, Any]) -> Any:
        """``operation`` (``put_item``, ...) with ``request`` on the running loop's client, once
        one of ``lane``'s places is free.
        """
        loop_client = await self.client()
        async with loop_client.lanes[lane]:
            return await getattr(loop_client.client, operation)(**request)

    async def client(self) -> _LoopClient:
        """The client of the running event loop (built on first use)."""
        loop = asyncio.get_running_loop()
        last_loop, last = self._last
        if last_loop is loop and last is not None:
            return last
        build = self._by_loop.get(loop)
        if build is None:
            build = self._by_loop[loop] = loop.create_task(self._build())
        try:
            # Shielded: a request cancelled meanwhile does not cancel the build others await.
            client = await asyncio.shield(build)
        except Exception:
            if self._by_loop.get(loop) is build:
                del self._by_loop[loop]  # the next call tries again
            raise
        self._last = (loop, client)
        return client

    async def _build(self) -> _LoopClient:
        from aiobotocore.session import AioSession

        meta = self.blocking.meta
        # Placeholder keys keep aiobotocore from resolving credentials of its own (an instance
        # metadata lookup can take seconds); the signer gets the blocking client's just after.
        context = AioSession().create_client(
            "dynamodb",
            region_name=meta.region_name,
            endpoint_url=meta.endpoint_url,
            config=meta.config,
            aws_access_key_id="placeholder",
            aws_secret_access_key="placeholder",  # noqa: S106 (replaced just below)
        )
        client = await context.__aenter__()
        credentials = getattr(getattr(self.blocking, "_request_signer", None), "_credentials", None)
        # No credentials: the signer raises NoCredentialsError on each call, as boto3's does.
        client._request_signer._credentials = (
            None if credentials is None else SharedCredentials(credentials)
        )
        return _LoopClient(client, self.calls_per_lane)

    async def aclose(self) -> None:
        """Close the running event loop's client, if one was built."""
        loop = asyncio.get_running_loop()
        build = self._by_loop.pop(loop, None)
        if self._last[0] is loop:
            self._last = (None, None)
        if build is None:
            return
        if not build.done():
            # Still being built (a request started it): close it once it is, never leak it.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(build)
        if build.done() and not build.cancelled() and build.exception() is None:
            await build.result().client.close()
