"""IdempotencyConfig: the README's defaults, immutability, and validation at construction."""

from __future__ import annotations

import dataclasses

import pytest

from idem_middleware import IdempotencyConfig
from idem_middleware.config import DEFAULT_REPLAY_EXCLUDED_HEADERS


def test_defaults_match_the_design() -> None:
    config = IdempotencyConfig()
    assert config.header_name == "Idempotency-Key"
    assert config.key_source == "header"
    assert config.methods == frozenset({"POST", "PATCH"})
    assert config.include_paths is None
    assert config.exclude_paths == ()
    assert config.require_key is False
    assert config.event_key_jmespath is None
    assert config.payload_validation_jmespath is None
    assert config.expires_after_seconds == 86_400
    assert config.in_progress_expires_after_seconds == 10
    assert config.conflict_wait_seconds == 0
    assert config.use_local_cache is False
    assert config.local_cache_max_items == 1024
    assert config.hash_function == "sha256"
    assert config.key_prefix is None
    assert config.scope is None
    assert config.store_server_errors is False
    assert config.transient_statuses == frozenset({408, 425, 429})
    assert config.replay_header == "Idempotent-Replayed"
    assert {"connection", "transfer-encoding", "date", "server", "set-cookie"} <= (
        config.replay_excluded_headers
    )
    assert config.max_request_body_bytes == 1_048_576
    assert config.max_stored_response_bytes is None
    assert config.on_store_error == "reject"
    assert config.on_event is None


def test_is_frozen_and_keyword_only() -> None:
    config = IdempotencyConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.require_key = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        IdempotencyConfig("X-Key")  # type: ignore[misc]


def test_collections_are_normalised_to_immutable_values() -> None:
    config = IdempotencyConfig(
        methods=["POST"],  # type: ignore[arg-type]
        include_paths=["/orders/*"],  # type: ignore[arg-type]
        replay_excluded_headers={"Set-Cookie", "X-Trace"},
    )
    assert config.methods == frozenset({"POST"})
    assert config.include_paths == ("/orders/*",)
    assert config.replay_excluded_headers == frozenset({"set-cookie", "x-trace"})
    assert hash(config)
    assert IdempotencyConfig().replay_excluded_headers == DEFAULT_REPLAY_EXCLUDED_HEADERS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_after_seconds", -1),
        ("expires_after_seconds", 0),
        ("expires_after_seconds", 1.5),
        ("expires_after_seconds", True),
        ("in_progress_expires_after_seconds", 0),
        ("conflict_wait_seconds", -0.5),
        ("conflict_wait_seconds", True),
        ("conflict_wait_seconds", "5"),
        ("conflict_wait_seconds", float("nan")),
        ("conflict_wait_seconds", float("inf")),
        ("conflict_wait_seconds", 86_400),
        ("local_cache_max_items", 0),
        ("max_request_body_bytes", 0),
        ("max_stored_response_bytes", -1),
        ("key_source", "cookie"),
        ("hash_function", "nope256"),
        ("transient_statuses", {99}),
        ("transient_statuses", {"429"}),
        ("hash_function", "shake_128"),
        ("event_key_jmespath", "order_id[["),
        ("payload_validation_jmespath", "a.."),
        ("methods", {"post"}),
        ("methods", {"FETCH"}),
        ("methods", set()),
        ("include_paths", ("orders",)),
        ("exclude_paths", ("",)),
        ("header_name", "Idempotency Key"),
        ("header_name", ""),
        ("replay_header", "bad:name"),
        ("key_prefix", ""),
        ("key_prefix", "a#b"),
        ("scope", "user"),
        ("on_event", 42),
        ("on_store_error", "ignore"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        IdempotencyConfig(**{field: value})  # type: ignore[arg-type]


def test_valid_alternatives_are_accepted() -> None:
    config = IdempotencyConfig(
        key_source="header_or_body",
        methods={"POST", "PUT", "DELETE"},
        include_paths=("/orders/*", "*/payments"),
        event_key_jmespath="[order_id, customer]",
        payload_validation_jmespath="amount",
        hash_function="blake2b",
        max_stored_response_bytes=0,
        key_prefix="billing",
        scope=lambda request: "tenant",
        on_store_error="passthrough",
        conflict_wait_seconds=2.5,
    )
    assert config.hash_function == "blake2b"
    assert config.conflict_wait_seconds == 2.5


def test_conflict_wait_must_end_before_the_replayed_record_expires() -> None:
    assert IdempotencyConfig(expires_after_seconds=60, conflict_wait_seconds=59.5)
    with pytest.raises(ValueError, match=r"conflict_wait_seconds.*expires_after_seconds"):
        IdempotencyConfig(expires_after_seconds=60, conflict_wait_seconds=60)
