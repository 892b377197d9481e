#!/usr/bin/env python3
"""Set-up and everyday commands; needs only Python 3.11+.

    python3 dev.py run     # the example gateway on embedded defaults
    python3 dev.py test    # the whole test suite (extra arguments go to pytest)
    python3 dev.py check   # ruff, mypy --strict and the docs build
    python3 dev.py wheel   # the release sdist and compiled wheel in dist/, checked

Each creates ``.venv`` and installs the project into it on first use (and again whenever
``pyproject.toml`` changes).

``test`` runs the suite on the pure-Python sources (it deletes an earlier in-place build, so
that what runs is what you edited); with ``GEMINI_SCALE_COMPILED=1`` it first compiles the
hot modules with mypyc, in place, as the release wheels ship them (the build hook in
``pyproject.toml``), and runs the suite on that build; under ``CI=true`` it runs both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"
STAMP = VENV / ".gemini-scale-installed"
COMPILED_STAMP = VENV / ".gemini-scale-compiled"


def ensure_venv() -> None:
    """Create the virtualenv and install the project with its dev extra when needed."""
    if sys.version_info < (3, 11):  # noqa: UP036 (this file runs on any python3)
        sys.exit(f"gemini-scale needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        return
    if not PYTHON.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print("installing gemini-scale and its dev tools into .venv ...", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def _get_json(url: str, data: bytes | None = None) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 (a loopback URL we build)
        url, data=data, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
        result: dict[str, object] = json.loads(response.read())
        return result


def run(args: list[str]) -> int:
    """Start the example gateway and print how to call it."""
    port = args[0] if args else os.environ.get("PORT", "8000")
    host = "127.0.0.1"
    env = dict(os.environ)
    if not env.get("GEMINI_SCALE_OAUTH_ISSUER"):
        env.setdefault("GEMINI_SCALE_DEV_ISSUER", "1")
    server = subprocess.Popen(
        [str(PYTHON), "-m", "uvicorn", "example_app.main:app", "--host", host, "--port", port,
         "--no-proxy-headers"],
        cwd=ROOT,
        env=env,
    )
    base = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                return server.returncode
            try:
                _get_json(f"{base}/healthz")
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    print("the gateway did not start within 30 s", file=sys.stderr)
                    server.terminate()
                    return 1
                time.sleep(0.2)
        if env.get("GEMINI_SCALE_DEV_ISSUER") == "1":
            token = _get_json(f"{base}/dev/token", b"{}")["access_token"]
            print(USAGE.format(base=base, token=token), flush=True)
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        return server.wait()


USAGE = """
gemini-scale example gateway on {base} (offline Gemini stand-in, in-memory stores, dev issuer)

A dev access token (15 minutes; mint another with: curl -s -X POST {base}/dev/token):

  TOKEN={token}

Call it with curl:

  curl -s {base}/v1beta/models/gemini-2.5-flash:generateContent \\
    -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
    -d '{{"contents": [{{"parts": [{{"text": "Hello"}}]}}]}}'

Or with google-genai (pip install google-genai):

  from google import genai
  from google.genai import types

  client = genai.Client(
      api_key="unused-the-gateway-holds-the-key",
      http_options=types.HttpOptions(
          base_url="{base}", headers={{"Authorization": "Bearer {token}"}}
      ),
  )
  print(client.models.generate_content(model="gemini-2.5-flash", contents="Hello").text)

Press Ctrl+C to stop.
"""


def compiled_sources() -> list[Path]:
    """The modules the mypyc build hook compiles (its ``include`` list in pyproject.toml)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    hook = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [ROOT / pattern.lstrip("/") for pattern in hook["include"]]


def compiled_modules() -> list[str]:
    """The dotted names of :func:`compiled_sources`."""
    return [".".join(path.relative_to(ROOT).with_suffix("").parts) for path in compiled_sources()]


def remove_compiled() -> None:
    """Delete in-place mypyc artefacts (the package has no other extension modules), so that
    imports load the sources as they are now, whatever module list built them."""
    for suffix in (".so", ".pyd"):
        package = (ROOT / "gemini_scale").rglob(f"*{suffix}")
        for artefact in [*package, *ROOT.glob(f"*__mypyc*{suffix}")]:
            artefact.unlink()


