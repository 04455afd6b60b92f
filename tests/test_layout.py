"""The package's shape: imports point down the layers only (no circle, nothing lower importing something
higher), and every error that means "the user can fix this" is a gpo_fast.errors.UserError, which the
CLI answers in one place."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# From the bottom up (README, "Layout"); a module may import its own layer or lower ones.
LAYERS = {
    1: ["errors", "language", "config", "checkpoint", "distributed", "stop", "_toplevel"],
    2: ["objective", "kernels", "kernels.mse", "kernels.gpo", ""],  # "": gpo_fast/__init__ re-exports the loss
    3: ["models", "models.base", "models.sd3", "models.testing", "rewards", "rewards.base", "rewards.counting",
        "rewards.text", "rewards.composite", "rewards.python", "toy", "toy.data", "toy.model", "toy.reward",
        "toy.evaluate", "toy.pretrain", "sampling", "prompts", "watch", "evaluate", "flops"],
    4: ["components"],
    5: ["update", "train", "report", "card", "tuned", "plan", "tracking"],
    6: ["cli", "doctor"],
}
LAYER = {("gpo_fast." + m).rstrip("."): layer for layer, mods in LAYERS.items() for m in mods}


def _files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "gpo_fast").rglob("*.py"):
        rel = path.relative_to(ROOT / "gpo_fast").with_suffix("")
        files[".".join(("gpo_fast", *rel.parts)).removesuffix(".__init__")] = path
    for path in (ROOT / "kernels").glob("*.py"):  # installed as gpo_fast.kernels
        files[f"gpo_fast.kernels.{path.stem}".removesuffix(".__init__")] = path
    return files


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The gpo_fast modules `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = _files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer():
    assert set(_graph()) == set(LAYER)


def _upward(graph) -> list[str]:
    return [f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
            for a, deps in graph.items() for b in deps if LAYER[b] > LAYER[a]]


def _circles(graph) -> list[list[str]]:
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def test_imports_point_down_the_layers_only():
    assert _upward(_graph()) == []


def test_the_import_graph_has_no_circle():
    assert _circles(_graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle():
    graph = _graph()
    graph["gpo_fast.language"] = graph["gpo_fast.language"] | {"gpo_fast.prompts"}  # prompts imports language
    assert _upward(graph) == ["gpo_fast.language (layer 1) imports gpo_fast.prompts (layer 3)"]
    assert ["gpo_fast.language", "gpo_fast.prompts", "gpo_fast.language"] in _circles(graph)


USER_ERRORS = ["gpo_fast.checkpoint.CheckpointError", "gpo_fast.checkpoint.DamagedCheckpoint",
               "gpo_fast.config.ConfigError", "gpo_fast.models.sd3.ModelLoadError", "gpo_fast.prompts.PromptFileError",
               "gpo_fast.rewards.base.RewardEngineError", "gpo_fast.rewards.python.PythonRewardError",
               "gpo_fast.train.TrainingDiverged"]


@pytest.mark.parametrize("name", USER_ERRORS)
def test_every_error_for_the_user_is_a_user_error(name):
    import importlib

    from gpo_fast.errors import UserError

    module, _, cls = name.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), UserError)
