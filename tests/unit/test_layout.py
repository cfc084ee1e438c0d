"""The package layout holds: top-level packages import one way, and README's Layout lists every one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "nexus"


def _top_level(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def import_graph() -> dict[str, set[str]]:
    """package -> the other top-level packages of nexus it imports (anywhere in its modules)."""
    edges: dict[str, set[str]] = {}
    for module in PACKAGE.rglob("*.py"):
        if "migrations" in module.parts or module.parent == PACKAGE and module.name == "__init__.py":
            continue
        source = _top_level(module)
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "nexus" and len(parts) > 1 and parts[1] != source:
                    edges.setdefault(source, set()).add(parts[1])
    return edges


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(edges.get(current, ()))
        return False

    return sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if reaches(b, a)})


def test_no_two_packages_import_each_other_in_a_loop():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_loop():
    assert cycles({"jobs": {"agent"}, "agent": {"nodes"}, "nodes": {"jobs"}}) == [
        ("agent", "jobs"), ("agent", "nodes"), ("jobs", "nodes")]


def test_readme_layout_lists_every_package():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"^nexus/([a-z_]+)", layout, re.MULTILINE))
    present = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    present |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert present - listed == set(), "packages missing from README's Layout"
    assert listed - present == set(), "README's Layout names packages that do not exist"


def test_no_work_tracking_labels_in_the_code():
    labelled = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if re.search(r"\bissue \d+", p.read_text())]
    assert labelled == []
