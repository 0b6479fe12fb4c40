"""The house rules, checked on the source: one package per stage, imports only downwards.

Run ``python -m tests.test_architecture`` for the figures (floors, arrows, longest chains) as JSON."""

from __future__ import annotations

import ast
import json
from functools import cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mrivq"
MAX_FLOORS = 9
#: packages that using a trained run needs, which therefore never import training
USE_ONLY = ("inference", "evaluate")


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(mods: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(importer, imported module, imported name or None) for every import of mrivq, lazy ones included."""
    out = []
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                out += [(m, a.name, None) for a in node.names if a.name.split(".")[0] == "mrivq"]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] != "mrivq":
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append((m, sub, None) if sub in mods else (m, base, a.name))
    return out


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    mods = modules()
    g: dict[str, set[str]] = {package_of(m): set() for m in mods}
    for a, b, _ in imports(mods):
        pa, pb = package_of(a), package_of(b)
        if pa != pb and pb != "mrivq":  # mrivq/__init__ is the lazy public API, imported by nobody inside
            g[pa].add(pb)
    return g


def floors(g: dict[str, set[str]]) -> dict[str, int]:
    """Floor of each node: 1 + the highest floor it imports (a circle raises RecursionError)."""

    @cache
    def floor(n: str, depth: int = 0) -> int:
        if depth > len(g):
            raise RecursionError(f"import circle through {n}")
        return 1 + max((floor(t, depth + 1) for t in g[n]), default=0)

    return {n: floor(n) for n in g}


def figures() -> dict:
    mods = modules()
    g = package_graph()
    f = floors(g)
    mg: dict[str, set[str]] = {m: set() for m in mods}
    for a, b, _ in imports(mods):
        if b in mg and a != b and b != "mrivq":
            mg[a].add(b)
    mf = floors(mg)
    return {"packages": len(g), "package_floors": max(f.values()), "package_arrows": sum(map(len, g.values())),
            "floors": {k: sorted(n for n in f if f[n] == k) for k in sorted(set(f.values()))},
            "modules": len(mods), "module_floors": max(mf.values()), "module_arrows": sum(map(len, mg.values()))}


def test_packages_sit_on_at_most_nine_floors_with_no_circle() -> None:
    fig = figures()  # floors() raises on a circle
    assert fig["package_floors"] <= MAX_FLOORS, fig["floors"]


def test_using_a_run_never_imports_training() -> None:
    g = package_graph()
    for p in USE_ONLY:
        assert "mrivq.training" not in g[f"mrivq.{p}"], p


def test_no_private_name_crosses_a_module() -> None:
    bad = [(a, b, n) for a, b, n in imports(modules()) if n and n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_no_top_level_module_but_init_and_main() -> None:
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top


def test_package_inits_re_export_nothing() -> None:
    """No ``__init__`` hands on what its own modules define (the top-level one is the lazy public API)."""
    for p in PKG.rglob("__init__.py"):
        if p.parent == PKG:
            continue
        own = ".".join(p.parent.relative_to(PKG.parent).parts)
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom):
                assert not (n.level or (n.module or "").startswith(own)), (p, n.module)


if __name__ == "__main__":
    print(json.dumps(figures(), indent=1))
