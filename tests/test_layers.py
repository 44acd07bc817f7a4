"""No module imports one above it: the package is a stack of layers, each importing only its own and those below.

The order, lowest first (a module's layer is the first entry that names it or a package holding it):

    config, progress, runtime            the typed config and where / in which precision work runs
    data/, pipeline, hf/                 sources, tokenizers, the token store; config -> tokenizer + blocks; the
                                         transformers-side files of an export (torch and transformers only)
    models/                              denoisers and the importance estimator: tokens in, logits out
    diffusion/                           schedule, objective, masking, curriculum, ATAT's step, samplers
    train/ parts                         optim, checkpoint (files), distributed (apply_*), faults, metrics, rundir
    run                                  the run object: builds, steps, saves and loads a run from those parts
    eval/                                the bound, diagnostics, sample quality, `atat eval`
    train.trainer                        the training loop (it validates through eval/)
    export, mdlm_import, sample, viz/,   verbs
    cli, __main__

So models/ never imports diffusion/, eval/ never imports train/ (it reaches checkpoints through `run`), and only
the verbs import the training loop. Lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mdlm_atat"

LAYERS = [
    ("mdlm_atat", "config", "progress", "runtime"),  # "mdlm_atat": the package's __init__ (its version)
    ("data", "pipeline", "hf"),
    ("models",),
    ("diffusion",),
    ("train.optim", "train.checkpoint", "train.distributed", "train.faults", "train.metrics", "train.rundir"),
    ("run",),
    ("eval",),
    ("train.trainer", "train"),
    ("export", "mdlm_import", "sample", "viz", "cli", "__main__"),
]


def layer(module: str) -> int:
    """The layer of a dotted module name relative to the package ('eval.run', 'train', 'mdlm_atat')."""
    for depth, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                return depth
    raise AssertionError(f"{module}: not placed in LAYERS; add it where it belongs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "mdlm_atat"


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(path: Path) -> list[str]:
    """Package modules imported by the file (absolute or relative), as names relative to the package."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = module_name(path).split(".")[: -node.level or None]
                names.append(".".join(["mdlm_atat", *base, *(node.module or "").split(".")]).rstrip("."))
            elif node.module:  # `from mdlm_atat.train import distributed` imports the module train.distributed
                submodules = [f"{node.module}.{a.name}" for a in node.names]
                names += [n for n in submodules if is_module(n)] or [node.module]
    out = []
    for name in names:
        if name == "mdlm_atat" or name.startswith("mdlm_atat."):
            relative = name.removeprefix("mdlm_atat.") if name != "mdlm_atat" else "mdlm_atat"
            out.append(relative)
    return out


def test_every_module_imports_only_its_own_layer_or_below():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        for target in imported(path):
            if layer(target) > layer(here):
                violations.append(f"{here} (layer {layer(here)}) imports {target} (layer {layer(target)})")
    assert not violations, "\n".join(violations)


def test_the_rules_the_layers_exist_for():
    assert layer("models.dit") < layer("diffusion.objective")
    assert layer("eval.run") < layer("train.trainer") and layer("run") < layer("eval.run")
    for path in (PACKAGE / "eval").rglob("*.py"):  # eval/ reaches checkpoints through `run`, never train/
        assert not [t for t in imported(path) if t.startswith("train")], path
    every = {module_name(p) for p in PACKAGE.rglob("*.py")}
    for name in every:
        layer(name)  # every module has a place
