"""The core never imports the layers above it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alignment"


def test_alignment_never_imports_stages_or_reward_models():
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("stages", "reward_models")]
    assert offenders == []
