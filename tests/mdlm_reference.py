"""MDLM's own code (kuleshov-group/mdlm, Apache-2.0), loaded from ../shared/reference/mdlm as a test oracle.

Only tests import this; the package never does. `dit.py`, `noise_schedule.py` and `ema.py` are imported as they
are (under private module names, with the reference's `stubs/` standing in for flash-attn and omegaconf).
`diffusion.py` needs Lightning and Hydra to import, so the methods the tests compare against are lifted out of
its `Diffusion` class with `ast`, unchanged, into a class that holds only what they read (`Reference`).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout, as the README says
MDLM_DIR = SHARED / "reference" / "mdlm"

# What these tests lift from diffusion.py's `Diffusion`: the SUBS parameterisation, the continuous-time loss and
# its reduction, the forward process, and the two ancestral transitions.
DIFFUSION_METHODS = (
    "_subs_parameterization",  # diffusion.py:261-277
    "_process_sigma",  # :301-310
    "forward",  # :312-327
    "q_xt",  # :575-586
    "_ddpm_caching_update",  # :592-610
    "_ddpm_update",  # :612-637
    "_sample_t",  # :800-808
    "_maybe_sub_sample",  # :810-834
    "_forward_pass_diffusion",  # :847-894
    "_loss",  # :896-916
)


def missing() -> str | None:
    """Why the reference cannot be loaded here, or None."""
    if not (MDLM_DIR / "dit.py").is_file():
        return f"MDLM reference code not found at {MDLM_DIR}"
    for name in ("einops", "huggingface_hub"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (dit.py imports it; pip install -e '.[test]')"
    return None


@contextlib.contextmanager
def _jit_flags_kept():
    """dit.py and noise_schedule.py set global TorchScript flags on import; put them back afterwards so the rest
    of the session runs as it would without the reference."""
    profiling_mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(profiling_mode)
    profiling_executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(profiling_executor)
    fuse_cpu, fuse_gpu = torch._C._jit_can_fuse_on_cpu(), torch._C._jit_can_fuse_on_gpu()
    try:
        yield
    finally:
        torch._C._jit_set_profiling_mode(profiling_mode)
        torch._C._jit_set_profiling_executor(profiling_executor)
        torch._C._jit_override_can_fuse_on_cpu(fuse_cpu)
        torch._C._jit_override_can_fuse_on_gpu(fuse_gpu)


def _import(file_name: str) -> types.ModuleType:
    """Import MDLM_DIR/file_name as `mdlm_reference_<stem>`, with the stubs importable only while it loads."""
    name = f"mdlm_reference_{Path(file_name).stem}"
    if name in sys.modules:
        return sys.modules[name]
    stub_names = ("flash_attn", "flash_attn.flash_attn_interface", "flash_attn.layers", "flash_attn.layers.rotary",
                  "omegaconf")
    before = {n: sys.modules.get(n) for n in stub_names}
    sys.path.insert(0, str(MDLM_DIR / "stubs"))
    try:
        # dit.py warns that torch.jit.script is deprecated; noise_schedule.py has an invalid escape in a docstring.
        with _jit_flags_kept(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", SyntaxWarning)
            spec = importlib.util.spec_from_file_location(name, MDLM_DIR / file_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(MDLM_DIR / "stubs"))
        for n, m in before.items():  # the module keeps its own references; leave sys.modules as it was
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    sys.modules[name] = module
    return module


def dit_module() -> types.ModuleType:
    return _import("dit.py")


def noise_schedule_module() -> types.ModuleType:
    return _import("noise_schedule.py")


def ema_module() -> types.ModuleType:
    return _import("ema.py")


def dit_config(hidden_size: int, cond_dim: int, n_heads: int, n_blocks: int, length: int) -> types.SimpleNamespace:
    """What MDLM's DIT constructor reads (config.model.*), dropout off."""
    return types.SimpleNamespace(model=types.SimpleNamespace(
        hidden_size=hidden_size, cond_dim=cond_dim, n_heads=n_heads, n_blocks=n_blocks, dropout=0.0,
        scale_by_sigma=True, length=length))


def lift(source: Path, class_name: str, methods: tuple[str, ...], functions: tuple[str, ...],
         namespace: dict) -> dict:
    """Compile the named methods of `class_name` (as one class of that name) and the named module-level
    functions/classes of `source`, unchanged and with their line numbers, in `namespace`; returns it."""
    tree = ast.parse(source.read_text(), filename=str(source))
    top = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    cls = top[class_name]
    found = {node.name: node for node in cls.body if isinstance(node, ast.FunctionDef)}
    absent = [m for m in methods if m not in found]
    if absent:
        raise LookupError(f"{source.name}: {class_name} has no {absent}")
    lifted_cls = ast.ClassDef(name=class_name, bases=[], keywords=[], decorator_list=[],
                              body=[found[m] for m in methods], lineno=cls.lineno, col_offset=0,
                              end_lineno=cls.end_lineno, end_col_offset=0)
    module = ast.Module(body=[top[f] for f in functions] + [lifted_cls], type_ignores=[])
    exec(compile(ast.fix_missing_locations(module), str(source), "exec"), namespace)
    return namespace


def diffusion_namespace() -> dict:
    """diffusion.py's `_sample_categorical`, `Loss` and the `Diffusion` methods above, with what they use."""
    namespace = {
        "torch": torch, "F": F, "np": np, "math": math, "typing": __import__("typing"),
        "dataclass": dataclasses.dataclass,
        "utils": types.SimpleNamespace(print_nans=lambda tensor, name: None),  # MDLM's utils: a debug print
        "__name__": "mdlm_reference_diffusion",
    }
    return lift(MDLM_DIR / "diffusion.py", "Diffusion", DIFFUSION_METHODS,
                ("_sample_categorical", "_unsqueeze", "Loss"), namespace)


def reference_diffusion(backbone: torch.nn.Module | None, mask_index: int, time_conditioning: bool,
                        length: int, namespace: dict | None = None):
    """An object with MDLM's `Diffusion` methods and the attributes they read, as MDLM's `__init__` sets them
    (diffusion.py:77-153) for its OpenWebText configuration: SUBS, continuous time (T = 0), log-linear noise,
    antithetic t, sampling_eps 1e-3, no importance sampling or change of variables."""
    namespace = namespace or diffusion_namespace()
    obj = namespace["Diffusion"]()
    obj.backbone = backbone
    obj.mask_index = mask_index
    obj.vocab_size = mask_index + 1
    obj.parameterization = "subs"
    obj.T = 0
    obj.subs_masking = False
    obj.time_conditioning = time_conditioning
    obj.change_of_variables = False
    obj.importance_sampling = False
    obj.antithetic_sampling = True
    obj.sampling_eps = 1e-3
    obj.neg_infinity = -1000000.0
    obj.noise = noise_schedule_module().LogLinearNoise()  # eps 1e-3
    obj.config = types.SimpleNamespace(model=types.SimpleNamespace(length=length),
                                       noise=types.SimpleNamespace(type="loglinear"))
    obj.dtype = torch.float32
    obj.device = torch.device("cpu")
    return obj


@contextlib.contextmanager
def quiet():
    """MDLM calls `torch.cuda.amp.autocast` (deprecated; a no-op for CPU tensors): hide its warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*autocast.*")
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        yield
