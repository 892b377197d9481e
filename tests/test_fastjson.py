"""``fastjson.loads`` returns exactly what ``json.loads`` returns (or raises what it raises)
for every input, the inputs where orjson alone would differ included."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from gemini_scale import fastjson


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _outcome(parse: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "value", parse(raw)
    except Exception as exc:  # the type is what must agree
        return "error", type(exc)


def _assert_agrees(raw: bytes) -> None:
    expected, got = _outcome(json.loads, raw), _outcome(fastjson.loads, raw)
    assert expected[0] == got[0], raw[:80]
    if expected[0] == "value":
        assert _same(expected[1], got[1]), raw[:80]
    else:
        assert expected[1] is got[1], raw[:80]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"temperature": 0}}',
        b"-0", b"-0.0", b"1e-400", b"1E400", b"-1e400", b"NaN", b"[Infinity, -Infinity]",
        b"0.1000000000000000055511151231257827", b"4.9e-324", b"1.7976931348623157e308",
        b"9223372036854775807", b"18446744073709551615", b"18446744073709551616",
        b"-9223372036854775808", b"-9223372036854775809", b"-9999999999999999999",
        b'{"maxOutputTokens": 123456789012345678901234567890}',
        b'"\\ud800"', b'"\\ud83d\\ude00 \\u0000 \\/"', b'{"a": 1, "a": 2}', b"[1, 2,]",
        b'{"a": "\xff"}', b"\xef\xbb\xbf{}", '{"a": "\u00e9"}'.encode("utf-16"),
        b"[" * 1100 + b"]" * 1100, b'{"a": 1} x', b"", b" ", b'"\t"',
    ],
)
def test_agrees_with_json_loads(raw: bytes) -> None:
    _assert_agrees(raw)


def test_agrees_on_random_numbers() -> None:
    rng = random.Random(20261128)
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
        text = rng.choice(["", "-"]) + (digits.lstrip("0") or "0")
        if rng.random() < 0.5:
            text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))
        if rng.random() < 0.3:
            text += rng.choice("eE") + rng.choice(["", "+", "-"]) + str(rng.randint(0, 400))
        _assert_agrees(f'{{"n": {text}, "m": [{text}]}}'.encode())


def test_integers_apart_only_past_64_bits_stay_apart() -> None:
    one = fastjson.loads(b'{"seed": 123456789012345678901}')
    two = fastjson.loads(b'{"seed": 123456789012345678902}')
    assert one != two
    assert type(one["seed"]) is int
