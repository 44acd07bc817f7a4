"""The training loop: one loop for every variant (STYLE principle 2), readable in one sitting.

A step: `gradient_accumulation_steps` micro-batches whose times t are stratified over the whole accumulated
batch, backward on each, clip, AdamW, LR schedule, EMA. MDLM and ATAT differ only in how a micro-batch's loss
is made: MDLM calls the objective; ATAT (`atat.enabled`) runs its estimator, masks adaptively, and adds the
estimator's own loss (diffusion/atat.py). Every `log_every_n_steps` a metrics line; every `eval_every_n_steps`
the validation bound with the EMA weights (best.pt when it improves) and, for ATAT, the estimator's
diagnostics; every `save_every_n_steps` checkpoints/last.pt, which holds everything needed to continue exactly.
SIGTERM / SIGINT finish the step, save last.pt and return; a step with a NaN/inf loss or gradient is skipped and
counted, and too many in a row stop the run (train/faults.py).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdlm_atat.config import Config, ConfigError, advisories
from mdlm_atat.data.loader import eval_batches, train_batches
from mdlm_atat.data.tokenizers import Tokenizer
from mdlm_atat.eval.diagnostics import importance_diagnostics, masking_profile, stage_betas
from mdlm_atat.eval.likelihood import BoundResult, evaluate_bound
from mdlm_atat.models import build_model, count_parameters
from mdlm_atat.pipeline import build_run_data
from mdlm_atat.progress import progress_bar
from mdlm_atat.run import Run, RunCheckpoint, method_name, read_resume_checkpoint
from mdlm_atat.runtime import autocast_for, precision_name
from mdlm_atat.train import distributed
from mdlm_atat.train.checkpoint import (
    RunDirError, checkpoint_dir, has_checkpoint, save_checkpoint,
)
from mdlm_atat.train.faults import GracefulStop, NonFiniteGuard, check_writable
from mdlm_atat.train.metrics import MetricsLog, build_sinks, note
from mdlm_atat.train.rundir import RunLock, check_new_run_dir, check_resume_config, trim_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config, run_dir: Path, resume: bool = False, max_steps: int | None = None, restart: bool = False,
    checkpoint: tuple[RunCheckpoint, Path] | None = None,
) -> dict[str, Any]:
    """Train from scratch into `run_dir`, or continue the run saved there. Returns a summary of the run.

    `max_steps` stops this invocation at that global step without changing the LR schedule or the curriculum,
    which follow `training.total_steps`. A new run needs a folder without another run's files; `restart` lets it
    start over a run that never saved a checkpoint (`--resume --config` relaunched). One process trains in a
    folder at a time (train/rundir.py). `checkpoint`: the (checkpoint, path) a resume continues from, when the
    caller has read it already (the CLI does, for its config): a checkpoint is read once. Under torchrun every
    process calls this: it joins the process group, trains its share of each global batch and leaves the group
    (train/distributed.py, docs/distributed.md).
    """
    dist_env = distributed.init_distributed(cfg.training.device)
    finished = False
    try:
        summary = _train(cfg, Path(run_dir), resume, max_steps, dist_env, restart, checkpoint)
        finished = True
        return summary
    finally:
        distributed.destroy_distributed(synchronize=finished)


def _train(
    cfg: Config, run_dir: Path, resume: bool, max_steps: int | None, dist_env: distributed.DistEnv, restart: bool,
    checkpoint: tuple[RunCheckpoint, Path] | None,
) -> dict[str, Any]:
    locks: list[RunLock | None] = []  # the run folder's lock once taken (rank 0 holds it; None elsewhere)
    try:
        return _train_locked(cfg, run_dir, resume, max_steps, dist_env, restart, locks, checkpoint)
    finally:
        for lock in locks:
            if lock is not None:
                lock.release()


def _lock(run_dir: Path, dist_env: distributed.DistEnv, cfg: Config, resume: bool, restart: bool) -> RunLock | None:
    """Rank 0 takes the run folder's lock and, holding it, checks what the folder holds (_check_folder); every
    rank raises the same RunDirError when either fails."""
    lock, error = None, None
    if dist_env.is_main:
        try:
            lock = RunLock.acquire(run_dir)
            _check_folder(run_dir, resume, restart)
        except RunDirError as err:
            error = str(err)
    error = distributed.rank0_value(error, cfg.training.device)
    if error is not None:
        if lock is not None:
            lock.release()
        raise RunDirError(error)
    return lock


def _check_folder(run_dir: Path, resume: bool, restart: bool) -> None:
    if has_checkpoint(run_dir) and not resume:
        raise RunDirError(
            f"{run_dir}: this run folder already holds checkpoints; add --resume to continue it, "
            "or choose another --log-dir"
        )
    if not resume and not restart:
        check_new_run_dir(run_dir)


def _train_locked(
    cfg: Config, run_dir: Path, resume: bool, max_steps: int | None, dist_env: distributed.DistEnv, restart: bool,
    locks: list[RunLock | None], checkpoint: tuple[RunCheckpoint, Path] | None,
) -> dict[str, Any]:
    last_path = checkpoint_dir(run_dir) / "last.pt"
    saved = None
    if run_dir.is_dir():  # a folder that exists is locked before anything is read from it
        locks.append(_lock(run_dir, dist_env, cfg, resume, restart))
    else:
        _check_folder(run_dir, resume, restart)  # --resume on a folder that is not there
    if resume:
        # last.pt, or an older one when it is unreadable; read here unless the caller has read it
        saved, resumed_from = checkpoint or read_resume_checkpoint(run_dir)
        check_resume_config(saved.config, cfg, resumed_from)  # before anything is written
    tc = cfg.training
    seed_everything(tc.seed)  # the same seed on every rank: the modules are built equal
    device = dist_env.device
    autocast = autocast_for(device, tc.mixed_precision)
    check_writable(cfg.data.cache_dir, "data.cache_dir")  # a path that cannot be written: one line, not a traceback

    saved_tokenizer = Tokenizer.from_json(saved.tokenizer) if saved is not None else None
    # Rank 0 fills the tokenizer / token-store cache first; the others then reuse it.
    data = distributed.rank0_first(dist_env, lambda: build_run_data(cfg.data, tokenizer=saved_tokenizer))
    pad_id = data.tokenizer.pad_id if cfg.data.padded else None  # what evaluation leaves out (packed: nothing)
    cfg = with_tokenizer_vocab(cfg, data.tokenizer)  # a new config: the validated one is never changed
    check_writable(run_dir, "--log-dir")  # only once the data is there: a failed start leaves no folder
    if not locks:  # a new folder: locked once made, and checked again (another command may have started there)
        locks.append(_lock(run_dir, dist_env, cfg, resume, restart))
    if dist_env.is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    run = Run.build(cfg, data.tokenizer, dist_env, data.train.unigram_counts, resume_from=saved)
    model, estimator, ema, objective, atat, state = run.model, run.estimator, run.ema, run.objective, run.atat, run.state
    scheduler = run.scheduler
    if dist_env.is_main:
        _note_cpu_cost(model, device, cfg)

    end_step = tc.total_steps if max_steps is None else min(max_steps, tc.total_steps)
    batch_size, accum = cfg.data.batch_size, tc.gradient_accumulation_steps
    global_batch = run.global_batch  # sequences per optimiser step, all ranks together
    tokens_per_step = global_batch * cfg.data.max_length
    batches = train_batches(  # this rank's disjoint share of each global batch
        data.train_blocks, batch_size, seed=tc.seed, start_sample=state.samples_seen, rank=dist_env.rank,
        world_size=dist_env.world_size, num_workers=cfg.data.num_workers,
    )
    if dist_env.is_main and saved is not None:  # steps after the checkpoint are run again, to the same numbers
        dropped = trim_metrics(run_dir / "metrics.jsonl", state.step)
        if dropped:
            print(f"note: {run_dir / 'metrics.jsonl'}: {dropped} records after step {state.step} (the checkpoint) "
                  "removed; those steps run again", file=sys.stderr)
    elif dist_env.is_main and restart:  # a run that never saved a checkpoint starts over
        trim_metrics(run_dir / "metrics.jsonl", 0)
    metrics = (  # rank 0 logs: the file, the console and the sinks (TensorBoard, W&B)
        MetricsLog(run_dir / "metrics.jsonl", build_sinks(cfg, run_dir)) if dist_env.is_main
        else distributed.SilentLog()
    )
    if dist_env.is_main:
        for line in advisories(cfg):
            note(line)
    metrics.write(
        {
            "event": "start" if saved is None else "resume",
            "step": state.step,
            "device": str(device),
            "precision": precision_name(device, tc.mixed_precision),
            "parameters": count_parameters(model),
            "method": method_name(cfg),
            "estimator_parameters": count_parameters(estimator) if estimator is not None else 0,
            "vocab_size": data.tokenizer.vocab_size,
            "train_blocks": len(data.train_blocks),
            "val_blocks": len(data.val_blocks),
            "world_size": dist_env.world_size,
            "strategy": run.parallel.strategy,
            "batch_size_per_device": batch_size,
            "gradient_accumulation_steps": accum,
            "global_batch_size": global_batch,
            "tokens_per_step": tokens_per_step,
            "run_dir": str(run_dir),
        }
    )

    def save(path: Path) -> None:
        state.log_loss_sum = distributed.mean_over_ranks(loss_sum.clone(), dist_env).item()  # a collective
        state.log_applied_steps = applied_since_log
        payload = run.checkpoint().to_dict()  # on every rank: the FSDP gathers are collectives
        if dist_env.is_main:
            save_checkpoint(path, payload)

    eval_copy = distributed.EvalCopy(dist_env, lambda: build_model(cfg.model, data.tokenizer.num_tokens))

    def validate() -> BoundResult | None:
        """Rank 0 evaluates (None elsewhere); every rank learns whether best.pt is to be written."""
        eval_model = eval_copy(ema.module if ema is not None else model)  # full weights on rank 0
        result, improved = None, False
        if dist_env.is_main:
            result = evaluate_bound(
                eval_model,
                objective,
                eval_batches(data.val_blocks, batch_size, max_batches=tc.eval_batches),
                num_t=cfg.diffusion.eval_num_t,
                seed=tc.seed,
                device=device,
                autocast=autocast,
                pad_id=pad_id,
            )
            improved = result.nelbo < state.best_val_nelbo
            if improved:
                state.best_val_nelbo = result.nelbo
            metrics.write(
                {
                    "event": "val",
                    "step": state.step,
                    "val_nelbo": result.nelbo,
                    "val_stderr": result.stderr,
                    "val_ppl": result.ppl,
                    "val_tokens": result.num_tokens,
                    # atat eval scores the whole split; the in-training curve may score its first batches only
                    "val_scope": "whole split" if tc.eval_batches == 0 else f"first {tc.eval_batches} batches",
                    "best": improved,
                }
            )
            if estimator is not None and cfg.atat.diagnostics_batches > 0:
                diagnostics = importance_diagnostics(
                    eval_model,
                    estimator,
                    objective,
                    eval_batches(data.val_blocks, batch_size, max_batches=cfg.atat.diagnostics_batches),
                    data.tokenizer,
                    seed=tc.seed,
                    device=device,
                    autocast=autocast,
                )
                metrics.write({"event": "atat_val", "step": state.step, **diagnostics})
                profile = masking_profile(  # masking rate vs t per stage and token frequency, for the report
                    estimator,
                    objective.schedule,
                    stage_betas(atat.curriculum),
                    eval_batches(data.val_blocks, batch_size, max_batches=1),  # 10 estimator passes per batch
                    balanced=cfg.atat.masking == "balanced",
                    pad_id=pad_id,
                    device=device,
                )
                metrics.write({"event": "masking_profile", "step": state.step, **profile}, console=False)
        if distributed.rank0_flag(improved, dist_env):
            save(checkpoint_dir(run_dir) / "best.pt")
        return result

    first_loss = last_loss = None
    val_result = None
    loss_sum = torch.full((), state.log_loss_sum, device=device)  # summed on device: no host sync inside the step
    steps_since_log = 0
    log_clock = time.perf_counter()
    progress = progress_bar(
        total=end_step, initial=state.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
        disable=not dist_env.is_main,
    )
    guard = NonFiniteGuard(tc.max_nonfinite_steps, metrics, last_path)
    stop = GracefulStop().install()  # SIGTERM / SIGINT: finish the step, save, return (train/faults.py)
    stopped = None
    applied_since_log = state.log_applied_steps  # steps whose update was applied: the logged loss averages those
    model.train()
    try:
        while state.step < end_step:
            regular_log = (state.step + 1) % tc.log_every_n_steps == 0 or state.step == 0
            log_now = regular_log or state.step + 1 == end_step
            step = run.train_step(batches, autocast, guard=guard, with_stats=log_now)
            if step.applied:
                loss_sum += step.nelbo
                applied_since_log += 1
            grad_norm, atat_step = step.grad_norm, step.atat
            steps_since_log += 1
            progress.update(1)

            if log_now:
                loss = math.nan  # every step since the last log was skipped (non-finite)
                if applied_since_log:
                    # the global batch's mean (a copy: the window may stay open, see regular_log)
                    loss = distributed.mean_over_ranks(loss_sum.clone(), dist_env).item() / applied_since_log
                elapsed = time.perf_counter() - log_clock
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                metrics.write(
                    {
                        "event": "train",
                        "step": state.step,
                        "loss": loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "tokens_seen": state.samples_seen * cfg.data.max_length,
                        "tokens_per_s": steps_since_log * tokens_per_step / elapsed,
                        "tokens_per_s_per_device": steps_since_log * tokens_per_step / elapsed / dist_env.world_size,
                        **(_atat_record(atat_step) if atat_step is not None else {}),
                        **({"nonfinite_steps": state.nonfinite_steps} if state.nonfinite_steps else {}),
                    }
                )
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{steps_since_log * tokens_per_step / elapsed:,.0f}")
                if regular_log:  # a log only because --max-steps ends here leaves the window open: resumed, the
                    loss_sum.zero_()  # run logs at the next log step what an uninterrupted run logs there
                    applied_since_log = 0
                steps_since_log = 0
                log_clock = time.perf_counter()
            if state.step % tc.eval_every_n_steps == 0 or state.step == end_step:
                validation_start = time.perf_counter()
                val_result = validate()
                # evaluation time is not training throughput: the window's clock skips it (a reset would count
                # the window's earlier steps against the time since the evaluation alone)
                log_clock += time.perf_counter() - validation_start
            stopped = stop.agreed(dist_env)  # every rank stops after the same step
            if state.step % tc.save_every_n_steps == 0 or state.step == end_step or stopped:
                save(last_path)
            if stopped:
                metrics.write({"event": "stopped", "step": state.step, "signal": stopped})
                break
    finally:
        stop.restore()
        progress.close()
        metrics.close()
    return {
        "run_dir": str(run_dir),
        "step": state.step,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val": val_result.to_dict() if val_result is not None else None,
        "best_val_nelbo": state.best_val_nelbo,
        "nonfinite_steps": state.nonfinite_steps,
        "stopped": stopped,  # the signal's name when SIGTERM / SIGINT ended the run early, else None
    }


# The README's quickstart, measured: a 2.1M-parameter DiT trains at about 14,500 tokens/s on 2 CPU cores.
CPU_REFERENCE = (2.1e6, 14_500)
CPU_NOTE_PARAMETERS = 10e6


def _note_cpu_cost(model: torch.nn.Module, device: torch.device, cfg: Config) -> None:
    """A model far beyond the quickstart's on a CPU (model.size=tiny is 15x it): say what it costs before it runs."""
    num_parameters = count_parameters(model)
    if device.type != "cpu" or num_parameters < CPU_NOTE_PARAMETERS:
        return
    params, rate = CPU_REFERENCE
    tokens_per_s = rate * params / num_parameters
    tokens_per_step = cfg.data.batch_size * cfg.training.gradient_accumulation_steps * cfg.data.max_length
    print(
        f"note: a {num_parameters / 1e6:.1f}M-parameter denoiser on the CPU ({num_parameters / params:.0f}x the "
        f"quickstart's {params / 1e6:.1f}M): roughly {tokens_per_s:,.0f} tokens/s on 2 cores, "
        f"{tokens_per_step / tokens_per_s:,.1f} s per step of {tokens_per_step:,} tokens; model.size presets are "
        "meant for GPUs",
        file=sys.stderr,
    )


def _atat_record(step) -> dict[str, Any]:
    """The curriculum state and the masking / importance statistics of the step just taken (last micro-batch)."""
    record: dict[str, Any] = {"stage": step.state.stage, "beta": step.state.beta}
    record["estimator_loss"] = float(step.estimator_loss.detach())
    record.update({key: float(value) for key, value in step.stats.items()})
    return record


def with_tokenizer_vocab(cfg: Config, tokenizer: Tokenizer) -> Config:
    """The config with model.vocab_size resolved, as the run saves it: null takes the tokenizer's; a stated size
    must match it. Derived, never written into `cfg`."""
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if cfg.model.vocab_size != tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} does not match the tokenizer {tokenizer.name!r} "
            f"({tokenizer.vocab_size} tokens); set it to {tokenizer.vocab_size} or null"
        )
    return cfg
