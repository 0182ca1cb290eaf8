"""The layout's rules, read from the source: one layer per folder, imports pointing one way.

    proxy.core      <- proxy.dialects <- proxy.state <- proxy.server <- proxy.cli
    proxy.replay    (the stand-in upstream) uses core and dialects only
    proxy.client    (helpers for the proxy's clients) uses nothing of the proxy
    guard           uses proxy.core only, never the server
    bench           may use anything; nothing in proxy/ or guard/ imports it (but the CLI's dispatch)

Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import, besides itself and the standard library / third-party packages.
ALLOWED: dict[str, set[str]] = {
    "proxy.core": set(),
    "proxy.dialects": {"proxy.core"},
    "proxy.state": {"proxy.core", "proxy.dialects"},
    "proxy.replay": {"proxy.core", "proxy.dialects"},
    "proxy.client": set(),
    "proxy.server": {"proxy.core", "proxy.dialects", "proxy.state", "proxy.replay", "guard"},
    "proxy.cli": {
        "proxy.core",
        "proxy.dialects",
        "proxy.state",
        "proxy.replay",
        "proxy.server",
        "guard",
        "bench",
    },
    "guard": {"proxy.core"},
    "bench": {"proxy", "guard"},
}
# Third-party packages that the sans-IO core and the model code must not touch.
FORBIDDEN: dict[str, set[str]] = {
    "proxy.core": {"aiohttp", "torch", "redis", "transformers"},
    "proxy.dialects": {"aiohttp", "torch", "redis", "transformers"},
    # No dependency of its own: it reads the SDKs' objects without importing them.
    "proxy.client": {"aiohttp", "torch", "redis", "transformers", "openai", "anthropic", "ollama", "httpx"},
    "guard": {"aiohttp", "redis"},
}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (the longest prefix in ALLOWED)."""
    best = None
    for layer in ALLOWED:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def modules() -> dict[str, Path]:
    found = {}
    for package in ("proxy", "guard", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(p for p in parts if p != "__init__")] = path
    return found


def imports(path: Path, module: str) -> set[str]:
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_every_module_belongs_to_a_layer() -> None:
    loose = [m for m in modules() if layer_of(m) is None and m not in ("proxy", "proxy.cli")]
    assert loose == [], f"modules outside every layer folder: {loose}"


def test_imports_point_one_way() -> None:
    wrong = []
    for module, path in modules().items():
        layer = layer_of(module)
        if layer is None:
            continue
        for name in imports(path, module):
            target = layer_of(name)
            if name.split(".")[0] not in ("proxy", "guard", "bench") or target in (None, layer):
                continue
            allowed = ALLOWED[layer]
            if not any(target == a or target.startswith(a + ".") for a in allowed):
                wrong.append(f"{module} imports {name} ({layer} -> {target})")
    assert wrong == []


def test_core_and_dialects_stay_free_of_io_and_torch() -> None:
    wrong = []
    for module, path in modules().items():
        banned = FORBIDDEN.get(layer_of(module) or "", set())
        for name in imports(path, module):
            if name.split(".")[0] in banned:
                wrong.append(f"{module} imports {name}")
    assert wrong == []


def test_no_module_over_500_lines() -> None:
    lengths = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}
    long = {m: n for m, n in lengths.items() if n > 500}
    assert long == {}


def test_the_serving_package_holds_no_benchmark_code() -> None:
    names = {m for m in modules() if m.startswith("proxy.")}
    assert not [m for m in names if "bench" in m]
    for module, path in modules().items():
        if module.startswith(("proxy.", "guard.")) and module != "proxy.cli.main":
            assert not [n for n in imports(path, module) if n.split(".")[0] in ("bench", "litellm")], module


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    """The walk would catch a core module that imported the server (the rule is not vacuous)."""
    bad = tmp_path / "engine.py"
    bad.write_text("from proxy.server.app import create_app\n", encoding="utf-8")
    names = imports(bad, "proxy.core.engine")
    assert "proxy.server.app" in names
    assert layer_of("proxy.server.app") not in ALLOWED["proxy.core"]


def test_the_readme_layout_names_every_module_where_it_is() -> None:
    """A newcomer reading the README's layout table finds each module in the folder its row names."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout") :]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`").split("`")[0]] = cells[2]
    missing = []
    for path in modules().values():
        if path.name == "__init__.py":
            continue
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        if folder not in rows or f"`{path.name}`" not in rows[folder]:
            missing.append(f"{path.relative_to(ROOT)}")
    assert missing == []
    named = {folder + name for folder, cell in rows.items() for name in re.findall(r"`([\w/]+\.py)`", cell)}
    assert sorted(n for n in named if not (ROOT / n).exists()) == []
