"""Data parallelism under `torchrun`: DDP or FSDP2, applied to the built modules by small `apply_*` functions.

The order is fixed (torchtitan's): build the plain modules and load any checkpoint into them -> `apply_compile`
-> `apply_ddp` or `apply_fsdp` -> build the optimiser over the resulting parameters. `parallelize` does the middle
two for the denoiser, ATAT's estimator (a second module trained jointly: replicated with DDP under either
strategy, so its gradients are averaged too) and, under FSDP, the EMA (sharded like the model, so that the
EMA update stays a local elementwise op).

What makes runs on different numbers of processes compute the same thing (docs/distributed.md):
- the global batch is `batch_size (per device) x world_size x gradient_accumulation_steps`; sample k of an
  optimiser step is row k of the global batch whichever rank and micro-step reads it (data/loader.py);
- the step's diffusion times t (antithetic over the global batch, DESIGN 3.1) and the masks' uniform draws come
  from a generator seeded by (seed, step): every rank draws the whole global batch's and keeps its rows;
- checkpoints hold consolidated (full, unsharded) state dicts in the single-process layout, written by rank 0,
  so any world size resumes any other's;
- dropout draws from torch's global RNG, reseeded every step from (seed, step, rank): exact on resume at the
  same world size, different (statistically alike) across world sizes.

Only rank 0 logs, evaluates and writes files; the other ranks join the collectives (gradient reductions, the
FSDP gathers for evaluation and checkpoints) and otherwise wait.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from mdlm_atat.config import ConfigError, TrainingConfig
from mdlm_atat.diffusion.objective import mask_draws
from mdlm_atat.runtime import resolve_device

T = TypeVar("T")

# Long enough for rank 0 to evaluate or write a checkpoint while the others wait in their next collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


# ----------------------------------------------------------------------------------------------------------
# The process group


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0  # index on this host: picks the GPU, so nothing assumes a single host
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun sets them; (0, 0, 1) for a plain `python` run."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return env_ranks()[0] == 0


def resolve_dist_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """`training.device` for this process: under torchrun, `auto`/`cuda` mean cuda:LOCAL_RANK."""
    if world_size == 1:
        return resolve_device(name)
    if name.startswith("cuda:"):
        raise ConfigError(
            f"training.device: {name!r} under torchrun ({world_size} processes); use auto or cuda, and each process "
            "takes cuda:LOCAL_RANK"
        )
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("training.device: 'cuda' asked for, but no CUDA device is visible; use auto or cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"training.device: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} GPUs visible on this host; "
            "start at most one process per GPU (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device_name: str) -> DistEnv:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs); a no-op for one process.

    Idempotent: a second call (the CLI joins early to agree on the run folder) reuses the group.
    """
    rank, local_rank, world_size = env_ranks()
    device = resolve_dist_device(device_name, local_rank, world_size)
    if world_size == 1:
        return DistEnv(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any collective: NCCL uses the current device
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistEnv(rank, local_rank, world_size, device)


def destroy_distributed(synchronize: bool = False) -> None:
    """Leave the process group. `synchronize` (the normal end of a run): wait until every rank is done with its
    collectives first. Modules are collected before the group goes: FSDP2's DTensors hold on to it, and a group
    destroyed at interpreter exit can abort the process (gloo: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def rank0_value(value: T, device_name: str = "auto") -> T:
    """Rank 0's `value` on every rank (e.g. a default run folder named by the clock); `value` alone for one process."""
    env = init_distributed(device_name)
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank0_first(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on each host's local rank 0, then on the rest: for work that fills a cache (the
    tokenizer and token stores) that the others then reuse, whether or not the hosts share a filesystem."""
    if not env.distributed:
        return fn()
    result = fn() if env.rank == 0 else None
    dist.barrier()
    if env.rank != 0 and env.local_rank == 0:
        result = fn()
    dist.barrier()
    if env.local_rank != 0:
        result = fn()
    return result  # type: ignore[return-value]


def rank0_flag(flag: bool | None, env: DistEnv) -> bool:
    """Rank 0's boolean on every rank (the others pass anything)."""
    if not env.distributed:
        return bool(flag)
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a device scalar over ranks (in place; gloo has no AVG, hence SUM / world_size)."""
    if env.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def resolve_strategy(strategy: str, world_size: int) -> str:
    """`training.strategy` for this job: auto is ddp with several processes; one process never wraps (nothing to
    reduce), whatever the key says."""
    if world_size == 1:
        return "none"
    if strategy == "none":
        raise ConfigError(
            f"training.strategy: none with {world_size} processes would train {world_size} independent copies; "
            "use ddp, fsdp or auto"
        )
    return "ddp" if strategy == "auto" else strategy


# ----------------------------------------------------------------------------------------------------------
# The step's random draws: functions of (seed, step), identical on every rank and at every world size


def derived_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (seed, step, ...)."""
    entropy = [k % 2**64 for k in keys]  # SeedSequence takes non-negative integers
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


_DRAWS, _DROPOUT = 0, 1  # domains of derived_seed, so the two streams never coincide


def seed_step_dropout(seed: int, step: int, rank: int) -> None:
    """Reseed torch's global RNG (dropout) for this step and rank: a resumed run draws what an uninterrupted run
    would have, on every rank, with no RNG state to carry between world sizes."""
    torch.manual_seed(derived_seed(seed, _DROPOUT, step, rank))


def step_draws(
    objective: Any, seed: int, step: int, num_rows: int, seq_len: int, device: torch.device, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's diffusion times (num_rows,), antithetic over all of it (DESIGN 3.1), and the masks'
    uniform draws (num_rows, seq_len). Every rank draws all of them from the same seed and keeps its rows, so the
    corruption of a sample does not depend on how many processes share the batch."""
    generator.manual_seed(derived_seed(seed, _DRAWS, step))
    t = objective.sample_t(num_rows, device, generator)  # (num_rows,)
    noise = mask_draws((num_rows, seq_len), device, generator)  # (num_rows, L) float64
    return t, noise


def local_rows(micro: int, env: DistEnv, batch_size: int) -> slice:
    """This rank's rows of the global batch in micro-step `micro`: the loader's order (data/loader.py), where
    global micro-batch `micro` holds samples [micro * B * W, (micro + 1) * B * W) and rank r the r-th B of them."""
    start = (micro * env.world_size + env.rank) * batch_size
    return slice(start, start + batch_size)


# ----------------------------------------------------------------------------------------------------------
# apply_*: compile, then DDP / FSDP2


def apply_compile(module: nn.Module) -> None:
    """torch.compile in place (`nn.Module.compile`): the module keeps its parameter names (no `_orig_mod.`), so
    checkpoints and the EMA see the plain module. Under FSDP2 its per-block hooks run outside the graphs."""
    module.compile()


def apply_ddp(module: nn.Module, device: torch.device) -> DDP:
    """Replicate with DDP: gradients averaged over ranks in buckets during backward."""
    # The only buffers (the estimator's surprisal tables) are constants, equal on every rank: no per-forward
    # broadcast. Newer PyTorch renames the switch (and deprecates the old name).
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _ddp_arguments() else "broadcast_buffers"
    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: one copy fewer
        **{no_buffer_sync: False},
    )


def _ddp_arguments() -> set[str]:
    import inspect

    return set(inspect.signature(DDP.__init__).parameters)


def fsdp_mixed_precision(cfg: TrainingConfig, device: torch.device):
    """bf16 compute copies of the weights on CUDA when training.mixed_precision is bf16; gradients reduced and
    weights kept (sharded) in fp32. fp32 on CPU, as the rest of the code."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and cfg.mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(module: nn.Module, mp_policy=None) -> nn.Module:
    """FSDP2: shard each transformer block (one all-gather per block in forward and backward), then the root
    (embedding, conditioning, output layer). Parameters become DTensors sharded on dim 0; in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    for block in getattr(module, "blocks", []):
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(module, mp_policy=mp_policy)
    return module


@dataclass
class Parallel:
    """What the training step calls: `model` and `estimator` are the wrapped (DDP) or sharded (FSDP) modules
    whose forward runs the collectives; the trainer keeps the plain modules for state dicts."""

    strategy: str  # none | ddp | fsdp, resolved
    model: nn.Module
    estimator: nn.Module | None

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Reduce gradients only in the last micro-step of gradient accumulation (DDP `no_sync`, FSDP2
        `set_requires_gradient_sync`): the others accumulate locally."""
        with contextlib.ExitStack() as stack:
            for module in (self.model, self.estimator):
                if isinstance(module, DDP) and not enabled:
                    stack.enter_context(module.no_sync())
                elif hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
                    module.set_requires_gradient_sync(enabled)
            yield


def parallelize(
    model: nn.Module, estimator: nn.Module | None, ema_module: nn.Module | None, cfg: TrainingConfig, env: DistEnv
) -> Parallel:
    """compile -> DDP | FSDP2 on the denoiser, DDP on a learned estimator; under FSDP the EMA is sharded too.

    Call after the checkpoint's full weights are loaded into the plain modules (DDP broadcasts rank 0's; FSDP2
    shards each rank's copy, all equal), and build the optimiser afterwards (FSDP2 replaces the parameters).
    """
    strategy = resolve_strategy(cfg.strategy, env.world_size)
    if cfg.compile:
        apply_compile(model)
        if estimator is not None:
            apply_compile(estimator)
    forward_model: nn.Module = model
    if strategy == "ddp":
        forward_model = apply_ddp(model, env.device)
    elif strategy == "fsdp":
        policy = fsdp_mixed_precision(cfg, env.device)
        apply_fsdp(model, policy)
        if ema_module is not None:
            apply_fsdp(ema_module, policy)  # same placements as the model's parameters; never run forward sharded
    forward_estimator = estimator
    learned = estimator is not None and any(p.requires_grad for p in estimator.parameters())
    if strategy != "none" and learned:
        forward_estimator = apply_ddp(estimator, env.device)
    return Parallel(strategy, forward_model, forward_estimator)


# ----------------------------------------------------------------------------------------------------------
# Gradient clipping, consolidated state dicts, evaluation copies


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_`, with the norm of FSDP2's sharded gradients reduced over ranks first."""
    parameters = [p for p in parameters if p.grad is not None]
    if not any(_is_dtensor(p) for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if _is_dtensor(total):
        total = total.full_tensor()  # partial norms -> the global norm, on every rank
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _full(value: Any, keep: bool) -> Any:
    """A DTensor gathered to a full CPU tensor (a collective), or None where `keep` is false (ranks that write
    nothing); anything else as it is."""
    if not _is_dtensor(value):
        return value
    full = value.full_tensor()
    return full.cpu() if keep else None


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, Any]:
    """The module's state dict with full tensors. Under FSDP every rank must call it, in step (it gathers);
    `keep=False` drops the gathered copies at once (the ranks that do not write the checkpoint)."""
    return {key: _full(value, keep) for key, value in module.state_dict().items()}


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """`optimizer.state_dict()` in the single-process layout (parameters by index), with full state tensors."""
    sd = optimizer.state_dict()
    state = {index: {k: _full(v, keep) for k, v in entry.items()} for index, entry in sd["state"].items()}
    return {**sd, "state": state}


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a consolidated optimiser state; under FSDP2 each state tensor is sharded like its parameter."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]

    def like(value: Any, param: torch.Tensor) -> Any:
        if _is_dtensor(param) and torch.is_tensor(value) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
        return value

    state = {index: {k: like(v, params[int(index)]) for k, v in entry.items()} for index, entry in sd["state"].items()}
    optimizer.load_state_dict({**sd, "state": state})


class EvalCopy:
    """Full weights for rank 0's evaluation. A plain (or DDP-replicated) module is used as it is; an FSDP-sharded
    one is gathered (a collective: every rank calls it) into a plain copy on rank 0, built once by `build`."""

    def __init__(self, env: DistEnv, build: Callable[[], nn.Module]):
        self.env = env
        self.build = build
        self.copy: nn.Module | None = None

    def __call__(self, module: nn.Module) -> nn.Module | None:
        if not any(_is_dtensor(p) for p in module.parameters()):
            return module
        state = full_state_dict(module, keep=self.env.is_main)
        if not self.env.is_main:
            return None
        if self.copy is None:
            self.copy = self.build().to(self.env.device)
        self.copy.load_state_dict(state)
        return self.copy


class SilentLog:
    """The metrics log of ranks other than 0: they log nothing."""

    def write(self, record: dict[str, Any], console: bool = True) -> None:
        pass

    def close(self) -> None:
        pass
