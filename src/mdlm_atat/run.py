"""A run: everything a config builds (model, EMA, estimator, objective, ATAT, optimiser, LR schedule, data
position), THE training step, and the model that inference loads from a checkpoint or an export.

The layer between the parts (models/, diffusion/, train/'s building blocks) and what uses them (eval/, the
training loop in train/trainer.py, sample, export, the benchmarks): importing it never imports the loop.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from mdlm_atat.config import Config, ConfigError, from_dict
from mdlm_atat.data.loader import attention_mask
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.diffusion.atat import AtatStep, AtatTraining
from mdlm_atat.diffusion.objective import MaskedDiffusionObjective, NextTokenObjective
from mdlm_atat.diffusion.schedule import build_schedule
from mdlm_atat.models import build_model
from mdlm_atat.models.importance import ImportanceEstimator, unigram_surprisal
from mdlm_atat.train import distributed
from mdlm_atat.train.checkpoint import CheckpointError, is_export_dir, load_run_checkpoint, set_rng_state
from mdlm_atat.train.checkpoint import resolve_checkpoint  # noqa: F401 (the layers above eval/ resolve through here)
from mdlm_atat.train.optim import ModelEMA, build_ema, build_optimizer, build_scheduler


def make_objective(cfg: Config, tokenizer: Tokenizer) -> MaskedDiffusionObjective:
    if cfg.model.name == "ar":  # the AR baseline: same loop, next-token NLL (models/ar.py)
        return NextTokenObjective(tokenizer.mask_id)
    schedule = build_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    # The DiT fuses its output projection with the SUBS loss: no (M, V) logits (diffusion/fused_loss.py).
    return MaskedDiffusionObjective(
        schedule, tokenizer.mask_id, cfg.diffusion.antithetic, fused=True, mask_padding=cfg.diffusion.mask_padding
    )


def method_name(cfg: Config) -> str:
    """What the run trains, as metrics.jsonl, the report and the console name it."""
    if cfg.model.name == "ar":
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
        resume_from: dict[str, Any] | None = None, objective: MaskedDiffusionObjective | None = None,
    ) -> Run:
        """Build every part on `env.device` from the config (torch's RNG seeded by the caller: the modules' init),
        load the checkpoint payload `resume_from` into them, then compile / wrap and build the optimiser. The
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
            model.load_state_dict(resume_from["model"])
            if estimator is not None:
                estimator.load_state_dict(resume_from["estimator"])
            if ema is not None:
                ema.module.load_state_dict(resume_from["ema"])
                ema.num_updates = int(resume_from["ema_num_updates"])
            state = TrainState(**resume_from["state"])
            set_rng_state(resume_from["rng"])
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
            distributed.load_full_optimizer_state_dict(optimizer, resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
        return cls(cfg, tokenizer, env, model, objective, estimator, ema, parallel, atat, optimizer, scheduler, state)

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
        return self.cfg.model.name == "ar"


def load_for_inference(
    checkpoint: str | Path, use_ema: bool = True, device: torch.device | str = "cpu", with_estimator: bool = False
) -> LoadedModel:
    """The model (EMA weights by default) of a .pt file, a run folder or an `atat export` folder. With
    `with_estimator`, also ATAT's importance estimator saved with the weights (None for the MDLM baseline)."""
    if is_export_dir(checkpoint):
        loaded = load_export(checkpoint, use_ema=use_ema, device=device)
        if with_estimator:
            load_file, _ = safetensors()
            file = Path(checkpoint) / "estimator.safetensors"
            state = load_file(str(file)) if file.is_file() else None
            loaded.estimator = _estimator(loaded.cfg, loaded.tokenizer, state, device)
        return loaded
    payload = load_run_checkpoint(checkpoint)
    cfg = from_dict(payload["config"])
    tokenizer = Tokenizer.from_json(payload["tokenizer"])
    model = build_model(cfg.model, tokenizer.num_tokens)
    weights = payload["ema"] if use_ema and payload.get("ema") is not None else payload["model"]
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedModel(
        model, cfg, tokenizer, step=payload["state"]["step"], config_hash=payload["config_hash"],
        weights="ema" if weights is payload.get("ema") else "raw",
        tokens_seen=payload["state"]["samples_seen"] * cfg.data.max_length,
        # from the payload already read: a checkpoint with its optimiser is GBs at real sizes
        estimator=_estimator(cfg, tokenizer, payload.get("estimator"), device) if with_estimator else None,
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
        info = config["mdlm_atat"]
        tok_info = json.loads((folder / "tokenizer_config.json").read_text())["mdlm_atat"]
        backend = (folder / "tokenizer.json").read_text()
    except (OSError, KeyError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a complete atat export folder ({type(err).__name__}: {err})") from None
    if not use_ema and info["weights"] == "ema":
        raise ConfigError(f"--no-ema: {folder} holds the EMA weights only; export with --no-ema for the raw ones")
    cfg = from_dict(info["config"])
    tokenizer = Tokenizer.from_json(json.dumps({**tok_info, "backend": backend}))
    model = build_model(cfg.model, tokenizer.num_tokens)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as err:  # noqa: BLE001 - a damaged or mismatched file means the same to the user
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot load ({type(err).__name__}: {err})") from None
    model.to(device).eval()
    return LoadedModel(
        model, cfg, tokenizer, step=info["step"], config_hash=info["config_hash"], weights=info["weights"],
        tokens_seen=info.get("tokens_seen"),  # folders exported before it was recorded lack it
    )
