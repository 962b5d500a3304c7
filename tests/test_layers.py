"""The core never imports the layers above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alignment"


ABOVE = ("stages", "reward_models", "alignment.app")
# the application: the CLI package and `python -m alignment`, which starts it
APP = {ROOT / "app", ROOT / "__main__.py"}


def _imported_names(node) -> list[str]:
    """Modules a node imports: import statements, and import_module / __import__ called with a constant string (the
    stage registry's `module:Class` strings are parsed, not imported here, so they are not seen: the one sanctioned
    exception)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def test_alignment_never_imports_stages_or_reward_models():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(path == a or a in path.parents for a in APP):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            offenders += [f"{path.name}: {n}" for n in _imported_names(node)
                          if any(n == top or n.startswith(top + ".") for top in ABOVE)]
    assert offenders == []


def test_the_layer_check_sees_string_imports():
    """The check above would catch the import string the old CLI used to reach reward_models."""
    node = ast.parse('importlib.import_module("reward_models.evaluate")').body[0].value
    assert _imported_names(node) == ["reward_models.evaluate"]
