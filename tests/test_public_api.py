"""The public surface is exactly ``__all__``, sorted (as httpx keeps its own honest)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _written_docstring(value: Any) -> str | None:
    """``value``'s docstring as written in its source: a mypyc-compiled class or function
    keeps only its signature at run time."""
    if value.__doc__:
        return str(value.__doc__)
    module = sys.modules[value.__module__]
    source = Path(module.__file__ or "").with_name(value.__module__.rpartition(".")[2] + ".py")
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name == value.__name__
        ):
            return ast.get_docstring(node)
    return None


def test_public_objects_have_docstrings() -> None:
    for name in gemini_scale.__all__:
        value = getattr(gemini_scale, name)
        if callable(value):
            assert _written_docstring(value), f"{name} has no docstring"


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
