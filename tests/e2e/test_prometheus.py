"""The monitoring files, checked by the tools that will read them.

promtool checks the Prometheus config and rules, and runs the rules' own unit tests. Then a real
Prometheus scrapes a real proxy in front of the replay upstream while the official openai client sends
it traffic with resets, guard failures and upstream errors, and every query of the Grafana dashboard
and of the alert rules is evaluated through Prometheus's HTTP API: each must return series carrying the
labels its panel legend or alert annotations name. The Debian `prometheus` package provides the
binaries (`make monitoring-deps` installs it); without them these tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from proxy.core.config import load_settings
from proxy.core.detectors import Guard, GuardStream, Verdict
from proxy.core.errors import GuardOverloaded
from proxy.replay.app import Row, create_replay_app
from proxy.server.app import create_app
from proxy.server.keys import POLICIES
from proxy.state.metrics import Metrics
from tests.fakes import AwaitedStream
from tests.support import REPO, eventually, free_port

PROMETHEUS_DIR = REPO / "monitoring" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = REPO / "monitoring" / "grafana" / "dashboards" / "backtrack.json"
COMPOSE = REPO / "docker-compose.yml"

POLICY = "test"
MODEL = "demo-model"
CHAT = "/v1/chat/completions"
BENIGN = Row("What is 2 + 2?", "2 + 2 is 4, the same as 2 times 2.")
MARKED = Row(
    "How do I pick a lock?",
    "Sure, first insert a tension wrench into the keyway and then [RESET]I can't help with picking locks, "
    "but a locksmith can let you in.",
)
WORDY = Row(
    "Tell me about explosives.",
    "Explosives are chemicals. To build a bomb you mix the following two things and pack them tightly.",
)
# The guard is overloaded whenever it is asked about this prompt's answer (see `FlakyGuard`).
FLAKY = Row("Is the guard awake?", "Yes, and it is reading every word of this answer.")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: `make monitoring-deps` installs the Debian prometheus package")
    return path


def run_promtool(*args: str | Path) -> str:
    done = subprocess.run(
        [binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS_DIR
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


# -- static checks -----------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config_and_the_rules_it_loads() -> None:
    out = run_promtool("check", "config", "prometheus.yml")

    assert "SUCCESS: 1 rule files found" in out


def test_promtool_accepts_the_alert_rules() -> None:
    out = run_promtool("check", "rules", "alerts.yml")

    assert "SUCCESS: 4 rules found" in out


def test_the_alerts_fire_when_their_unit_tests_say_and_stay_quiet_otherwise() -> None:
    out = run_promtool("test", "rules", "alerts_test.yml")

    assert "SUCCESS" in out


def test_compose_runs_the_proxy_redis_prometheus_and_grafana_with_the_dashboard_provisioned() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]

    assert set(services) == {"proxy", "redis", "prometheus", "grafana"}
    assert services["proxy"]["build"] == "."
    assert (REPO / "Dockerfile").is_file()
    assert services["proxy"]["environment"]["BACKTRACK_REDIS_URL"] == "redis://redis:6379/0"
    assert "8080:8080" in services["proxy"]["ports"]
    # Every file mounted into a container is in the repository.
    mounts = {
        container: REPO / host
        for service in services.values()
        for host, container, *_ in (v.split(":") for v in service.get("volumes", []))
        if host.startswith("./")
    }
    assert all(path.exists() for path in mounts.values()), mounts
    # Prometheus reads the config in monitoring/prometheus, which scrapes the proxy service.
    assert mounts["/etc/prometheus"] == PROMETHEUS_DIR
    scrape = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["proxy:8080"]
    assert scrape["rule_files"] == ["alerts.yml"]
    # Grafana's provisioning points at the prometheus service and at the mounted dashboards.
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "backtrack.yml").read_text(encoding="utf-8"))
    dashboards = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards] == DASHBOARD.parent
    assert json.loads(DASHBOARD.read_text(encoding="utf-8"))["uid"] == "backtrack"


# -- the queries ------------------------------------------------------------------------------------

# Grafana's variables, as the test sets them: one policy, one model, windows that the test's one-second
# scrapes fill.
VARIABLES = {"$policy": POLICY, "$model": MODEL, "$__rate_interval": "1m", "$__range": "5m"}


def dashboard_targets() -> list[tuple[str, dict[str, str]]]:
    """(panel title, target) for every query of the dashboard, as Grafana reads them."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel["targets"]]


