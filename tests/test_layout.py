"""The folder tree is the architecture: imports only run down the layers, only the PyTorch side imports
torch, and nothing edits sys.path."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "koala_jax"
# Lowest first; a module may import its own layer and the ones before it.
LAYERS = (
    *("errors", "dtypes", "files", "console"),  # leaves
    *("models", "students", "weights", "data", "pipelines", "train", "evaluation", "cli"),
)
TORCH_LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics")
# The PyTorch side: the diffusers/transformers pipelines, data preparation with the teacher's encoders, the
# opt-in readers of torch pickles and original checkpoints (diffusers' own key converter), and the metrics of
# real models (CLIP score, FID, HPSv2: torchmetrics, transformers, hpsv2; imported inside its functions).
TORCH_ALLOWED = (
    "koala_jax/pipelines/",
    "koala_jax/data/prepare.py",
    "koala_jax/weights/single_file.py",
    "koala_jax/evaluation/real_metrics.py",
)


def layer(module: str) -> int:
    """Layer index of a dotted module name inside koala_jax (sub-packages and top-level leaves)."""
    return LAYERS.index(module.split(".")[1])


def imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import in `path`, function-level ones included (lazy imports
    are still dependencies)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_belongs_to_a_layer():
    assert {module_name(p).split(".")[1] for p in package_modules()} <= set(LAYERS)


def test_imports_run_down_the_layers():
    wrong = []
    for path in package_modules():
        own = layer(module_name(path))
        for name, line in imports(path):
            if name == "koala_jax":
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports the koala_jax facade")
            elif name.startswith("koala_jax.") and layer(name) > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} (a layer above)")
    assert not wrong, "\n".join(wrong)


def test_only_the_pytorch_side_imports_torch():
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in package_modules()
        if not str(path.relative_to(ROOT)).startswith(TORCH_ALLOWED)
        for name, line in imports(path)
        if name.split(".")[0] in TORCH_LIBRARIES
    ]
    assert not wrong, "\n".join(wrong)


def test_nothing_edits_sys_path():
    python_files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and p != Path(__file__)]
    assert not [str(p.relative_to(ROOT)) for p in python_files if "sys.path" in p.read_text()]


def test_top_level_commands_are_shims():
    """train.py, convert_weights.py, sample.py and prepare_data.py only call their koala_jax.cli module."""
    commands = {
        "train.py": "train",
        "convert_weights.py": "convert",
        "sample.py": "sample",
        "prepare_data.py": "prepare",
    }
    for script, command in commands.items():
        assert {name for name, _ in imports(ROOT / script)} == {"sys", f"koala_jax.cli.{command}"}, script
        assert len((ROOT / script).read_text().splitlines()) < 20, script


def module_edges() -> dict[str, set[str]]:
    """{module: the koala_jax modules it imports} (function-level imports included; `from package import module`
    is an edge to the module, `from package import name` to the package's __init__)."""
    known = {module_name(p).removesuffix(".__init__") for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path).removesuffix(".__init__")
        found = edges.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level and node.module in known:
                subs = {f"{node.module}.{a.name}" for a in node.names} & known
                found |= subs or {node.module}
        found.discard(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_inside_a_package():
    assert cycles(module_edges()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
