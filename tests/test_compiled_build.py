"""The mypyc build: every module the build hook lists is compiled, or none is.

``dev.py test`` runs the suite on the sources and (``GEMINI_SCALE_COMPILED=1``, or under CI)
on the build compiled in place; it says which through ``GEMINI_SCALE_EXPECT_COMPILED``. A
build that is half there (a module edited and rebuilt alone, a stale extension) would test
neither form, so it fails here.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys

from dev import ROOT, compiled_modules


def test_the_hook_lists_existing_modules() -> None:
    modules = compiled_modules()
    assert modules
    for name in modules:
        assert (ROOT / (name.replace(".", "/") + ".py")).is_file(), name


def test_all_listed_modules_are_compiled_or_none_is() -> None:
    compiled = {
        name: not (importlib.import_module(name).__file__ or "").endswith(".py")
        for name in compiled_modules()
    }
    expected = os.environ.get("GEMINI_SCALE_EXPECT_COMPILED")
    if expected == "1":
        assert all(compiled.values()), [n for n, c in compiled.items() if not c]
    elif expected == "0":
        assert not any(compiled.values()), [n for n, c in compiled.items() if c]
    else:
        assert len(set(compiled.values())) == 1, compiled


def test_no_listed_module_awaits_in_a_finally_clause() -> None:
    # mypyc miscompiles an ``await`` in a ``finally`` clause: an exception thrown into the
    # awaited coroutine and handled there (anyio's cancellation of a task group) is raised
    # again in the compiled caller. Such code is written as ``except BaseException: ...;
    # raise`` plus the same step after the ``try`` (RateLimitMiddleware.handle).
    found = []
    for name in compiled_modules():
        path = ROOT / (name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Try | ast.TryStar):
                for statement in node.finalbody:
                    found += [
                        f"{path.relative_to(ROOT)}:{inner.lineno}"
                        for inner in ast.walk(statement)
                        if isinstance(inner, ast.Await | ast.AsyncWith | ast.AsyncFor)
                    ]
    assert not found, found


def test_the_release_smoke_check_tells_a_compiled_install_from_the_sources(
    tmp_path: os.PathLike[str],
) -> None:
    """``dev.py smoke`` (the release wheels' check, cibuildwheel's test command) passes on
    the compiled build and fails on the sources, naming the modules left uncompiled."""
    compiled = not (importlib.import_module("gemini_scale.routing").__file__ or "").endswith(".py")
    result = subprocess.run(
        [sys.executable, str(ROOT / "dev.py"), "smoke"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    if compiled:
        assert result.returncode == 0, result.stderr
        assert "a limited and cached request: ok" in result.stdout
    else:
        assert result.returncode != 0
        assert "not compiled: ['gemini_scale.ratelimit.scripts'" in result.stderr