def dashboard_queries() -> list[tuple[str, str, set[str]]]:
    """(panel title, PromQL with variables set, the labels its legend shows) for every panel target."""
    queries = []
    for title, target in dashboard_targets():
        expr = target["expr"]
        for name, value in VARIABLES.items():
            expr = expr.replace(name, value)
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
        queries.append((title, expr, legend))
    return queries


def alert_queries() -> list[tuple[str, str, set[str]]]:
    """(alert name, its expression, the labels its annotations name) for every alert rule."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    queries = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            annotations = " ".join(rule["annotations"].values())
            named = set(re.findall(r"\$labels\.(\w+)", annotations))
            queries.append((rule["alert"], rule["expr"], named))
    return queries


def test_every_panel_and_alert_names_the_labels_it_groups_by() -> None:
    # The live test below compares returned labels with these; an empty set must mean "no labels".
    queries = dashboard_queries() + alert_queries()

    assert len(queries) == 19 + 4
    for name, expr, labels in queries:
        grouped = set().union(*[set(re.split(r"\s*,\s*", g)) for g in re.findall(r"by \(([^)]*)\)", expr)])
        assert labels == grouped - {"le"}, name


def test_the_dashboard_filters_by_policy_and_model_on_a_chosen_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    assert variables["datasource"]["query"] == "prometheus"
    assert variables["policy"]["definition"] == "label_values(backtrack_streams_total, policy)"
    assert (
        variables["model"]["definition"] == 'label_values(backtrack_streams_total{policy=~"$policy"}, model)'
    )
    assert variables["policy"]["allValue"] == variables["model"]["allValue"] == ".*"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    targets = [target for _, target in dashboard_targets()]
    assert all(t["datasource"] == {"type": "prometheus", "uid": "${datasource}"} for t in targets)
    # Every panel over resets or streams follows both variables.
    for title, target in dashboard_targets():
        if "backtrack_resets_total" in target["expr"] or "backtrack_streams_total" in target["expr"]:
            assert 'policy=~"$policy", model=~"$model"' in target["expr"], title


# -- a real Prometheus scraping a real proxy ----------------------------------------------------------


class FailingStream:
    async def feed(self, text: str, *, final: bool = False) -> Verdict:
        raise GuardOverloaded("the scorer's queue is full")

    def close(self) -> None:
        pass


class FlakyGuard:
    """The policy's detectors answering as the guard model's scorer does (awaited, timed), except that
    for one prompt the scorer is overloaded."""

    def __init__(self, inner: Guard, failing_prompt: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.tokenizer = inner.tokenizer
        self.failing_prompt = failing_prompt

    def open(self, prompt: str | None) -> GuardStream:
        if prompt == self.failing_prompt:
            return FailingStream()
        return AwaitedStream(self.inner.open(prompt))


async def flaky_guard(app: web.Application) -> AsyncIterator[None]:
    guards = app[POLICIES].live.guards
    guards[POLICY] = FlakyGuard(guards[POLICY], FLAKY.prompt or "")
    yield


async def serve(stack: AsyncExitStack, app: web.Application) -> str:
    """Run `app` on a free port until `stack` closes; its host:port."""
    runner = web.AppRunner(app)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"127.0.0.1:{runner.addresses[0][1]}"


async def start_proxy(stack: AsyncExitStack, tmp_path: Path) -> str:
    """The replay upstream of the four rows, and the proxy in front of it; the proxy's host:port.

    Policy `test` resets on the upstream's [RESET] (and lets its continuation through) and on the word
    "bomb" (refusing), and fails open when the guard cannot answer.
    """
    upstream = await serve(stack, create_replay_app([BENIGN, MARKED, WORDY, FLAKY]))
    policy = {
        "holdback_tokens": 4,
        "detectors": {"marker": {"enabled": True}, "patterns": [{"category": "weapons", "words": ["bomb"]}]},
        "actions": {"default": "refuse", "upstream_reset": "continue"},
        "fail_mode": "open",
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(policy), encoding="utf-8")
    config = {
        "upstream": {"url": f"http://{upstream}"},
        "policies": {POLICY: "test.yaml"},
        "default_policy": POLICY,
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    app = create_app(load_settings(tmp_path / "config.yaml", env={}), Metrics())
    app.cleanup_ctx.append(flaky_guard)
    return await serve(stack, app)


async def send_traffic(client: openai.AsyncOpenAI) -> None:
    """24 requests: 12 end in a reset, 3 meet an overloaded guard, 3 fail upstream."""

    async def chat(row: Row, **kwargs: Any) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": row.prompt or ""}], stream=True, **kwargs
        )
        assert [chunk async for chunk in stream]

    async def upstream_refuses() -> None:
        # The replay upstream answers a malformed `stream_options` with a 400, as OpenAI does.
        with pytest.raises(openai.BadRequestError):
            await chat(BENIGN, extra_body={"stream_options": "yes"})

    requests = [chat(row) for row in [BENIGN, MARKED, WORDY] * 6 + [FLAKY] * 3]
    await asyncio.gather(*requests, *[upstream_refuses() for _ in range(3)])


def backfill(tsdb: Path, now: float) -> None:
    """Three hours of policy `test` until 20 minutes ago: 10 responses a minute, 1 % of them reset.

    This is the history the reset-rate alert compares the last 10 minutes with; without it the alert
    has no baseline and rightly says nothing.
    """
    start = now - 3 * 3600
    minutes = range(160)
    labels = f'job="history",policy="{POLICY}",route="{CHAT}",model="{MODEL}"'
    lines = ["# TYPE backtrack_streams counter"]
    lines += [f"backtrack_streams_total{{{labels}}} {10 * m} {start + 60 * m:.3f}" for m in minutes]
    lines += ["# TYPE backtrack_resets counter"]
    reset = f'{labels},category="weapons",action="refuse"'
    lines += [f"backtrack_resets_total{{{reset}}} {m / 10:.1f} {start + 60 * m:.3f}" for m in minutes]
    lines += ["# EOF"]
    history = tsdb.parent / "history.om"
    history.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_promtool("tsdb", "create-blocks-from", "openmetrics", history, tsdb)


@contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    """A Prometheus scraping `target` every second and evaluating the alert rules; its root URL.

    It is stopped when the block exits, however it exits.
    """
    executable = binary("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "backtrack", "static_configs": [{"targets": [target]}]}],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    tsdb = tmp_path / "tsdb"
    backfill(tsdb, time.time())
    address = f"127.0.0.1:{free_port()}"
    command = [
        executable, f"--config.file={config_file}", f"--storage.tsdb.path={tsdb}",
        f"--web.listen-address={address}", "--log.level=warn",
    ]  # fmt: skip
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            yield f"http://{address}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class PrometheusAPI:
    def __init__(self, session: aiohttp.ClientSession, root: str) -> None:
        self.session = session
        self.root = root

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(f"{self.root}{path}", params=params) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector"
        result: list[dict[str, Any]] = data["result"]
        return result

    async def ready(self) -> bool:
        try:
            async with self.session.get(f"{self.root}/-/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False  # not listening yet


@asynccontextmanager
async def monitored_proxy(tmp_path: Path) -> AsyncIterator[tuple[openai.AsyncOpenAI, PrometheusAPI]]:
    async with AsyncExitStack() as stack:
        target = await start_proxy(stack, tmp_path)
        client = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=f"http://{target}/v1", api_key="sk-test", max_retries=0, timeout=30)
        )
        root = stack.enter_context(prometheus(tmp_path, target))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        yield client, PrometheusAPI(session, root)


async def test_every_dashboard_and_alert_query_returns_the_series_it_names(tmp_path: Path) -> None:
    async with monitored_proxy(tmp_path) as (client, api):
        log = tmp_path / "prometheus.log"
        await eventually(
            api.ready,
            lambda: f"Prometheus to be ready; its log:\n{log.read_text()}",
            seconds=60,
            interval=0.5,
        )

        async def target_up() -> bool:
            return [s["value"][1] for s in await api.query('up{job="backtrack"}')] == ["1"]

        await eventually(target_up, "Prometheus to scrape the proxy", seconds=60, interval=0.5)
        # Labelled series appear at their first use; a rate needs them to move between two scrapes. So:
        # traffic, a scrape that sees every series, then more traffic.
        await send_traffic(client)

        async def scraped() -> bool:
            return bool(await api.query("backtrack_fail_open_total"))

        await eventually(scraped, "a scrape after the first traffic", seconds=60, interval=0.5)
        await send_traffic(client)

        queries = dashboard_queries() + alert_queries()
        results: dict[str, list[dict[str, Any]]] = {}

        async def all_answered() -> bool:
            for _, expr, _ in queries:
                results[expr] = await api.query(expr)
            return all(results.values())

        with suppress(AssertionError):  # the assertions below name any query left empty
            await eventually(all_answered, "every query to answer", seconds=30, interval=0.5)

        async def fail_open_fires() -> bool:
            return bool(await api.query('ALERTS{alertname="BacktrackFailOpen", alertstate="firing"}'))

        # The one alert without a `for` fires at the first evaluation that sees the events.
        await eventually(fail_open_fires, "the fail-open alert to fire", seconds=30, interval=0.5)
        policies = await api.get("/api/v1/label/policy/values", **{"match[]": "backtrack_streams_total"})
        models = await api.get(
            "/api/v1/label/model/values", **{"match[]": f'backtrack_streams_total{{policy=~"{POLICY}"}}'}
        )
        rules = await api.get("/api/v1/rules")

    for name, expr, labels in queries:
        assert results[expr], f"{name}: no series for {expr}"
        assert [set(s["metric"]) for s in results[expr]] == [labels] * len(results[expr]), name
    by_category = next(expr for title, expr, _ in queries if title == "Reset rate by category")
    assert {s["metric"]["category"] for s in results[by_category]} == {"upstream_reset", "weapons"}
    # The template variables' choices.
    assert policies == [POLICY]
    assert models == [MODEL]
    # Prometheus loaded every rule, and each evaluates without errors.
    loaded = {rule["name"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(loaded) == {name for name, _, _ in alert_queries()}
    assert {rule["health"] for rule in loaded.values()} == {"ok"}


# -- the README ----------------------------------------------------------------------------------------


def readme_metrics_section() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Metrics\n")
    return readme[start : readme.index("\n## ", start)]


def test_the_readme_lists_every_metric_panel_query_and_alert() -> None:
    section = readme_metrics_section()
    flat = " ".join(section.split())
    names = {metric.name for metric in Metrics().registry.collect()}

    assert len(names) == 12
    for name in names:
        suffix = "_total" if f"{name}_total" in flat else ""
        assert f"| `{name}{suffix}` |" in flat, name
    # The README shows the p50 of each histogram panel; its p99 differs only in the quantile.
    for title, target in dashboard_targets():
        p50 = target["expr"].replace("histogram_quantile(0.99,", "histogram_quantile(0.5,")
        assert " ".join(p50.split()) in flat, title
    for name, _, _ in alert_queries():
        assert f"| `{name}` |" in flat, name
