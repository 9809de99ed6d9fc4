"""Checks the package layout: how much of the code each package holds, import circles, and imports that
point up the layers. `python scripts/check_layout.py` prints the report and exits 1 on any violation;
tests/test_layout.py runs it.

Every import counts, including the ones inside functions (a lazy import is still a dependency); only
those under `if TYPE_CHECKING:` are left out, since they never run.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The non-test code whose lines are counted. Test support (tests/, testkit/) is not; benchmarks and
# migrations are. The dashboard's own sources count, its vendored library does not.
CODE_PACKAGES = ("api", "worker", "serving", "svfit_core", "graders", "svfit_cli", "dashboard", "benchmarks", "migrations")
CODE_SUFFIXES = (".py", ".js", ".css", ".html")
VENDORED = "vendor"

# Most of the code a layer may hold: api/ is the HTTP face and the core it shares with the worker.
MAX_SHARE = {"api": 0.45}

# Which of our packages each one may import ("*" any). A module is ruled by the longest prefix listed.
ALLOWED_IMPORTS = {
    "svfit_core": set(),
    # OpenAI's graders as a plain library: the API validates and runs them, the worker computes rewards.
    "graders": set(),
    "dashboard": set(),
    # The core runs the Alembic revisions (migrations/), whose env.py reads the core's tables.
    "api.core": {"svfit_core", "migrations", "graders"},
    "worker": {"api.core", "svfit_core", "graders"},
    # A replica answers with the same error envelope as the API and reads the same store and registry.
    "serving": {"serving", "api.core", "svfit_core"},
    # The API routes inference to replicas over HTTP: it never imports serving/.
    "api": {"api", "svfit_core", "dashboard", "graders"},
    "migrations": {"api.core"},
    "benchmarks": {"benchmarks", "svfit_core", "api", "worker", "serving", "testkit", "graders"},
    "testkit": {"svfit_core", "api.core"},
    "svfit_cli": {"*"},
}
OUR_PACKAGES = ("api", "worker", "serving", "svfit_core", "graders", "svfit_cli", "dashboard", "benchmarks", "migrations", "testkit", "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_modules(packages: tuple[str, ...]) -> dict[str, Path]:
    return {
        module_name(path): path
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import statement in `tree` names (relative imports resolved)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import module` depends on that module (the package's __init__ runs first for
            # any import of a submodule, so it is not counted as a dependency of its own); `from module
            # import name` on the module.
            yield from (f"{source}.{alias.name}" for alias in node.names)
            yield source
        stack.extend(ast.iter_child_nodes(node))


def _names_from(tree: ast.AST, package: str, modules: dict[str, Path]) -> bool:
    """Whether `tree` imports from `package` some name that is not one of its submodules."""
    return any(
        isinstance(node, ast.ImportFrom) and node.module == package
        and any(f"{package}.{alias.name}" not in modules for alias in node.names)
        for node in ast.walk(tree)
    )


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a package's __init__ counts as the package)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        names = list(_imports(tree, module, path.name == "__init__.py"))
        for name in names:
            if name.split(".")[0] in OUR_PACKAGES and name in modules and name != module:
                targets.add(name)
        # `from package import module` is not an import of the package's own __init__.
        for name in names:
            parent = name.rpartition(".")[0]
            if name in modules and parent in targets and not _names_from(tree, parent, modules):
                targets.discard(parent)
        graph[module] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _rule_for(module: str) -> tuple[str, set[str]] | None:
    for prefix in sorted(ALLOWED_IMPORTS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, ALLOWED_IMPORTS[prefix]
    return None


def _within(target: str, allowed: set[str]) -> bool:
    return "*" in allowed or any(target == a or target.startswith(a + ".") for a in allowed)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`importer -> imported` for every import its layer does not allow."""
    problems = []
    for module, targets in sorted(graph.items()):
        rule = _rule_for(module)
        if rule is None:
            continue
        prefix, allowed = rule
        for target in sorted(targets):
            own = target == prefix or target.startswith(prefix + ".")
            if not own and not _within(target, allowed):
                problems.append(f"{module} -> {target} ({prefix} may import: {', '.join(sorted(allowed)) or 'nothing of ours'})")
    return problems


def code_lines() -> dict[str, int]:
    """Lines of non-test code per top-level package."""
    counts = {}
    for package in CODE_PACKAGES:
        files = [
            p for p in (ROOT / package).rglob("*")
            if p.is_file() and p.suffix in CODE_SUFFIXES and VENDORED not in p.parts and "__pycache__" not in p.parts
        ]
        counts[package] = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
    return counts


def report() -> dict:
    graph = import_graph(python_modules(OUR_PACKAGES))
    counts = code_lines()
    total = sum(counts.values())
    shares = {package: lines / total for package, lines in counts.items()}
    too_big = [
        f"{package}/ holds {shares[package]:.1%} of the code (at most {limit:.0%})"
        for package, limit in MAX_SHARE.items() if shares[package] > limit
    ]
    return {
        "lines": counts,
        "total_lines": total,
        "shares": {package: round(share, 4) for package, share in shares.items()},
        "circles": circles(graph),
        "upward_imports": upward_imports(graph),
        "too_big": too_big,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    result = report()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'package':<12} {'lines':>7} {'share':>7}")
        for package, lines in result["lines"].items():
            print(f"{package:<12} {lines:>7} {result['shares'][package]:>7.1%}")
        print(f"{'total':<12} {result['total_lines']:>7}")
        for title in ("circles", "upward_imports", "too_big"):
            items = result[title]
            print(f"{title.replace('_', ' ')}: {len(items) or 'none'}")
            for item in items:
                print(f"  {' <-> '.join(item) if isinstance(item, list) else item}")
    return 1 if result["circles"] or result["upward_imports"] or result["too_big"] else 0


if __name__ == "__main__":
    sys.exit(main())
