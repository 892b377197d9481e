"""The public surface is exactly ``__all__``, sorted (as httpx keeps its own honest)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gemini_scale


def test_all_is_sorted_and_unique() -> None:
    assert list(gemini_scale.__all__) == sorted(set(gemini_scale.__all__))


def test_every_name_in_all_resolves() -> None:
    for name in gemini_scale.__all__:
        assert getattr(gemini_scale, name) is not None, name


def test_dir_lists_exactly_the_public_names() -> None:
    public = {name for name in dir(gemini_scale) if not name.startswith("_")}
    public.discard("annotations")  # from __future__
    assert public == set(gemini_scale.__all__) - {"__version__"}


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = gemini_scale.NoSuchThing  # type: ignore[attr-defined]


def test_public_objects_have_docstrings() -> None:
    for name in gemini_scale.__all__:
        value = getattr(gemini_scale, name)
        if callable(value):
            assert value.__doc__, f"{name} has no docstring"


def test_importing_pays_only_for_what_is_used() -> None:
    """Start-up cost: a stack that uses neither Redis nor the upstream never imports them."""
    code = (
        "import sys, gemini_scale\n"
        "gemini_scale.JSONBodyMiddleware, gemini_scale.cache, gemini_scale.MemoryStore\n"
        "heavy = {'redis', 'httpx', 'pydantic_settings', 'limits', 'joserfc', 'fastapi'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
