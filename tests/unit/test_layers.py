"""The package's import arrows point down (DESIGN.md, "Layers"), lazy imports inside functions included.

A module may import its own package (vlarl.models.* from vlarl.models.*) and any package on a lower
layer; an import sideways (another package on the same layer) or upwards fails, which also rules out
import cycles between packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

VLARL = Path(__file__).resolve().parents[2] / "vlarl"

LAYERS = [  # bottom to top
    ["config"],
    ["algo", "data", "metrics", "faults"],
    ["models"],
    ["envs", "rollout", "rewards"],
    ["workers", "datasets", "placement", "robustness"],  # datasets read demonstrations the envs script and convert
    ["cluster", "preflight", "export"],
    ["eval", "sft"],
    ["trainer"],
    ["main"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit_of(module: str) -> str:
    """vlarl.models.tiny_token.family -> models; vlarl.trainer -> trainer"""
    return module.split(".")[1]


def vlarl_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every vlarl import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("vlarl.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlarl"):
            if node.module == "vlarl":
                found += [(node.lineno, f"vlarl.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_every_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in VLARL.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units == set(LEVEL), f"add new packages to LAYERS: {sorted(units ^ set(LEVEL))}"


def test_imports_point_down():
    wrong = []
    for path in sorted(VLARL.rglob("*.py")):
        module = ".".join(path.relative_to(VLARL.parent).with_suffix("").parts)
        if module == "vlarl.__init__":
            continue
        here = unit_of(module)
        for line, target in vlarl_imports(path):
            there = unit_of(target)
            if there != here and LEVEL[there] >= LEVEL[here]:
                wrong.append(f"{path.relative_to(VLARL.parent)}:{line} {here} (layer {LEVEL[here]}) imports "
                             f"{target} (layer {LEVEL[there]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_checker_sees_lazy_and_from_imports(tmp_path):
    """The checker is not blind: function-level imports and `from vlarl import x` are found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from vlarl.trainer import train\n    import vlarl.eval\nfrom vlarl import config\n")
    assert sorted(m for _, m in vlarl_imports(f)) == ["vlarl.config", "vlarl.eval", "vlarl.trainer"]
