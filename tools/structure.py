"""Print the package's import structure and the layout rules it is held to.

    python tools/structure.py                      # this checkout's softprompt/
    python tools/structure.py --root OTHER/softprompt   # e.g. an older commit checked out with git worktree

Read from the source text (``ast``), nothing is imported or run. Sections:

- modules: lines per module (``!`` over the limit: cli.py 300, any other module 450);
- imports: for every module, the package modules it imports (function-level imports included), grouped by
  top-level part (``engine``, ``store``, ``cli``...), with the edges between parts;
- cycles between parts;
- family checks: places outside ``forward/`` that ask which model family a model is (they read
  ``is_encoder_decoder``, call an ``is_seq2seq``/``is_sequence_classifier``-style probe, or branch on a
  family name);
- private imports: a ``_name`` imported from another module.

``tests/test_architecture.py`` checks the same rules, so a change that breaks one fails the suite.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = "softprompt"
LIMITS = {"cli.py": 300}
DEFAULT_LIMIT = 450
FAMILY_PACKAGE = "forward"
# ways of asking which family a model is: the config flag and the probes built on it
FAMILY_PROBES = re.compile(r"is_encoder_decoder|is_seq2seq\b|is_sequence_classifier\b|"
                           r"MODEL_FOR_MASKED_LM_MAPPING|AutoModelForSeq2SeqLM|AutoModelForSequenceClassification")


@dataclass
class Module:
    """One source file of the package."""

    name: str  # dotted, e.g. softprompt.engine.engine
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)  # package modules it imports
    private: list[tuple[int, str, str]] = field(default_factory=list)  # (line, from module, name)
    family_checks: list[tuple[int, str]] = field(default_factory=list)  # (line, source text)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_modules(root: Path) -> dict[str, Module]:
    """Every module under ``root`` (the package folder) with its imports and findings."""
    modules: dict[str, Module] = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        mod = Module(module_name(root, path), path, len(text.splitlines()))
        tree = ast.parse(text, str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mod.imports.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(mod.name, path.name == "__init__.py", node)
                if source.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    mod.imports.add(sub if (root.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                                    or (root.parent / Path(*sub.split("."))).is_dir() else source)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        mod.private.append((node.lineno, source, alias.name))
        inside_family = mod.name.split(".")[1:2] == [FAMILY_PACKAGE]
        if not inside_family and path.name != "structure.py":
            for n, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if FAMILY_PROBES.search(code):
                    mod.family_checks.append((n, line.strip()))
        modules[mod.name] = mod
    for mod in modules.values():  # keep edges to modules that exist (a name imported from a package -> the package)
        mod.imports = {i if i in modules else i.rsplit(".", 1)[0] for i in mod.imports} - {mod.name}
        mod.imports = {i for i in mod.imports if i in modules}
    return modules


def part(name: str) -> str:
    """The top-level part a module belongs to: ``softprompt.engine.engine`` -> ``engine``."""
    bits = name.split(".")
    return bits[1] if len(bits) > 1 else "(package)"


def limit_for(mod: Module) -> int:
    return LIMITS.get(mod.path.name, DEFAULT_LIMIT) if mod.name.count(".") == 1 else DEFAULT_LIMIT


def part_edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for mod in modules.values():
        for imp in mod.imports:
            a, b = part(mod.name), part(imp)
            if a != b and b != "(package)":
                edges[a].add(b)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def report(root: Path) -> tuple[str, int]:
    """The printed sheet and the number of rule violations in it."""
    modules = read_modules(root)
    out, problems = [], 0
    out.append(f"== modules ({len(modules)}, {sum(m.lines for m in modules.values())} lines)")
    for mod in sorted(modules.values(), key=lambda m: m.name):
        over = mod.lines > limit_for(mod)
        problems += over
        out.append(f"{'!' if over else ' '} {mod.lines:5d}  {mod.name}")
    out.append("\n== imports (module -> package modules it imports)")
    for mod in sorted(modules.values(), key=lambda m: m.name):
        if mod.imports:
            out.append(f"  {mod.name} -> {', '.join(sorted(mod.imports))}")
    edges = part_edges(modules)
    out.append("\n== parts (top-level modules and packages) -> parts they import")
    for a in sorted(edges):
        out.append(f"  {a} -> {', '.join(sorted(edges[a]))}")
    found = cycles(edges)
    out.append(f"\n== cycles between parts: {len(found)}")
    out.extend(f"  {' <-> '.join(c)}" for c in found)
    checks = [(m, n, s) for m in sorted(modules.values(), key=lambda m: m.name) for n, s in m.family_checks]
    problems += len(checks)
    out.append(f"\n== family checks outside {PACKAGE}/{FAMILY_PACKAGE}/: {len(checks)}")
    out.extend(f"  {m.path.relative_to(root.parent)}:{n}: {s}" for m, n, s in checks)
    private = [(m, n, src, name) for m in sorted(modules.values(), key=lambda m: m.name)
               for n, src, name in m.private if src != m.name]
    problems += len(private)
    out.append(f"\n== private names imported from another module: {len(private)}")
    out.extend(f"  {m.path.relative_to(root.parent)}:{n}: {name} from {src}" for m, n, src, name in private)
    return "\n".join(out), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent / PACKAGE),
                        help="the package folder to read (default: this checkout's softprompt/)")
    ns = parser.parse_args(argv)
    root = Path(ns.root).resolve()
    if not (root / "__init__.py").is_file():
        print(f"--root {ns.root}: not a package folder (no __init__.py)", file=sys.stderr)
        return 2
    sheet, problems = report(root)
    print(sheet)
    print(f"\n{problems} rule violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
