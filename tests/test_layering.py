"""The package's layers (../shared/DESIGN.md, dod_jax/__init__.py): every import in dod_jax
points down or sideways, never up, read from the source with `ast` (imports inside functions
included)."""

import ast
from pathlib import Path

from conftest import ROOT

# Lowest first: a module imports modules of its own layer and those below. The longest prefix
# that names a module decides its layer.
LAYERS = [
    ("base", ["dod_jax", "dod_jax.errors", "dod_jax.files", "dod_jax.machine", "dod_jax.configs", "dod_jax.image_ops",
              "dod_jax.schedule", "dod_jax.compilation_cache", "dod_jax.parallel", "dod_jax.tiles", "dod_jax.optim"]),
    ("models", ["dod_jax.models"]),
    ("adapters", ["dod_jax.adapters"]),
    ("weights, losses and metrics, data, checkpoint I/O",
     ["dod_jax.weights", "dod_jax.losses", "dod_jax.data", "dod_jax.checkpoints"]),
    ("methods", ["dod_jax.methods"]),
    ("training, restore", ["dod_jax.training", "dod_jax.restore"]),
    ("evaluation", ["dod_jax.evaluation"]),
    ("commands", ["dod_jax.demo", "dod_jax.methods.dod.convert", "dod_jax.methods.lorair.convert"]),
]
# Within a layer: inference never imports the trainer. The method-free layers reach a method only
# through the registry (dod_jax.methods), never by importing its package.
APART = [("dod_jax.restore", "dod_jax.training")] + [
    (generic, "dod_jax.methods.") for generic in ("dod_jax.training", "dod_jax.restore", "dod_jax.evaluation")]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_imports(path: Path) -> set[str]:
    """The dod_jax modules a source file imports (`from dod_jax.x import y` counts as
    dod_jax.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dod_jax":
            submodules = {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
            found |= submodules if submodules or node.module == "dod_jax" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dod_jax"}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def violations(module: str, imported: str) -> list[str]:
    found = []
    if layer_of(imported) > layer_of(module):
        found.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})")
    return found + [f"{module} imports {imported}" for low, high in APART
                    if module.startswith(low) and imported.startswith(high)]


def test_every_import_points_down_or_sideways():
    upward = []
    for path in sorted((ROOT / "dod_jax").rglob("*.py")):
        module = module_name(path)
        for imported in package_imports(path):
            upward += violations(module, imported)
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The walk finds imports in every form, inside functions too, and ranks them."""
    source = tmp_path / "example.py"
    source.write_text("import dod_jax.restore.engine\nfrom dod_jax import parallel\n"
                      "def f():\n    from dod_jax.training.loop import run\n"
                      "from dod_jax.methods import dod, of\n")
    assert package_imports(source) == {"dod_jax.restore.engine", "dod_jax.parallel", "dod_jax.training.loop",
                                       "dod_jax.methods.dod"}
    assert violations("dod_jax.training.loop", "dod_jax.methods.dod") and violations(
        "dod_jax.evaluation.run", "dod_jax.methods.dod.model")
    assert not violations("dod_jax.restore.bundle", "dod_jax.methods")
    assert layer_of("dod_jax.methods.dod.convert") > layer_of("dod_jax.restore.bundle") > layer_of("dod_jax.weights.diffusers")
    assert layer_of("dod_jax.models.unet") < layer_of("dod_jax.adapters") < layer_of("dod_jax.losses.metrics")
