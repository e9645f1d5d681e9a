"""The layout the code keeps: one module per stage in each layer, dependencies flowing one way."""

import ast
from pathlib import Path

import pytest

from storage import STAGES

ROOT = Path(__file__).resolve().parents[1]
CORE_OF = {"optical_flow": "flow", "noise_filter": "noise_sensor"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_has_one_task_module_and_one_core_module_and_no_task_imports_another(stage):
    core = CORE_OF.get(stage, stage)
    assert (ROOT / "tasks" / f"{stage}.py").is_file()
    assert (ROOT / "freetalk_core" / f"{core}.py").is_file() or (ROOT / "freetalk_core" / core).is_dir()
    others = {f"tasks.{s}" for s in STAGES if s != stage}
    assert not _imports(ROOT / "tasks" / f"{stage}.py") & others


@pytest.mark.parametrize("layer, forbidden", [("freetalk_core", ("prefect", "storage", "tasks", "flows")),
                                              ("storage", ("freetalk_core", "tasks", "flows", "prefect")),
                                              ("tasks", ("flows",))])
def test_dependencies_flow_from_flows_to_tasks_to_the_core_and_the_store(layer, forbidden):
    for path in (ROOT / layer).rglob("*.py"):
        bad = {name for name in _imports(path) if name.split(".")[0] in forbidden}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
