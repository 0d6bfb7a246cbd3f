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
              "dod_jax.schedule", "dod_jax.compilation_cache", "dod_jax.parallel"]),
    ("models", ["dod_jax.models"]),
    ("adapters", ["dod_jax.adapters"]),
    ("weights, losses and metrics, data, checkpoint I/O",
     ["dod_jax.weights", "dod_jax.losses", "dod_jax.data", "dod_jax.checkpoints"]),
    ("methods", ["dod_jax.dod"]),
    ("training, restore", ["dod_jax.training", "dod_jax.restore"]),
    ("evaluation", ["dod_jax.evaluation"]),
    ("commands", ["dod_jax.demo", "dod_jax.weights.official"]),
]
# Within a layer: inference never imports the trainer.
APART = [("dod_jax.restore", "dod_jax.training")]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def package_imports(path: Path) -> set[str]:
    """The dod_jax modules a source file imports (`from dod_jax import x` counts as dod_jax.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dod_jax":
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "dod_jax" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dod_jax"}
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_every_import_points_down_or_sideways():
    upward = []
    for path in sorted((ROOT / "dod_jax").rglob("*.py")):
        module = module_name(path)
        for imported in package_imports(path):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {imported} "
                              f"({LAYERS[layer_of(imported)][0]})")
            upward += [f"{module} imports {imported}" for low, high in APART
                       if module.startswith(low) and imported.startswith(high)]
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The walk finds imports in every form, inside functions too, and ranks them."""
    source = tmp_path / "example.py"
    source.write_text("import dod_jax.restore.engine\nfrom dod_jax import parallel\n"
                      "def f():\n    from dod_jax.training.loop import run\n")
    assert package_imports(source) == {"dod_jax.restore.engine", "dod_jax.parallel", "dod_jax.training.loop"}
    assert layer_of("dod_jax.weights.official") > layer_of("dod_jax.restore.bundle") > layer_of("dod_jax.weights.diffusers")
    assert layer_of("dod_jax.models.unet") < layer_of("dod_jax.adapters") < layer_of("dod_jax.losses.metrics")
