"""The operator assets in ``docs/operations/`` (issue 7, item 6) hold to the metric catalogue.

``promtool`` (Debian's ``prometheus`` package) checks the alert rules, runs their unit tests
and parses every dashboard query; without it these tests skip, except with ``CI=true``,
where they fail (CI must run them). The rest needs no tool: the dashboard is importable
JSON whose panels all have a data source and a query, and every metric, label and label
value in the dashboard, the rules and the rule tests is one that ``metrics.md`` lists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OPERATIONS = ROOT / "docs" / "operations"
CATALOGUE = OPERATIONS / "metrics.md"
RULES = OPERATIONS / "alerts.yml"
RULE_TESTS = OPERATIONS / "alerts.test.yml"
DASHBOARD = OPERATIONS / "grafana-dashboard.json"
PAGE = OPERATIONS / "index.md"

PROMTOOL_TIMEOUT = 120
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: Labels Prometheus adds (target labels) or a histogram series carries besides the catalogue's.
EXTRA_LABELS = frozenset({"job", "instance", "le"})
#: What Grafana substitutes in a query, with values PromQL accepts, to parse it.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$route": ".*",
    "$model": ".*",
}

# --------------------------------------------------------------------------- the catalogue


@dataclass
class Metric:
    name: str
    type: str
    #: label name -> its enumerated values (empty when the catalogue lists none)
    labels: dict[str, frozenset[str]] = field(default_factory=dict)


def _catalogue() -> dict[str, Metric]:
    """The table under "Metric catalogue" in metrics.md: name, type, labels (and values)."""
    row = re.compile(r"^\|\s*`([a-zA-Z_:][\w:]*)`\s*\|\s*(\w+)\s*\|([^|]*)\|")
    metrics: dict[str, Metric] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = row.match(line)
        if match is None:
            continue
        name, kind, labels_cell = match.groups()
        labels: dict[str, frozenset[str]] = {}
        # `label` optionally followed by (`v1`, `v2`); an "e.g." list is not a closed set
        for label in re.finditer(r"`(\w+)`(?:\s*\(([^)]*)\))?", labels_cell):
            values = label.group(2) or ""
            closed = "e.g." not in values
            labels[label.group(1)] = (
                frozenset(re.findall(r"`([^`]+)`", values)) if closed else frozenset()
            )
        metrics[name] = Metric(name, kind, labels)
    return metrics


def _series_names(catalogue: dict[str, Metric]) -> dict[str, Metric]:
    """Series names a query may select: histograms only through their suffixed series."""
    names: dict[str, Metric] = {}
    for metric in catalogue.values():
        if metric.type == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                names[metric.name + suffix] = metric
        else:
            names[metric.name] = metric
    return names


# --------------------------------------------------------------------------- the assets


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' collapsed panels included, rows themselves excluded."""
    for panel in panels:
        if panel.get("type") == "row":
            yield from _panels(panel.get("panels", []))
        else:
            yield panel


def _dashboard_queries() -> list[str]:
    """Every panel query, with Grafana's variables given values PromQL accepts."""
    queries = []
    for panel in _panels(_dashboard()["panels"]):
        for target in panel.get("targets", []):
            queries.append(_substitute(target["expr"]))
    return queries


def _variable_metrics() -> list[str]:
    """The series named by the dashboard's ``label_values(series, label)`` variables."""
    found = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
        assert match is not None, f"variable {variable['name']}: not label_values(): {text}"
        found.append(_substitute(match.group(1)))
    return found


def _substitute(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    assert "$" not in query, f"a Grafana variable this test does not know: {query}"
    return query


def _rule_test_series() -> list[str]:
    document = yaml.safe_load(RULE_TESTS.read_text())
    return [series["series"] for test in document["tests"] for series in test["input_series"]]


# --------------------------------------------------------------------------- PromQL, roughly

_STRING = r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\''
#: Identifiers that are operators, modifiers or literals, never series.
_OPERATORS = {"and", "or", "unless", "bool", "offset"}
_MODIFIERS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = frozenset(_OPERATORS | _MODIFIERS | {"inf", "nan"})


def metric_names(query: str) -> set[str]:
    """The series names a PromQL query selects (functions, labels and keywords removed)."""
    text = re.sub(_STRING, '""', query)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    identifiers = re.findall(r"(?<![\w.$:])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", text)
    return {name for name in identifiers if name.lower() not in _KEYWORDS}


def selectors(query: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """``(series name, [(label, operator, value), ...])`` for each ``name{...}`` in a query."""
    for match in re.finditer(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", query):
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"', match.group(2))
        yield match.group(1), matchers


def grouping_labels(query: str) -> set[str]:
    """Labels named in ``by``, ``without``, ``on`` and ``ignoring`` clauses."""
    labels: set[str] = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
        labels.update(label.strip() for label in clause.split(",") if label.strip())
    return labels


def test_promql_helpers_read_what_they_should() -> None:
    query = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x=~"$job", y="b"}[5m])))'
        " / on (job) group_left sum(rate(b_total[1h] offset 1d)) > 1e3 and c:d:rate5m"
        " or vector(0) unless count(e) by (f)"
    )
    assert metric_names(_substitute(query)) == {"a_bucket", "b_total", "c:d:rate5m", "e"}
    assert list(selectors(query)) == [("a_bucket", [("x", "=~", "$job"), ("y", "=", "b")])]
    assert grouping_labels(query) == {"job", "le", "f"}


