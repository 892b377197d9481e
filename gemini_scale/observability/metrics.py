"""The Prometheus metric families (docs/operations/metrics.md), created once per registry.

Names follow the OpenTelemetry semantic conventions where they exist (HTTP server, GenAI
v1.36), exported the Prometheus way; the rest are ``gemini_scale_*``. Label values come
from route templates, model ids, limit names and fixed reasons, never from raw paths or
principals; values a client chooses (a model id in the path, a tenant) go through a
:class:`BoundedLabel`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = [
    "OTHER",
    "TOKEN_BUCKETS",
    "BoundedLabel",
    "Families",
    "TokenSink",
    "families",
    "forget_dead_workers",
    "metrics_body",
    "record_store_error",
]

#: The GenAI convention's buckets for token counts.
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)
#: The label value of everything past a :class:`BoundedLabel`'s limit.
OTHER: Final = "(other)"


class BoundedLabel:
    """At most ``limit`` distinct values of a label a client can influence; later ones are
    :data:`OTHER`, so a flood of made-up values cannot grow the series count."""

    __slots__ = ("_limit", "_lock", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def known(self, value: str) -> str:
        """``value`` if it is already a label value, else :data:`OTHER` (admits nothing)."""
        return value if value in self._seen else OTHER

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit and len(value) <= 128 and value.isprintable():
                self._seen.add(value)
                return value
        return OTHER


#: Prometheus' default buckets for seconds.
#: Not ``Final``: mypyc leaves a final name unset for the default of a nested function.
SECONDS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
)


class _HistogramChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class TokenSink:
    """The input and output token children (GenAI histogram, per-tenant counter) of one
    operation, model and tenant: one call records an answer's tokens."""

    __slots__ = ("in_count", "in_hist", "out_count", "out_hist")

    def __init__(self, in_hist: Any, out_hist: Any, in_count: Any, out_count: Any) -> None:
        self.in_hist, self.out_hist = in_hist, out_hist
        self.in_count, self.out_count = in_count, out_count

    @staticmethod
    def of(in_hist: Any, out_hist: Any, in_count: Any, out_count: Any) -> TokenSink:
        """The sink for these children (plain-number ones are updated in place)."""
        fast = (type(in_hist) is type(out_hist) is _HistogramChild
                and type(in_count) is type(out_count) is _CounterChild)
        return (_FastTokenSink if fast else TokenSink)(in_hist, out_hist, in_count, out_count)

    def add(self, tokens_in: int, tokens_out: int) -> None:
        """Record an answer's input and output tokens (0: none of that kind)."""
        if tokens_in:
            self.in_hist.observe(tokens_in)
            self.in_count.inc(tokens_in)
        if tokens_out:
            self.out_hist.observe(tokens_out)
            self.out_count.inc(tokens_out)


class _FastTokenSink(TokenSink):
    __slots__ = ()

    def add(self, tokens_in: int, tokens_out: int) -> None:
        # _HistogramChild.observe and _CounterChild.inc, inlined: four calls fewer. The
        # typed names let compiled code (mypyc) reach the slots directly.
        hist: _HistogramChild
        count: _CounterChild
        if tokens_in:
            hist, count = self.in_hist, self.in_count
            hist.counts[bisect_left(hist.bounds, tokens_in)] += 1
            hist.total += tokens_in
            count.value += tokens_in
        if tokens_out:
            hist, count = self.out_hist, self.out_count
            hist.counts[bisect_left(hist.bounds, tokens_out)] += 1
            hist.total += tokens_out
            count.value += tokens_out


class FastHistogram:
    """A histogram kept in plain Python numbers, exposed through a collector at scrape time.

    prometheus-client's own histogram takes a lock and walks its buckets on every
    observation (about 1.3 µs here); this one is a bisect and two additions (about 0.2 µs).
    The event loop is the only writer; a scrape from another thread may read a value one
    observation old, never a wrong one.
    """

    __slots__ = ("_children", "bounds", "doc", "labelnames", "name")

    def __init__(
        self, name: str, doc: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], _HistogramChild] = {}

    def labels(self, *values: str) -> _HistogramChild:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _HistogramChild(self.bounds)
        return child

    def family(self) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, running, buckets = list(child.counts), 0, []
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            family.add_metric(list(values), buckets, child.total)
        return family


