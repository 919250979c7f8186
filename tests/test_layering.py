"""Every import of the project goes through its one namespace, cromwell. Dependencies point one way: data/ and model/ at the bottom (neither imports the other nor anything
above it), pretrain/ above them, tools/ and bench/ on top; commands (tools/*.py, bench/*.py and the
training entry points) are imported by no library module and tools import no other command; and no
module takes part in an import cycle."""

import ast

from conftest import REPO

MAY_IMPORT = {
    "data": {"data"},
    "model": {"model"},
    "pretrain": {"data", "model", "pretrain"},
    "tools": {"data", "model", "pretrain"},
    "bench": {"data", "model", "pretrain", "tools", "bench"},
}
LIBRARY = ("data", "model", "pretrain")
ENTRY_POINTS = {"pretrain.train", "pretrain.step_jepa"}  # pretrain/ modules users run as scripts


def _modules():
    for package in MAY_IMPORT:
        for path in sorted((REPO / package).rglob("*.py")):
            yield package, path, ast.parse(path.read_text(), filename=str(path))


def _name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute_imports(tree: ast.AST):
    """(line, module or module.name) of every absolute import, also those inside functions (a lazy import
    is still a dependency)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def _imports(tree: ast.AST):
    """The project's imports, named without the namespace (cromwell.data.shards -> data.shards)."""
    for line, name in _absolute_imports(tree):
        if name.startswith("cromwell."):
            yield line, name.removeprefix("cromwell.")


def _graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports: `from a.b import c` imports the module a.b.c when there
    is one (its package a.b is then being initialised or already is), else a.b."""
    modules = {_name(path): tree for _, path, tree in _modules()}
    graph = {}
    for name, tree in modules.items():
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {alias.name.removeprefix("cromwell.") for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                module = node.module.removeprefix("cromwell.")
                children = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
                edges |= children if len(children) == len(node.names) else children | {module}
        graph[name] = (edges & modules.keys()) - {name}
    return graph


def _is_command(name: str) -> bool:
    return name.split(".")[0] in ("tools", "bench") and name not in ("tools", "bench") or name in ENTRY_POINTS


def test_the_project_is_imported_through_its_namespace_only():
    """`import data` would find the source tree only from its root, and load a second copy of modules
    the namespace already loaded; a relative import hides what it imports from these checks."""
    trees = [(path, tree) for _, path, tree in _modules()]
    trees += [(path, ast.parse(path.read_text(), filename=str(path))) for path in sorted((REPO / "tests").rglob("*.py"))]
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}" for path, tree in trees
             for line, name in _absolute_imports(tree) if name.split(".")[0] in MAY_IMPORT]
    wrong += [f"{path.relative_to(REPO)}:{node.lineno} imports relatively" for path, tree in trees
              for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not wrong, "\n".join(wrong)


def test_imports_point_down():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for package, path, tree in _modules() for line, name in _imports(tree)
             if name.split(".")[0] in MAY_IMPORT and name.split(".")[0] not in MAY_IMPORT[package]]
    assert not wrong, "\n".join(wrong)


def test_no_library_module_imports_a_command():
    graph = _graph()
    assert ENTRY_POINTS <= graph.keys()
    wrong = [f"{name} imports {imported}" for name, imports in graph.items() if name.split(".")[0] in LIBRARY
             for imported in imports if _is_command(imported)]
    assert not wrong, "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join(stack[stack.index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, stack + [imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_there_is_no_import_cycle():
    graph = _graph()
    assert "pretrain.checkpoint" in graph["pretrain.checkpoint.export"]  # the graph holds the real imports
    cycles = _cycles(graph)
    assert not cycles, "\n".join(cycles)


def test_the_cycle_check_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    assert _cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_models_are_constructed_by_the_builder_only():
    """pretrain/, tools/ and bench/ get their models from model/build.py, never from the classes."""
    wrong = [f"{path.relative_to(REPO)}:{node.lineno} calls {ast.unparse(node.func)}"
             for package, path, tree in _modules() if package in ("pretrain", "tools", "bench")
             for node in ast.walk(tree)
             if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] in ("GPT", "VLJEPA")]
    assert not wrong, "\n".join(wrong)
