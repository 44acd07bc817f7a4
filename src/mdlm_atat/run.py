"""A run: everything a config builds (model, EMA, estimator, objective, ATAT, optimiser, LR schedule, data
position), THE training step, and the model that inference loads from a checkpoint or an export.

The layer between the parts (models/, diffusion/, train/'s building blocks) and what uses them (eval/, the
training loop in train/trainer.py, sample, export, the benchmarks): importing it never imports the loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from mdlm_atat.config import Config, ConfigError, from_dict, saved_config
from mdlm_atat.data.loader import attention_mask
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.atat import AtatStep, AtatTraining
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, NextTokenObjective
from mdlm_atat.diffusion.schedule import build_schedule
from mdlm_atat.hf.folder import atat_backend
from mdlm_atat.models import build_model
from mdlm_atat.models.dit import pad_vocab
from mdlm_atat.models.importance import ImportanceEstimator, unigram_surprisal
from mdlm_atat.train import distributed
from mdlm_atat.train.checkpoint import (
    LAST, RESUME_ORDER, CheckpointError, checkpoint_dir, is_export_dir, load_checkpoint, rng_state, set_rng_state,
)
from mdlm_atat.train.checkpoint import resolve_checkpoint  # noqa: F401 (the layers above eval/ resolve through here)
from mdlm_atat.train.optim import ModelEMA, build_ema, build_optimizer, build_scheduler


def make_objective(cfg: Config, tokenizer: Tokenizer) -> MaskedDiffusionObjective:
    if cfg.model.is_ar:  # the AR baseline: same loop, next-token NLL (models/ar.py)
        return NextTokenObjective(tokenizer.mask_id)
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    # The DiT fuses its output projection with the SUBS loss: no (M, V) logits (diffusion/fused_loss.py).
    return MaskedDiffusionObjective(
        schedule, tokenizer.mask_id, cfg.diffusion.antithetic, fused=True, mask_padding=cfg.diffusion.mask_padding
    )


def method_name(cfg: Config) -> str:
    """What the run trains, as metrics.jsonl, the report and the console name it."""
    if cfg.model.is_ar:
        return "ar (autoregressive baseline: causal DiT, next-token loss)"
    return f"atat ({cfg.atat.importance_mode}, {cfg.atat.masking})" if cfg.atat.enabled else "mdlm"


def build_estimator(cfg: Config, num_tokens: int, unigram_counts) -> ImportanceEstimator | None:
    """ATAT's importance estimator with the training split's unigram surprisal, or None for the MDLM baseline."""
    if not cfg.atat.enabled:
        return None
    surprisal = unigram_surprisal(unigram_counts, num_tokens) if unigram_counts is not None else None
    return ImportanceEstimator(cfg.atat, num_tokens, surprisal)


class TokenIds(Protocol):
    """What a run needs of its tokenizer: the embedding rows, MASK and PAD. A `Tokenizer`; the benchmarks, on
    random tokens, pass a `Vocab`."""

    num_tokens: int
    mask_id: int
    pad_id: int | None


@dataclass(frozen=True)
class Vocab:
    num_tokens: int  # embedding rows, MASK included
    mask_id: int
    pad_id: int | None = None


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    samples_seen: int = 0  # training sequences consumed: the data position
    best_val_nelbo: float = math.inf
    nonfinite_steps: int = 0  # updates skipped for a NaN/inf loss or gradient (train/faults.py)
    nonfinite_in_a_row: int = 0
    # The log window in progress (what the next logged loss averages): saved, so a run resumed mid-window logs
    # the numbers the uninterrupted run logs. The sum is the mean over ranks (float32, stored exactly).
    log_loss_sum: float = 0.0
    log_applied_steps: int = 0


# ----------------------------------------------------------------------------------------------------------
# The checkpoint: one schema, written by `Run.checkpoint` and read by `read_checkpoint`, nowhere else.

# format_version of what `Run.checkpoint` writes; files from before it was recorded are 1. 2: the model's vocabulary
# tensors may hold padding rows (model.pad_vocab_multiple, which format-1 configs lack and are read as 1).
CHECKPOINT_FORMAT = 2


@dataclass
class RunCheckpoint:
    """Everything needed to resume exactly (STYLE principle 5): a versioned state dict of plain data and full
    (consolidated) tensors in the single-process layout, so a run saved at one world size resumes at any other.
    `to_dict` is what torch.save writes (train/checkpoint.py: atomic, with a sha256 sidecar)."""

    config: dict[str, Any]  # the resolved config (Config.to_dict); as read, with the keys it predates filled in
    config_hash: str
    state: TrainState  # step, data position, best validation, non-finite counts, the open log window
    tokenizer: str  # Tokenizer.to_json: the resumed run and inference tokenize with it
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None  # None: training.ema_decay = 0
    ema_num_updates: int
    estimator: dict[str, torch.Tensor] | None  # None: the MDLM baseline
    curriculum: dict[str, Any] | None  # the curriculum state at the step (for readers; recomputed on resume)
    optimizer: dict[str, Any] | None  # parameters by index, as a single process numbers them; None where not kept
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    world_size: int  # the processes that wrote it
    format_version: int = CHECKPOINT_FORMAT

    # The keys every checkpoint of atat train has held; the rest are read with defaults where older files lack them.
    REQUIRED = ("config", "tokenizer", "state", "model")

    def to_dict(self) -> dict[str, Any]:
        """The payload torch.save writes (keys in the order files have always had)."""
        return {
            "format_version": self.format_version,
            "config": self.config,
            "config_hash": self.config_hash,
            "state": asdict(self.state),
            "world_size": self.world_size,
            "model": self.model,
            "estimator": self.estimator,
            "curriculum": self.curriculum,
            "ema": self.ema,
            "ema_num_updates": self.ema_num_updates,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def from_dict(cls, payload: Any, path: Path | str) -> RunCheckpoint:
        """A loaded payload as the schema; a CheckpointError naming `path` when it is not one atat train wrote (a
        bare state dict, another project's checkpoint) or one from a newer format."""
        missing = [key for key in cls.REQUIRED if not isinstance(payload, dict) or key not in payload]
        if missing:
            raise CheckpointError(
                f"{path}: not a checkpoint of atat train (a torch file without "
                f"{', '.join(repr(k) for k in missing)}); pass RUN/checkpoints/last.pt or best.pt, a run folder or an "
                "atat export folder"
            )
        version = payload.get("format_version", 1)
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path}: checkpoint format {version!r}, newer than this mdlm-atat reads ({CHECKPOINT_FORMAT}); "
                "upgrade mdlm-atat"
            )
        config = saved_config(payload["config"])  # an older file's config as the code that wrote it ran
        return cls(
            config=config,
            config_hash=payload.get("config_hash") or from_dict(config).hash(),
            state=TrainState(**payload["state"]),
            tokenizer=payload["tokenizer"],
            model=payload["model"],
            ema=payload.get("ema"),
            ema_num_updates=int(payload.get("ema_num_updates", 0)),
            estimator=payload.get("estimator"),
            curriculum=payload.get("curriculum"),
            optimizer=payload.get("optimizer"),
            scheduler=payload.get("scheduler"),
            rng=payload.get("rng"),
            world_size=int(payload.get("world_size", 1)),
            format_version=version,
        )

    @property
    def cfg(self) -> Config:
        return from_dict(self.config)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def tokens_seen(self) -> int:
        """Training tokens behind these weights."""
        return self.state.samples_seen * int(self.config["data"]["max_length"])

    def weights(self, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
        """(the denoiser's state dict, "ema" | "raw"): the EMA's when asked for and kept, else the raw weights."""
        if use_ema and self.ema is not None:
            return self.ema, "ema"
        return self.model, "raw"


def read_checkpoint(path: str | Path) -> RunCheckpoint:
    """The checkpoint of atat train at `path` (a .pt file or a run folder), verified against its sidecar."""
    path = resolve_checkpoint(path)
    return RunCheckpoint.from_dict(load_checkpoint(path), path)


def read_resume_checkpoint(run_dir: Path) -> tuple[RunCheckpoint, Path]:
    """(checkpoint, path) of the newest readable checkpoint of a run: last.pt, else last.prev.pt, else best.pt,
    with a note on stderr that names the bad or missing file. A CheckpointError naming every file tried when none
    is readable. A resume reads it once: the CLI passes it on to the trainer."""
    folder = checkpoint_dir(run_dir)
    errors = []
    for path in (folder / name for name in RESUME_ORDER):
        if not path.is_file():
            if path.name == LAST:
                errors.append(f"{path}: not found")
            continue
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            continue
        if path.name != LAST:
            print(f"note: {errors[0]}; resuming from {path} (step {checkpoint.step}) instead", file=sys.stderr)
        return checkpoint, path
    errors = [e for e in errors if not e.endswith(": not found")]
    if errors:
        raise CheckpointError(" | ".join(errors) + " | no readable checkpoint left to resume from")
    raise CheckpointError(f"{run_dir}: no checkpoints/last.pt to resume from; start the run without --resume")


class StepGuard(Protocol):
    """Decides after the backward whether the update is applied (train/faults.py's NonFiniteGuard)."""

    def check(self, state: TrainState, loss: float, grad_norm: float, env: Any = None) -> bool: ...


@dataclass
class StepResult:
    nelbo: torch.Tensor  # () the denoiser's loss, mean over micro-batches, detached: what is logged
    loss: torch.Tensor  # () denoiser + estimator: what the guard checks
    grad_norm: torch.Tensor  # () the denoiser's gradient norm before clipping
    applied: bool  # False: a guard skipped the update (no optimiser or EMA step; the step still counts)
    atat: AtatStep | None  # the last micro-batch's ATAT step (curriculum state, masking statistics)


@dataclass
class Run:
    """The modules and optimiser state of one run, and its step. `model`, `estimator` and `ema` are the plain
    modules whose state is saved (no `_orig_mod.`, no `module.`); `parallel.model` and `parallel.estimator` are
    what the step calls (compiled, DDP or FSDP2: train/distributed.py)."""

    cfg: Config
    tokenizer: TokenIds
    env: distributed.DistEnv
    model: torch.nn.Module
    objective: MaskedDiffusionObjective
    estimator: ImportanceEstimator | None
    ema: ModelEMA | None
    parallel: distributed.Parallel
    atat: AtatTraining | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState = field(default_factory=TrainState)

    def __post_init__(self) -> None:
        self.draw_generator = torch.Generator(device=self.env.device)  # the step's t and masks (reseeded per step)

    @classmethod
    def build(
        cls, cfg: Config, tokenizer: TokenIds, env: distributed.DistEnv, unigram_counts=None,
        resume_from: RunCheckpoint | None = None, objective: MaskedDiffusionObjective | None = None,
    ) -> Run:
        """Build every part on `env.device` from the config (torch's RNG seeded by the caller: the modules' init),
        load the checkpoint `resume_from` into them, then compile / wrap and build the optimiser. The
        order is fixed: full weights into the plain modules, then sharding (any world size resumes), then the
        optimiser (FSDP2 replaces the parameters). `objective` replaces the config's (a benchmark's loss path)."""
        device, tc = env.device, cfg.training
        model = build_model(cfg.model, tokenizer.num_tokens).to(device)
        objective = objective or make_objective(cfg, tokenizer)
        estimator = build_estimator(cfg, tokenizer.num_tokens, unigram_counts)
        if estimator is not None:
            estimator.to(device)
        ema = build_ema(model, tc.ema_decay)
        state = TrainState()
        if resume_from is not None:  # consolidated weights, loaded into the plain modules before sharding
            model.load_state_dict(resume_from.model)
            if estimator is not None:
                estimator.load_state_dict(resume_from.estimator)
            if ema is not None:
                ema.module.load_state_dict(resume_from.ema)
                ema.num_updates = resume_from.ema_num_updates
            state = dataclasses.replace(resume_from.state)
            set_rng_state(resume_from.rng)
        parallel = distributed.parallelize(model, estimator, ema.module if ema is not None else None, tc, env)
        atat, extra_groups = None, []
        if estimator is not None:
            atat = AtatTraining(cfg, estimator, forward=parallel.estimator)
            if estimator.learned:  # its own group and LR; no weight decay
                extra_groups.append(
                    {"params": list(estimator.parameters()), "lr": cfg.atat.estimator_learning_rate, "weight_decay": 0.0}
                )
        optimizer = build_optimizer(model, tc, device, extra_groups)  # after sharding: FSDP2 replaces the parameters
        scheduler = build_scheduler(optimizer, tc)
        if resume_from is not None:
            distributed.load_full_optimizer_state_dict(optimizer, resume_from.optimizer)
            scheduler.load_state_dict(resume_from.scheduler)
        return cls(cfg, tokenizer, env, model, objective, estimator, ema, parallel, atat, optimizer, scheduler, state)

    def checkpoint(self) -> RunCheckpoint:
        """The run as its checkpoint. Under FSDP every rank calls it, in step (the gathers are collectives); ranks
        other than 0 hold None for the gathered tensors (they write nothing)."""
        keep, ema = self.env.is_main, self.ema
        return RunCheckpoint(
            config=self.cfg.to_dict(),
            config_hash=self.cfg.hash(),
            state=dataclasses.replace(self.state),
            tokenizer=self.tokenizer.to_json(),
            # Consolidated (full) tensors in the single-process layout: gathered from the shards under FSDP.
            model=distributed.full_state_dict(self.model, keep=keep),
            ema=distributed.full_state_dict(ema.module, keep=keep) if ema is not None else None,
            ema_num_updates=ema.num_updates if ema is not None else 0,
            estimator=self.estimator.state_dict() if self.estimator is not None else None,
            curriculum=asdict(self.atat.curriculum.state(self.state.step)) if self.atat is not None else None,
            optimizer=distributed.full_optimizer_state_dict(self.optimizer, keep=keep),
            scheduler=self.scheduler.state_dict(),
            rng=rng_state(),
            world_size=self.env.world_size,
        )

    @property
    def global_batch(self) -> int:
        """Sequences per optimiser step, all ranks and micro-batches together."""
        cfg = self.cfg
        return cfg.data.batch_size * self.env.world_size * cfg.training.gradient_accumulation_steps

    def train_step(
        self, batches: Iterator[torch.Tensor], autocast, guard: StepGuard | None = None, with_stats: bool = False
    ) -> StepResult:
        """One optimiser step: `gradient_accumulation_steps` micro-batches (B, L) from `batches`, each forward and
        backward (gradients reduced in the last only), both parameter groups clipped (each its own budget), then
        AdamW, the EMA and the LR schedule. With a `guard`, one host sync decides whether the update is applied;
        without, it always is (the benchmarks: no sync inside the step)."""
        cfg, env, state = self.cfg, self.env, self.state
        tc, accum, batch_size = cfg.training, cfg.training.gradient_accumulation_steps, cfg.data.batch_size
        device = env.device
        # t (antithetic over the whole global batch) and the masks' uniforms are functions of (seed, step): every
        # rank draws the global batch's and takes its rows, so any world size corrupts sample k alike.
        distributed.seed_step_dropout(tc.seed, state.step, env.rank)
        t_all, noise_all = distributed.step_draws(
            self.objective, tc.seed, state.step, self.global_batch, cfg.data.max_length, device, self.draw_generator
        )  # (global_batch,), (global_batch, L)
        step_loss = torch.zeros((), device=device)  # denoiser + estimator: what the guard checks
        step_nelbo = torch.zeros((), device=device)  # the denoiser's alone: what is logged
        atat_step = None
        for micro in range(accum):
            x0 = next(batches).to(device, non_blocking=True)  # (B, L)
            real = attention_mask(x0, self.tokenizer, cfg.data.framing)  # None when packed: all real
            rows = distributed.local_rows(micro, env, batch_size)
            t, noise = t_all[rows], noise_all[rows]  # (B,), (B, L)
            with self.parallel.gradient_sync(micro == accum - 1):  # reduce gradients in the last micro-step only
                with autocast:
                    if self.atat is None:
                        terms = self.objective(self.parallel.model, x0, t=t, attention_mask=real, uniform_noise=noise)
                        loss = terms.loss
                    else:
                        atat_step = self.atat(
                            self.objective, self.parallel.model, x0, t, state.step, real, with_stats=with_stats,
                            uniform_noise=noise, row_offset=rows.start,
                        )
                        terms = atat_step.terms
                        loss = terms.loss + atat_step.estimator_loss  # disjoint parameters: stop-gradient
                (loss / accum).backward()
            step_loss += loss.detach() / accum
            step_nelbo += terms.loss.detach() / accum
        max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = distributed.clip_grad_norm_(list(self.model.parameters()), max_norm)
        estimator_norm = torch.zeros((), device=device)
        if self.estimator is not None and self.estimator.learned:
            estimator_norm = torch.nn.utils.clip_grad_norm_(self.estimator.parameters(), max_norm)  # its own budget
        applied = True
        if guard is not None:  # a NaN/inf loss or gradient skips the update: one host sync per step to decide
            loss_value, norm_value = torch.stack([step_loss, grad_norm + estimator_norm]).tolist()
            applied = guard.check(state, loss_value, norm_value, env)
        if applied:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += self.global_batch
        return StepResult(step_nelbo, step_loss, grad_norm, applied, atat_step)


# ----------------------------------------------------------------------------------------------------------
# Inference: a model (EMA weights by default) from a .pt checkpoint, a run folder or an `atat export` folder.


@dataclass
class LoadedModel:
    """What inference loads: the denoiser in eval mode, the run's config and tokenizer, and where the weights
    come from."""

    model: torch.nn.Module
    cfg: Config
    tokenizer: Tokenizer
    step: int  # optimiser steps behind these weights
    config_hash: str
    weights: str  # "ema" | "raw"
    tokens_seen: int | None  # training tokens behind these weights (None: an export written before it was kept)
    estimator: ImportanceEstimator | None = None  # ATAT's, in eval mode, when asked for and saved with the run

    @property
    def is_ar(self) -> bool:
        return self.cfg.model.is_ar


def load_for_inference(
    checkpoint: str | Path, use_ema: bool = True, device: torch.device | str = "cpu", with_estimator: bool = False,
    compile: bool = False,
) -> LoadedModel:
    """The model (EMA weights by default) of a .pt file, a run folder or an `atat export` folder. With
    `with_estimator`, also ATAT's importance estimator saved with the weights (None for the MDLM baseline); with
    `compile`, the denoiser's blocks go through torch.compile (`DiT.compile_blocks`)."""
    loaded = _load_for_inference(checkpoint, use_ema, device, with_estimator)
    if compile:
        loaded.model.compile_blocks()
    return loaded


def _load_for_inference(
    checkpoint: str | Path, use_ema: bool, device: torch.device | str, with_estimator: bool
) -> LoadedModel:
    if is_export_dir(checkpoint):
        loaded = load_export(checkpoint, use_ema=use_ema, device=device)
        if with_estimator:
            load_file, _ = safetensors()
            file = Path(checkpoint) / "estimator.safetensors"
            state = load_file(str(file)) if file.is_file() else None
            loaded.estimator = _estimator(loaded.cfg, loaded.tokenizer, state, device)
        return loaded
    saved = read_checkpoint(checkpoint)
    cfg = saved.cfg
    tokenizer = Tokenizer.from_json(saved.tokenizer)
    model = build_model(cfg.model, tokenizer.num_tokens)
    weights, kind = saved.weights(use_ema)
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(
        model, cfg, tokenizer, step=saved.step, config_hash=saved.config_hash, weights=kind,
        tokens_seen=saved.tokens_seen,
        # from the checkpoint already read: one with its optimiser is GBs at real sizes
        estimator=_estimator(cfg, tokenizer, saved.estimator, device) if with_estimator else None,
    )


def _estimator(cfg: Config, tokenizer: Tokenizer, state: dict | None, device: torch.device | str):
    """The importance estimator from its saved state (buffers included), in eval mode; None without one."""
    estimator = build_estimator(cfg, tokenizer.num_tokens, None) if state else None
    if estimator is None:
        return None
    estimator.load_state_dict(state)
    return estimator.to(device).eval()


def safetensors():
    """(load_file, save_file) of safetensors, which exported folders use; a CheckpointError without it."""
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        raise CheckpointError("exported folders use safetensors: pip install safetensors") from None
    return load_file, save_file


def load_export(folder: str | Path, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of an exported folder (export.py writes it), in eval mode."""
    load_file, _ = safetensors()
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") == "mdlm":
            raise CheckpointError(
                f"{folder}: MDLM's released checkpoint (model_type mdlm), not an atat export; convert it once with "
                f"`atat import --mdlm {folder} --out {folder.name}-atat` and pass that folder"
            )
        info = config["mdlm_atat"]
        tok_info = json.loads((folder / "tokenizer_config.json").read_text())["mdlm_atat"]
        backend = (folder / "tokenizer.json").read_text()
    except (OSError, KeyError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a complete atat export folder ({type(err).__name__}: {err})") from None
    if not use_ema and info["weights"] == "ema":
        raise ConfigError(f"--no-ema: {folder} holds the EMA weights only; export with --no-ema for the raw ones")
    cfg = from_dict(saved_config(info["config"]))
    # tokenizer.json names an appended MASK / PAD as added tokens for transformers; atat's tokenizer has them as ids
    tokenizer = Tokenizer.from_json(json.dumps({**tok_info, "backend": atat_backend(backend, tok_info)}))
    model = build_model(cfg.model, tokenizer.num_tokens)
    try:
        # An export holds the real vocabulary rows (export.py): the model's padding rows, if any, are zeros again.
        weights = pad_vocab(load_file(str(folder / "model.safetensors")), model.num_tokens, model.padded_tokens)
        model.load_state_dict(weights)
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched file means the same to the user
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot load ({type(err).__name__}: {err})") from None
    model.to(device).eval()
    return LoadedModel(
        model, cfg, tokenizer, step=info["step"], config_hash=info["config_hash"], weights=info["weights"],
        tokens_seen=info.get("tokens_seen"),  # folders exported before it was recorded lack it
    )
