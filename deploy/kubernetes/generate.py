"""Write the Kubernetes manifests that embed files of this repository, from those files.

    python deploy/kubernetes/generate.py           # rewrite them
    python deploy/kubernetes/generate.py --check   # exit 1, naming them, when one is out of date

- base/configmap.yaml: the ConfigMap `backtrack-config`, with deploy/kubernetes/config.yaml as
  `config.yaml` and every file of policies/ under its own name (the Deployment's volume items put
  them at policies/NAME). One ConfigMap, so that one update of it is one swap on the pods' disks.
- monitoring/prometheusrule.yaml: the PrometheusRule `backtrack`, whose groups are
  monitoring/prometheus/alerts.yml's.
- monitoring/grafana-dashboard.yaml: a ConfigMap holding monitoring/grafana/dashboards/backtrack.json,
  labelled `grafana_dashboard: "1"` for the Grafana sidecar that loads dashboards from ConfigMaps.

kustomize's configMapGenerator cannot do this: it reads no file above the kustomization's folder, and
the hash it appends to a generated ConfigMap's name rolls the Deployment on every policy edit, where
the proxy would reload it in place. tests/deploy/test_manifests.py runs `--check`'s comparison and
validates what is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
HEADER = "# Generated from {sources} by deploy/kubernetes/generate.py: edit the source, not this.\n"
LABELS = {"app.kubernetes.io/name": "backtrack", "app.kubernetes.io/component": "proxy"}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so an embedded file reads as itself in the manifest."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def _dump(sources: str, manifest: dict[str, Any]) -> str:
    body = yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=110)
    return HEADER.format(sources=sources) + body


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def render() -> dict[Path, str]:
    """Each generated manifest's path and the text it should have."""
    policies = sorted((REPO / "policies").glob("*.yaml"))
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "backtrack-config", "labels": LABELS},
        "data": {"config.yaml": _text(HERE / "config.yaml"), **{p.name: _text(p) for p in policies}},
    }
    alerts = yaml.safe_load(_text(REPO / "monitoring" / "prometheus" / "alerts.yml"))
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "backtrack", "labels": LABELS},
        "spec": {"groups": alerts["groups"]},
    }
    dashboard = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "backtrack-dashboard", "labels": {**LABELS, "grafana_dashboard": "1"}},
        "data": {"backtrack.json": _text(REPO / "monitoring" / "grafana" / "dashboards" / "backtrack.json")},
    }
    return {
        HERE / "base" / "configmap.yaml": _dump("deploy/kubernetes/config.yaml and policies/", config),
        HERE / "monitoring" / "prometheusrule.yaml": _dump("monitoring/prometheus/alerts.yml", rule),
        HERE / "monitoring" / "grafana-dashboard.yaml": _dump(
            "monitoring/grafana/dashboards/backtrack.json", dashboard
        ),
    }


def stale() -> list[Path]:
    """The generated manifests whose text on disk is not what `render` gives."""
    return [path for path, text in render().items() if not path.exists() or _text(path) != text]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        out_of_date = stale()
        for path in out_of_date:
            print(f"{path.relative_to(REPO)} is out of date: run python deploy/kubernetes/generate.py")
        return 1 if out_of_date else 0
    if argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    for path, text in render().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
