"""The store contract: every backend behaves the same (memory, Redis, Redis Cluster)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gemini_scale.errors import StoreError, StoreUnavailableError
from gemini_scale.stores import LocalState, Script, Store
from gemini_scale.stores.base import encode_arg
from gemini_scale.stores.scripts import COMPARE_AND_DELETE, SERVER_TIME

from .conftest import StoreKit, gather_all

# -- test scripts: each a Lua body and its Python twin -------------------------------------


def _pttl(state: LocalState, keys: list[str], args: list[Any], now: float) -> int:
    if state.get(keys[0]) is None:
        return -2
    expires_at = state.expires_at(keys[0])
    return -1 if expires_at is None else round((expires_at - now) * 1000)


PTTL = Script("test_pttl", "return redis.call('PTTL', KEYS[1])", _pttl)
"""Milliseconds left on a key (-2 absent, -1 no expiry), to check TTLs without sleeping."""


def _echo(state: LocalState, keys: list[str], args: list[Any], now: float) -> list[bytes]:
    return [key.encode() for key in keys] + [encode_arg(arg) for arg in args]


ECHO = Script(
    "test_echo",
    "local out = {} for i, k in ipairs(KEYS) do out[#out + 1] = k end "
    "for i, a in ipairs(ARGV) do out[#out + 1] = a end return out",
    _echo,
)
"""What the script sees: the full keys, then the arguments as strings."""


def _shapes(state: LocalState, keys: list[str], args: list[Any], now: float) -> Any:
    return {
        b"mixed": [1, "two", [3, b"four"], 5.9, True],
        b"nil": None,
        b"false": False,
        b"true": True,
        b"holes": [1, False, 3, None, 5],
        b"negative": -7.9,
    }[encode_arg(args[0])]


SHAPES = Script(
    "test_shapes",
    """
    local kind = ARGV[1]
    if kind == 'mixed' then return {1, 'two', {3, 'four'}, 5.9, true} end
    if kind == 'nil' then return nil end
    if kind == 'false' then return false end
    if kind == 'true' then return true end
    if kind == 'holes' then return {1, false, 3, nil, 5} end
    if kind == 'negative' then return -7.9 end
    """,
    _shapes,
)
"""Lua values of every shape, to check both backends convert results alike."""


def _move(state: LocalState, keys: list[str], args: list[Any], now: float) -> Any:
    value = state.get(keys[0])
    if value is None:
        return None
    state.put(keys[1], value, now + int(args[0]) / 1000)
    state.delete(keys[0])
    return value


MOVE = Script(
    "test_move",
    """
    local value = redis.call('GET', KEYS[1])
    if not value then return nil end
    redis.call('SET', KEYS[2], value, 'PX', ARGV[1])
    redis.call('DEL', KEYS[1])
    return value
    """,
    _move,
)
"""Two keys in one script: on a cluster they must share a hash slot."""


async def pttl(store: Store, key: str) -> int:
    result: int = await store.run(PTTL, [key], [])
    return result


# -- the contract ---------------------------------------------------------------------------


async def test_is_a_store(kit: StoreKit) -> None:
    assert isinstance(kit.store, Store)
    assert kit.store.prefix == kit.prefix
    await kit.store.ping()


async def test_get_set_round_trip(kit: StoreKit) -> None:
    store = kit.store
    assert await store.get("missing") is None
    await store.set("k", b"v1", ttl=30)
    assert await store.get("k") == b"v1"
    await store.set("k", b"v2", ttl=30)
    assert await store.get("k") == b"v2"
    every_byte = bytes(range(256))
    await store.set("binary", every_byte, ttl=30)
    assert await store.get("binary") == every_byte
    await store.set("empty", b"", ttl=30)
    assert await store.get("empty") == b""
    await store.set("view", memoryview(b"mv"), ttl=30)  # type: ignore[arg-type]
    assert await store.get("view") == b"mv"


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
async def test_ttl_must_be_positive_and_finite(kit: StoreKit, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await kit.store.set("k", b"v", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await kit.store.incr("k", ttl=ttl)
    with pytest.raises(ValueError, match="ttl"):
        await kit.store.add_to_set("k", "m", ttl=ttl)


async def test_values_must_be_bytes(kit: StoreKit) -> None:
    with pytest.raises(TypeError):
        await kit.store.set("k", "text", ttl=30)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await kit.store.incr("k", True, ttl=30)


async def test_set_ttl_has_millisecond_precision(kit: StoreKit) -> None:
    await kit.store.set("k", b"v", ttl=12.3456)
    assert 12_300 <= await pttl(kit.store, "k") <= 12_346
    await kit.store.set("tiny", b"v", ttl=0.0001)  # rounds up to 1 ms, never to "no expiry"
    assert await pttl(kit.store, "tiny") in (-2, 0, 1)


async def test_keys_expire(kit: StoreKit) -> None:
    store = kit.store
    await store.set("short", b"v", ttl=0.2)
    await store.set("long", b"v", ttl=30)
    await store.set("renewed", b"v", ttl=0.2)
    await store.set("renewed", b"v2", ttl=30)  # set replaces the TTL
    await kit.advance(0.35)
    assert await store.get("short") is None
    assert await pttl(store, "short") == -2
    assert await store.get("long") == b"v"
    assert await store.get("renewed") == b"v2"
    assert await store.set_if_absent("short", b"again", ttl=30)
    assert await store.delete("short", "short-never") == 1


async def test_set_if_absent(kit: StoreKit) -> None:
    store = kit.store
    assert await store.set_if_absent("lock", b"a", ttl=30) is True
    assert await store.set_if_absent("lock", b"b", ttl=30) is False
    assert await store.get("lock") == b"a"
    assert 29_000 < await pttl(store, "lock") <= 30_000


async def test_set_if_absent_has_exactly_one_winner(kit: StoreKit) -> None:
    tokens = [f"token-{i}".encode() for i in range(50)]
    won = await gather_all(
        *(kit.store.set_if_absent("lock", token, ttl=30) for token in tokens)
    )
    assert won.count(True) == 1
    assert await kit.store.get("lock") == tokens[won.index(True)]


async def test_delete_counts_existing_keys(kit: StoreKit) -> None:
    store = kit.store
    for key in ("a", "b", "c"):
        await store.set(key, b"v", ttl=30)
    assert await store.delete() == 0
    assert await store.delete("a", "b", "nope") == 2  # spans hash slots on a cluster
    assert await store.delete("a") == 0
    assert await store.get("a") is None
    assert await store.get("c") == b"v"


async def test_incr(kit: StoreKit) -> None:
    store = kit.store
    assert await store.incr("n", ttl=30) == 1
    assert await store.incr("n", 5, ttl=30) == 6
    assert await store.incr("n", -2, ttl=30) == 4
    assert await store.incr("n", 0, ttl=30) == 4
    assert await store.get("n") == b"4"
    assert await store.incr("big", 2**52 + 1, ttl=30) == 2**52 + 1  # Lua numbers: exact to 2**53


async def test_incr_is_atomic_under_concurrency(kit: StoreKit) -> None:
    results = await gather_all(*(kit.store.incr("hits", ttl=30) for _ in range(200)))
    assert sorted(results) == list(range(1, 201))
    assert await kit.store.get("hits") == b"200"


async def test_incr_sets_ttl_only_when_creating(kit: StoreKit) -> None:
    store = kit.store
    await store.incr("n", ttl=10)
    first = await pttl(store, "n")
    assert 9_000 < first <= 10_000
    await store.incr("n", ttl=1000)
    assert 9_000 < await pttl(store, "n") <= first
    await store.incr("short", ttl=0.2)
    await kit.advance(0.35)
    assert await store.incr("short", ttl=30) == 1  # expired: a new counter with a new TTL
    assert 29_000 < await pttl(store, "short") <= 30_000


async def test_incr_on_non_counter_is_a_store_error(kit: StoreKit) -> None:
    await kit.store.set("text", b"abc", ttl=30)
    with pytest.raises(StoreError) as caught:
        await kit.store.incr("text", ttl=30)
    assert not isinstance(caught.value, StoreUnavailableError)


async def test_sets(kit: StoreKit) -> None:
    store = kit.store
    assert await store.set_members("s") == frozenset()
    await store.add_to_set("s", "a", "b", ttl=30)
    await store.add_to_set("s", "b", "c", "ü", ttl=30)
    await store.add_to_set("s", ttl=30)  # nothing to add: a no-op
    assert await store.set_members("s") == frozenset({"a", "b", "c", "ü"})
    await store.add_to_set("wide", *(str(i) for i in range(2500)), ttl=30)
    assert len(await store.set_members("wide")) == 2500


async def test_set_ttl_is_the_max_of_remaining_and_new(kit: StoreKit) -> None:
    store = kit.store
    await store.add_to_set("s", "a", ttl=30)
    await store.add_to_set("s", "b", ttl=1)  # shorter: keeps the remaining 30 s
    assert 29_000 < await pttl(store, "s") <= 30_000
    await store.add_to_set("s", "c", ttl=100)  # longer: extends
    assert 99_000 < await pttl(store, "s") <= 100_000
    await store.add_to_set("short", "a", ttl=0.2)
    await kit.advance(0.35)
    assert await store.set_members("short") == frozenset()


async def test_wrong_type_is_a_store_error(kit: StoreKit) -> None:
    store = kit.store
    await store.add_to_set("set", "a", ttl=30)
    await store.set("string", b"x", ttl=30)
    with pytest.raises(StoreError):
        await store.get("set")
    with pytest.raises(StoreError):
        await store.set_members("string")
    with pytest.raises(StoreError):
        await store.add_to_set("string", "a", ttl=30)
    with pytest.raises(StoreError):
        await store.incr("set", ttl=30)


async def test_compare_and_delete(kit: StoreKit) -> None:
    store = kit.store
    await store.set("lock", b"token-1", ttl=30)
    assert await store.run(COMPARE_AND_DELETE, ["lock"], ["token-2"]) == 0
    assert await store.get("lock") == b"token-1"
    assert await store.run(COMPARE_AND_DELETE, ["lock"], [b"token-1"]) == 1
    assert await store.get("lock") is None
    assert await store.run(COMPARE_AND_DELETE, ["lock"], ["token-1"]) == 0


async def test_server_time(kit: StoreKit) -> None:
    first = await kit.store.run(SERVER_TIME, [], [])
    second = await kit.store.run(SERVER_TIME, [], [])
    assert isinstance(first, int)
    assert first <= second
    assert abs(first / 1_000_000 - kit.now()) < 5


async def test_scripts_see_prefixed_keys_and_string_args(kit: StoreKit) -> None:
    result = await kit.store.run(ECHO, ["{t}:k1", "rl:{t}:k2"], [7, "x", b"y", 1.5])
    head = kit.prefix.encode() + b":"
    assert result == [head + b"{t}:k1", head + b"rl:{t}:k2", b"7", b"x", b"y", b"1.5"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("mixed", [1, b"two", [3, b"four"], 5, 1]),
        ("nil", None),
        ("false", None),
        ("true", 1),
        ("holes", [1, None, 3]),
        ("negative", -7),
    ],
)
async def test_script_results_convert_alike(kit: StoreKit, kind: str, expected: Any) -> None:
    assert await kit.store.run(SHAPES, [], [kind]) == expected


async def test_hash_tagged_multi_key_script(kit: StoreKit) -> None:
    store = kit.store
    await store.set("rl:{alice}:a", b"payload", ttl=30)
    assert await store.run(MOVE, ["rl:{alice}:a", "rl:{alice}:b"], [30_000]) == b"payload"
    assert await store.get("rl:{alice}:a") is None
    assert await store.get("rl:{alice}:b") == b"payload"
    assert await store.run(MOVE, ["rl:{alice}:a", "rl:{alice}:b"], [30_000]) is None


async def test_prefixes_isolate_stores(kit: StoreKit) -> None:
    first, second = kit.store, kit.other("other")
    await first.set("k", b"one", ttl=30)
    await second.set("k", b"two", ttl=30)
    assert await first.incr("n", ttl=30) == 1
    assert await second.incr("n", 10, ttl=30) == 10
    await first.add_to_set("s", "a", ttl=30)
    assert await first.get("k") == b"one"
    assert await second.get("k") == b"two"
    assert await second.set_members("s") == frozenset()
    assert await first.delete("k", "n", "s") == 3
    assert await second.get("k") == b"two"
    assert await second.incr("n", ttl=30) == 11
