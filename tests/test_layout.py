"""The package's shape, checked: an acyclic import graph (imports inside functions count), files and
functions of a readable size. A cycle or an outsized function is a seam in the wrong place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glmtune"
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 150
MAX_PARAMETERS = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(tree: ast.AST, here: str, known: set[str], is_package: bool) -> set[str]:
    """Every glmtune module a file imports, at its head or inside a function (type-checking-only excluded)."""
    base = here if is_package else here.rpartition(".")[0]
    found: set[str] = set()
    type_checking = [
        n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")
    ]
    skipped = {id(n) for block in type_checking for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                source = f"{parent}.{node.module}" if node.module else parent
            else:
                source = node.module or ""
            # `from package import submodule` imports the submodule; `from module import name`, the module
            names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != here:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: imported_modules(ast.parse(path.read_text()), name, set(known), path.name == "__init__.py")
        for name, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_in_function_imports_are_edges() -> None:
    tree = ast.parse("from . import b\ndef f():\n    from glmtune.pkg.c import thing\n")
    known = {"glmtune.pkg.a", "glmtune.pkg.b", "glmtune.pkg.c"}
    assert imported_modules(tree, "glmtune.pkg.a", known, False) == {"glmtune.pkg.b", "glmtune.pkg.c"}


# glmtune/__init__.py re-exports the public API, so it imports its submodules; a submodule importing the
# package root would always close a cycle through it, which is what the test below forbids.
def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_file_is_too_long() -> None:
    long = {
        name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((f"{name}.{node.name}", node))
    return found


@pytest.mark.parametrize("limit", ["lines", "parameters"])
def test_no_function_is_too_large(limit: str) -> None:
    # Published schemas keep their published signatures: ChatGLM-6B's config and tokenizer take the keys of
    # the released config.json / tokenizer_config.json as keyword arguments.
    published = {"glmtune.models.chatglm.__init__", "glmtune.tokenizers.chatglm.__init__"}

    def size(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        if limit == "lines":
            return node.end_lineno - node.lineno + 1
        a = node.args
        names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
        return len([n for n in names if n.arg not in ("self", "cls")])

    bound = MAX_FUNCTION_LINES if limit == "lines" else MAX_PARAMETERS
    large = {name: n for name, node in functions() if (n := size(node)) > bound and name not in published}
    assert not large, f"functions over {bound} {limit}: {large}"
