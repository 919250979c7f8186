"""Dependencies point one way: data/ and model/ at the bottom (neither imports the other nor anything
above it), pretrain/ above them, tools/ and bench/ on top (bench may use tools, not the reverse);
and nothing imports a training entry point (a pretrain/ module run as a script)."""

import ast

from conftest import REPO

MAY_IMPORT = {
    "data": {"data"},
    "model": {"model"},
    "pretrain": {"data", "model", "pretrain"},
    "tools": {"data", "model", "pretrain", "tools"},
    "bench": {"data", "model", "pretrain", "tools", "bench"},
}


def _modules():
    for package in MAY_IMPORT:
        for path in sorted((REPO / package).rglob("*.py")):
            yield package, path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.AST):
    """Every absolute import, also those inside functions (a lazy import is still a dependency)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def _is_entry_point(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def test_imports_point_down():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for package, path, tree in _modules() for line, name in _imports(tree)
             if name.split(".")[0] in MAY_IMPORT and name.split(".")[0] not in MAY_IMPORT[package]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_training_entry_point():
    entry_points = {".".join(path.relative_to(REPO).with_suffix("").parts)
                    for package, path, tree in _modules() if package == "pretrain" and _is_entry_point(tree)}
    assert {"pretrain.train", "pretrain.step_jepa"} <= entry_points
    wrong = [f"{path.relative_to(REPO)}:{line} imports {name}"
             for _, path, tree in _modules() for line, name in _imports(tree) if name in entry_points]
    assert not wrong, "\n".join(wrong)