class FastCounter:
    """A counter kept in plain Python numbers (see :class:`FastHistogram`)."""

    __slots__ = ("_children", "doc", "labelnames", "name")

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._children: dict[tuple[str, ...], _CounterChild] = {}

    def labels(self, *values: str, **named: str) -> _CounterChild:
        key = values or tuple(named[n] for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _CounterChild()
        return child

    def family(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        return family


def _bound(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))


class _Collector:
    """Exposes the fast metrics of one registry."""

    def __init__(self) -> None:
        self.metrics: list[FastHistogram | FastCounter] = []

    def add(self, metric: FastHistogram | FastCounter) -> FastHistogram | FastCounter:
        self.metrics.append(metric)
        return metric

    def collect(self) -> Iterator[Any]:
        for metric in self.metrics:
            yield metric.family()

    def describe(self) -> list[Any]:
        return [metric.family() for metric in self.metrics]


@dataclass(frozen=True, slots=True)
class Families:
    """Every metric family of the library in one registry."""

    requests: Any
    first_byte: Any
    disconnects: Any
    genai_duration: Any
    genai_first_token: Any
    genai_tokens: Any
    tokens: Any
    auth_refusals: Any
    ratelimit_decisions: Any
    cache_results: Any
    store_errors: Any
    upstream_duration: Any
    upstream_errors: Any
    upstream_retries: Any


_families: weakref.WeakKeyDictionary[CollectorRegistry, Families] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def families(registry: CollectorRegistry | None = None) -> Families:
    """The families in ``registry`` (default: prometheus-client's global registry),
    created on first use."""
    from prometheus_client import REGISTRY

    registry = registry or REGISTRY
    found = _families.get(registry)
    if found is not None:
        return found
    with _lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = _create(registry)
    return found


def _create(registry: CollectorRegistry) -> Families:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several workers: prometheus-client's own values, kept in files the workers share.
        from prometheus_client import Counter, Histogram

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float] = SECONDS
        ) -> Any:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        def counter(name: str, doc: str, labels: Sequence[str]) -> Any:
            return Counter(name, doc, labels, registry=registry)
    else:
        collector = _Collector()
        registry.register(collector)

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float] = SECONDS
        ) -> Any:
            return collector.add(FastHistogram(name, doc, labels, buckets))

        def counter(name: str, doc: str, labels: Sequence[str]) -> Any:
            return collector.add(FastCounter(name, doc, labels))

    genai = ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name")
    return Families(
        requests=histogram(
            "http_server_request_duration_seconds",
            "HTTP requests served, to their last byte.",
            ("http_request_method", "http_route", "http_response_status_code",
             "gemini_api_version"),
        ),
        first_byte=histogram(
            "gemini_scale_time_to_first_byte_seconds",
            "From a request's arrival to the first byte of its answer's body.",
            ("http_request_method", "http_route"),
        ),
        disconnects=counter(
            "gemini_scale_client_disconnects",
            "Answers the client went away from before they were complete.",
            ("http_route",),
        ),
        genai_duration=histogram(
            "gen_ai_server_request_duration_seconds",
            "Gemini model calls served, to their last byte.",
            genai,
        ),
        genai_first_token=histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streamed Gemini model calls: to the first event.",
            genai,
        ),
        genai_tokens=histogram(
            "gen_ai_client_token_usage",
            "Tokens per Gemini call, from the answer's usageMetadata.",
            (*genai, "gen_ai_token_type"),
            TOKEN_BUCKETS,
        ),
        tokens=counter(
            "gemini_scale_tokens",
            "Gemini tokens used, per model and tenant.",
            ("gen_ai_request_model", "tenant", "gen_ai_token_type"),
        ),
        auth_refusals=counter(
            "gemini_scale_auth_refusals",
            "Requests refused by authentication, by reason.",
            ("reason",),
        ),
        ratelimit_decisions=counter(
            "gemini_scale_ratelimit_decisions",
            "Rate-limit decisions, by limit and outcome.",
            ("limit", "outcome"),
        ),
        cache_results=counter(
            "gemini_scale_cache_results",
            "What the response cache did, by route.",
            ("http_route", "result"),
        ),
        store_errors=counter(
            "gemini_scale_store_errors",
            "Store operations that failed, by area.",
            ("area",),
        ),
        upstream_duration=histogram(
            "gemini_scale_upstream_request_duration_seconds",
            "Upstream Gemini calls, to the start of their answer.",
            ("gen_ai_request_model", "http_response_status_code"),
        ),
        upstream_errors=counter(
            "gemini_scale_upstream_errors",
            "Upstream Gemini calls that failed.",
            ("gen_ai_request_model", "error"),
        ),
        upstream_retries=counter(
            "gemini_scale_upstream_retries",
            "Upstream Gemini calls retried.",
            ("gen_ai_request_model",),
        ),
    )


def record_store_error(area: str) -> None:
    """One failed store operation of ``area`` (``ratelimit``, ``cache``, ``anomaly``), in
    the global registry."""
    families().store_errors.labels(area=area).inc()


def metrics_body(registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The exposition of ``registry`` (default: the global one, or, with
    ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's values merged, the ``live*`` gauges of
    workers that no longer run left out) and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if registry is None and directory:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        forget_dead_workers(directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        try:
            return generate_latest(registry), CONTENT_TYPE_LATEST
        except FileNotFoundError:  # another scrape forgot a dead worker meanwhile
            return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(registry or REGISTRY), CONTENT_TYPE_LATEST


#: A ``live*`` gauge file of one worker (prometheus-client's multiprocess naming).
_LIVE_GAUGE_FILE: Final = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def forget_dead_workers(directory: str) -> list[int]:
    """``mark_process_dead`` for each worker whose ``live*`` gauge files are in
    ``directory`` but whose process is gone; the pids forgotten.

    gunicorn tells the library when a worker exits (its ``child_exit`` hook); uvicorn's
    ``--workers`` supervisor does not, so a worker killed and replaced would hold
    ``gemini_scale_ratelimit_store_degraded`` (``livemax``) at its last value for good.
    Every multiprocess scrape calls this. It relies on the directory being this server's
    alone (docs/operations/index.md): a pid is looked up on this host only.
    """
    from prometheus_client import multiprocess

    try:
        names = os.listdir(directory)
    except OSError:
        return []
    pids = {int(m.group(1)) for m in map(_LIVE_GAUGE_FILE.fullmatch, names) if m is not None}
    dead = sorted(pid for pid in pids if pid != os.getpid() and not _running(pid))
    for pid in dead:
        with contextlib.suppress(FileNotFoundError):  # another scrape forgot it first
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return dead


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists (another user's, say)
        return True
    return True