def compile_in_place() -> None:
    """Compile the hot modules with mypyc next to their sources: the editable install with the
    build hook enabled (the same hook, and the same module list, as the release wheels).
    Skipped when the package's sources have not changed since the last build."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gemini_scale").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    sources = compiled_sources()
    built = all(any(s.parent.glob(f"{s.stem}.*.so")) for s in sources)
    if built and COMPILED_STAMP.exists() and COMPILED_STAMP.read_text() == digest.hexdigest():
        return
    remove_compiled()
    print("compiling the hot modules with mypyc (a few minutes) ...", flush=True)
    env = {**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "true"}
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        cwd=ROOT, env=env, check=True,
    )
    missing = [s for s in sources if not any(s.parent.glob(f"{s.stem}.*.so"))]
    if missing:
        sys.exit(f"mypyc built no extension for: {', '.join(map(str, missing))}")
    COMPILED_STAMP.write_text(digest.hexdigest())


def test(args: list[str]) -> int:
    """Run the whole test suite: on the sources, on the compiled build, or (CI) on both."""
    compiled = os.environ.get("GEMINI_SCALE_COMPILED") == "1"
    both = os.environ.get("CI") == "true"
    failed = 0
    if both or not compiled:
        remove_compiled()
        print("== tests on the pure-Python sources", flush=True)
        failed |= _pytest(args, expect_compiled=False)
    if both or compiled:
        compile_in_place()
        print("== tests on the mypyc-compiled build", flush=True)
        failed |= _pytest(args, expect_compiled=True)
    return failed


def _pytest(args: list[str], *, expect_compiled: bool) -> int:
    env = {**os.environ, "GEMINI_SCALE_EXPECT_COMPILED": "1" if expect_compiled else "0"}
    command = [str(PYTHON), "-m", "pytest", *args]
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


def check(args: list[str]) -> int:
    """ruff, mypy --strict and the strict docs build."""
    steps = [
        [str(PYTHON), "-m", "ruff", "check", "."],
        [str(PYTHON), "-m", "mypy", "--strict"],
        [str(PYTHON), "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", ".site"],
    ]
    failed = 0
    for step in steps:
        print("$", " ".join(step[2:]), flush=True)
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
        failed |= subprocess.run(step, cwd=ROOT, env=env, check=False).returncode
    return failed


def wheel(args: list[str]) -> int:
    """Build the release artefacts into ``dist/``: the sdist and this interpreter's wheel with
    the hot modules compiled by mypyc (the build hook enabled, as every release wheel must
    be: a wheel without it runs the sources, at two to three times the cost per request).
    Then install the wheel into a fresh virtualenv and check it with :func:`smoke`."""
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    for old in dist.glob("gemini_scale-*"):
        old.unlink()
    env = {**os.environ, "HATCH_BUILD_HOOK_ENABLE_MYPYC": "true"}
    print("building the sdist and the compiled wheel (a few minutes) ...", flush=True)
    subprocess.run(
        [str(PYTHON), "-m", "hatchling", "build", "-t", "sdist", "-t", "wheel", "-d", str(dist)],
        cwd=ROOT, env=env, check=True,
    )
    wheels = sorted(dist.glob("gemini_scale-*.whl"))
    if len(wheels) != 1 or wheels[0].name.endswith("-none-any.whl"):
        sys.exit(f"expected one platform wheel in {dist}, found {[w.name for w in wheels]}")
    with tempfile.TemporaryDirectory(prefix="gemini-scale-wheel-") as scratch:
        target = Path(scratch) / "venv"
        venv.EnvBuilder(with_pip=True).create(target)
        python = target / BIN.name / PYTHON.name
        print(f"installing {wheels[0].name} into a fresh virtualenv ...", flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             str(wheels[0])],
            check=True,
        )
        code = subprocess.run([str(python), str(ROOT / "dev.py"), "smoke"], check=False)
    if code.returncode == 0:
        print(f"ok: {', '.join(p.name for p in sorted(dist.glob('gemini_scale-*')))}")
    return code.returncode


_SMOKE = """
import asyncio, importlib, json, sys
modules = json.loads(sys.argv[1])
plain = [m for m in modules if importlib.import_module(m).__file__.endswith(".py")]
if plain:
    sys.exit(f"not compiled: {plain}")
import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from gemini_scale import (
    CacheMiddleware, CachePolicy, MemoryStore, RateLimitMiddleware, RateLimitPolicy,
)

calls = []

async def listing(request):
    calls.append(1)
    return JSONResponse({"models": []})

app = Starlette(routes=[Route("/v1beta/models", listing)])
app.add_middleware(CacheMiddleware, store=MemoryStore(),
                   rules={"GET /v1beta/models": CachePolicy(ttl=60, scope="shared")})
app.add_middleware(RateLimitMiddleware, default=RateLimitPolicy.parse("2/minute", key="client_ip"))

async def main():
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/v1beta/models") for _ in range(3)]
    codes = [answer.status_code for answer in answers]
    assert codes == [200, 200, 429], codes
    assert answers[1].headers.get("cache-status") == "gemini-scale; hit", answers[1].headers
    assert len(calls) == 1, calls

asyncio.run(main())
print(f"smoke: {len(modules)} compiled modules, a limited and cached request: ok")
"""


def smoke(args: list[str]) -> int:
    """Check the installed gemini-scale (not this checkout): every module the build hook
    lists is compiled, and a request passes a limiter and a cache. Runs in the interpreter
    that runs this file, from a directory outside the checkout; the release check of
    ``wheel`` and cibuildwheel's ``test-command`` use it."""
    modules = compiled_modules()
    with tempfile.TemporaryDirectory() as elsewhere:  # -P and a foreign cwd: not the sources
        return subprocess.run(
            [sys.executable, "-P", "-c", _SMOKE, json.dumps(modules)], cwd=elsewhere, check=False
        ).returncode


COMMANDS = {"run": run, "test": test, "check": check, "wheel": wheel, "smoke": smoke}
#: Commands that use the interpreter running this file, not the checkout's .venv.
WITHOUT_VENV = {"smoke"}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    if sys.argv[1] not in WITHOUT_VENV:
        ensure_venv()
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