# --------------------------------------------------------------------------- promtool


def _promtool() -> str:
    """The promtool binary; skip without it, or fail when CI=true (CI must run these)."""
    path = shutil.which("promtool")
    if path is None:
        problem = (
            "promtool is not on PATH: install Debian's `prometheus` package "
            "(apt-get install prometheus) to check docs/operations/alerts.yml"
        )
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"{problem}; it is required when CI=true", pytrace=False)
        pytest.skip(problem)
    return path


def _run_promtool(*args: str) -> None:
    result = subprocess.run(
        [_promtool(), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_checks_the_rules() -> None:
    _run_promtool("check", "rules", str(RULES.relative_to(ROOT)))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    _run_promtool("test", "rules", str(RULE_TESTS.relative_to(ROOT)))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # A rule file is the one way promtool parses PromQL without a server.
    rules = [
        {"record": f"dashboard:query_{index}:check", "expr": query}
        for index, query in enumerate(_dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    _run_promtool("check", "rules", str(path))


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_is_importable_json_with_a_prometheus_datasource_variable() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"]
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, label in (("route", "http_route"), ("model", "gen_ai_request_model")):
        query = variables[name]["query"]
        text = query["query"] if isinstance(query, dict) else query
        assert re.fullmatch(rf"label_values\(.+,\s*{label}\)", text), name


def test_every_panel_has_a_datasource_and_a_query() -> None:
    panels = list(_panels(_dashboard()["panels"]))
    assert len(panels) >= 20
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        title = panel.get("title")
        assert panel.get("datasource", {}).get("uid") == "${datasource}", title
        assert panel.get("datasource", {}).get("type") == "prometheus", title
        targets = panel.get("targets", [])
        assert targets, f"panel {title!r} has no query"
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {title!r}: an empty query"
            assert target.get("refId"), title


# --------------------------------------------------------------------------- the contract


def _all_queries() -> dict[str, list[str]]:
    return {
        "dashboard": _dashboard_queries() + _variable_metrics(),
        "alerts.yml": [str(rule["expr"]) for rule in _rules()],
        "alerts.test.yml": _rule_test_series(),
    }


@pytest.mark.parametrize("source", ["dashboard", "alerts.yml", "alerts.test.yml"])
def test_every_metric_label_and_value_is_in_the_catalogue(source: str) -> None:
    catalogue = _catalogue()
    assert len(catalogue) >= 15, "could not read the catalogue table of metrics.md"
    series = _series_names(catalogue)
    recorded = _recorded()
    every_label = EXTRA_LABELS.union(*(metric.labels for metric in catalogue.values()))
    queries = _all_queries()[source]
    assert queries
    problems: list[str] = []
    used: set[str] = set()
    for query in queries:
        for name in metric_names(query):
            used.add(name)
            if name not in series and name not in recorded:
                problems.append(f"{name}: not in metrics.md (nor recorded in alerts.yml)")
        for name, matchers in selectors(query):
            metric = series.get(name)
            if metric is None:
                continue  # a recorded series, or already reported
            allowed = EXTRA_LABELS | metric.labels.keys()
            for label, _operator, value in matchers:
                if label not in allowed:
                    problems.append(f"{name}: no label {label!r} in metrics.md")
                    continue
                values = metric.labels.get(label)
                if values and "$" not in value:
                    for alternative in value.split("|"):
                        if alternative not in values:
                            problems.append(f"{name}: {label}={alternative!r} is not listed")
        for label in grouping_labels(query):
            if label not in every_label:
                problems.append(f"label {label!r} (by/on) is in no metric of metrics.md")
    assert not problems, "\n".join(sorted(set(problems)))
    assert used, "no metric name found: the parser is broken"


def test_the_dashboard_covers_the_catalogue() -> None:
    used = {name for query in _dashboard_queries() for name in metric_names(query)}
    shown = {
        metric.name
        for metric in _catalogue().values()
        if metric.name in used or any(metric.name + s in used for s in HISTOGRAM_SUFFIXES)
    }
    assert shown == set(_catalogue()), f"not on the dashboard: {set(_catalogue()) - shown}"


# --------------------------------------------------------------------------- the rules


def test_recording_rule_names_follow_level_metric_operations() -> None:
    recorded = _recorded()
    assert recorded
    for name in recorded:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_every_alert_has_severity_annotations_and_a_runbook_section() -> None:
    anchors = set(re.findall(r"\{#([\w-]+)\}", PAGE.read_text()))
    alerts = _alerts()
    assert len(alerts) >= 8
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        annotations = alert["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        anchor = annotations["runbook_url"].partition("#")[2]
        assert anchor in anchors, f"{name}: no {{#{anchor}}} section in index.md"


def test_every_alert_is_shown_firing_by_a_rule_unit_test() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    firing = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {alert["alert"] for alert in _alerts()} <= firing
