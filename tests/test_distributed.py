"""Data parallelism (train/distributed.py) on CPU: gloo process groups in spawned subprocesses.

Each multi-process test starts 2 processes with the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), one thread each (2 cores). The properties: 2-process DDP and FSDP2 give the loss and
gradients of one process on the same global batch, accumulation skips the reductions it should, and a run
checkpointed by 2 processes continues in 1 (and the reverse) exactly as an uninterrupted run, up to float
reduction order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from mdlm_atat.config import ConfigError, TrainingConfig, load_config
from mdlm_atat.diffusion.atat import AtatTraining
from mdlm_atat.models import build_model
from mdlm_atat.models.importance import ImportanceEstimator, unigram_surprisal
from mdlm_atat.train import distributed
from mdlm_atat.train.checkpoint import load_checkpoint
from mdlm_atat.run import make_objective
from mdlm_atat.train.trainer import train

from conftest import REPO, TINY_OVERRIDES

# ----------------------------------------------------------------------------------------------------------
# Launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """fn(*args) in `world_size` processes, as torchrun would start them; raises if any of them fails."""
    mp.start_processes(_as_rank, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn")


def _as_rank(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    fn(*args)


# ----------------------------------------------------------------------------------------------------------
# Without processes: the pieces


def test_strategy_is_validated_and_resolved():
    with pytest.raises(ConfigError, match="^training.strategy"):
        load_config(None, ["training.strategy=horovod"])
    assert distributed.resolve_strategy("auto", 1) == "none"
    assert distributed.resolve_strategy("fsdp", 1) == "none"  # one process: nothing to reduce
    assert distributed.resolve_strategy("auto", 2) == "ddp"
    assert distributed.resolve_strategy("fsdp", 8) == "fsdp"
    with pytest.raises(ConfigError, match="^training.strategy: none with 2 processes"):
        distributed.resolve_strategy("none", 2)


def test_step_draws_are_stratified_over_the_global_batch_and_a_function_of_seed_and_step():
    cfg = load_config(None, [])
    objective = make_objective(cfg, type("Tok", (), {"mask_id": 7})())
    gen = torch.Generator()
    t, noise = distributed.step_draws(objective, 0, 5, 16, 8, torch.device("cpu"), gen)
    assert t.shape == (16,) and noise.shape == (16, 8)
    assert noise.dtype == torch.float64  # issue D3: the masks' draws resolve p below float32's 2^-24 spacing
    eps = cfg.diffusion.eps
    strata = torch.floor((t.double() - eps) / (1 - eps) * 16).long()
    assert sorted(strata.tolist()) == list(range(16))  # one t in each of the global batch's 16 strata
    t2, noise2 = distributed.step_draws(objective, 0, 5, 16, 8, torch.device("cpu"), gen)
    assert torch.equal(t, t2) and torch.equal(noise, noise2)
    t3, _ = distributed.step_draws(objective, 0, 6, 16, 8, torch.device("cpu"), gen)
    assert not torch.equal(t, t3)


def test_local_rows_follow_the_loader_order():
    # Global micro-batch m holds samples [m B W, (m + 1) B W); rank r takes the r-th B of them.
    rows = [
        distributed.local_rows(m, distributed.DistEnv(rank=r, world_size=2), 3) for m in range(2) for r in range(2)
    ]
    assert [(s.start, s.stop) for s in rows] == [(0, 3), (3, 6), (6, 9), (9, 12)]


# ----------------------------------------------------------------------------------------------------------
# 2 processes vs 1: loss and gradients of one step

NUM_TOKENS = 64
GLOBAL_BATCH, SEQ_LEN = 8, 16


def _step_config():
    return load_config(None, [
        "model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2", "model.cond_dim=16", "model.dropout=0.0",
        "atat.estimator_hidden_dim=16", "atat.estimator_num_heads=2", "atat.estimator_cond_dim=8",
        "atat.estimator_warmup_steps=0", "curriculum.variant=none", "atat.beta0=1.0",
    ])


def _modules_and_batch():
    """The same modules (weights moved off MDLM's zero init, so every layer gets a gradient) and global batch on
    every process."""
    cfg = _step_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_TOKENS)
    counts = torch.randint(0, 100, (NUM_TOKENS,), generator=torch.Generator().manual_seed(1))
    estimator = ImportanceEstimator(cfg.atat, NUM_TOKENS, unigram_surprisal(counts, NUM_TOKENS))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*model.parameters(), *estimator.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    x0 = torch.randint(0, NUM_TOKENS - 1, (GLOBAL_BATCH, SEQ_LEN), generator=gen)
    objective = make_objective(cfg, type("Tok", (), {"mask_id": NUM_TOKENS - 1})())
    t, noise = distributed.step_draws(objective, 0, 0, GLOBAL_BATCH, SEQ_LEN, torch.device("cpu"), torch.Generator())
    return cfg, model, estimator, objective, (x0, t, noise)


def _micro_step(atat, objective, forward_model, batch, rows, accum) -> torch.Tensor:
    x0, t, noise = (v[rows] for v in batch)
    step = atat(objective, forward_model, x0, t, step=10, uniform_noise=noise, row_offset=rows.start)
    ((step.terms.loss + step.estimator_loss) / accum).backward()
    return step.terms.loss.detach() / accum


def _full_grads(*modules) -> dict[str, torch.Tensor]:
    out = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            grad = p.grad.full_tensor() if distributed._is_dtensor(p.grad) else p.grad
            out[f"{i}.{name}"] = grad.detach().clone()
    return out


def _gradients_worker(strategy: str, out_path: str) -> None:
    env = distributed.init_distributed("cpu")
    results = _gradients(strategy, env)  # the modules are gone once it returns, before the group is
    if env.is_main:
        torch.save(results, out_path)
    distributed.destroy_distributed(synchronize=True)


def _gradients(strategy: str, env: distributed.DistEnv) -> dict:
    cfg, model, estimator, objective, batch = _modules_and_batch()
    parallel = distributed.parallelize(model, estimator, None, TrainingConfig(strategy=strategy), env)
    atat = AtatTraining(cfg, estimator, forward=parallel.estimator)
    reductions = []
    if strategy == "ddp":  # count DDP's bucket all-reduces
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            reductions.append(1)
            return allreduce_hook(state, bucket)

        parallel.model.register_comm_hook(None, counting_hook)
    results = {}
    for accum in (1, 2):
        per_rank = GLOBAL_BATCH // env.world_size // accum  # rows per rank per micro-step
        loss = torch.zeros(())
        for micro in range(accum):
            with parallel.gradient_sync(micro == accum - 1):
                loss += _micro_step(atat, objective, parallel.model, batch, distributed.local_rows(micro, env, per_rank), accum)
            if micro == 0 and accum > 1:
                reduced_early = len(reductions) if strategy == "ddp" else sum(p.grad is not None for p in model.parameters())
        results[accum] = {"loss": distributed.mean_over_ranks(loss, env).item(), "grads": _full_grads(model, estimator)}
        if accum > 1:
            results[accum]["reduced_after_first_micro_step"] = reduced_early
        reductions.clear()
        for module in (model, estimator):
            module.zero_grad(set_to_none=True)
    return results


def _one_process_reference(rows_per_chunk: int) -> dict:
    """One process, gradient accumulation over chunks of `rows_per_chunk` rows: the 2-process partition."""
    cfg, model, estimator, objective, batch = _modules_and_batch()
    atat = AtatTraining(cfg, estimator)
    num_chunks = GLOBAL_BATCH // rows_per_chunk
    loss = torch.zeros(())
    for k in range(num_chunks):
        loss += _micro_step(atat, objective, model, batch, slice(k * rows_per_chunk, (k + 1) * rows_per_chunk), num_chunks)
    return {"loss": loss.item(), "grads": _full_grads(model, estimator)}


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_one_process_loss_and_gradients(tmp_path, strategy):
    out = tmp_path / "grads.pt"
    spawn(_gradients_worker, 2, strategy, str(out))
    results = torch.load(out, weights_only=True)
    whole_batch = _one_process_reference(GLOBAL_BATCH)
    for accum in (1, 2):
        reference = _one_process_reference(GLOBAL_BATCH // 2 // accum)  # the same micro-batches, one process
        got = results[accum]
        assert got["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert got["loss"] == pytest.approx(whole_batch["loss"], rel=1e-5)  # the denoiser's loss: any partition
        assert got["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{strategy} {accum} {name}")
            if name.startswith("0."):  # the denoiser's gradient is the whole batch's, however it is split
                torch.testing.assert_close(got["grads"][name], whole_batch["grads"][name], rtol=1e-4, atol=1e-6)
        assert any(g.abs().sum() > 0 for name, g in got["grads"].items() if ".blocks." in name)
    # Accumulation reduces once, in the last micro-step: DDP ran no all-reduce, FSDP2 no reduce-scatter, before.
    assert results[2]["reduced_after_first_micro_step"] == 0


# ----------------------------------------------------------------------------------------------------------
# Checkpoints across world sizes: 2 processes save, 1 resumes, and the reverse

# Dropout off: its masks come from each rank's own stream (docs/distributed.md). Adaptive masking from step 2 on,
# so the estimator (replicated with DDP) drives the masks in the second half.
RUN_OVERRIDES = ["model.dropout=0.0", "data.batch_size=4", "atat.estimator_warmup_steps=2", "curriculum.variant=none"]


def _run_config(data_cache, *overrides: str):
    return load_config(None, TINY_OVERRIDES + [f"data.cache_dir={data_cache}", *RUN_OVERRIDES, *overrides])


def _train_worker(data_cache: str, overrides: list[str], run_dir: str, resume: bool, max_steps: int | None) -> None:
    train(_run_config(data_cache, *overrides), run_dir, resume=resume, max_steps=max_steps)


def _records(run_dir, event):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, data_cache):
    """The uninterrupted reference: 1 process, per-device batch 4, accumulation 2 (global batch 8), 6 steps."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2"), run_dir)
    return run_dir


def assert_same_run(reference, run_dir) -> None:
    losses = {r["step"]: r["loss"] for r in _records(reference, "train")}
    got = {r["step"]: r["loss"] for r in _records(run_dir, "train")}
    assert got.keys() == losses.keys() == set(range(1, 7))
    for step, loss in losses.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
    vals = [r["val_nelbo"] for r in _records(reference, "val")]
    assert [r["val_nelbo"] for r in _records(run_dir, "val")] == pytest.approx(vals, rel=1e-5)
    a, b = load_checkpoint(reference), load_checkpoint(run_dir)
    assert a["state"]["step"] == b["state"]["step"] == 6
    assert a["state"]["samples_seen"] == b["state"]["samples_seen"] == 6 * 8  # global samples
    assert a["curriculum"] == b["curriculum"]
    for part in ("model", "ema", "estimator"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(b[part][key], a[part][key], rtol=1e-4, atol=1e-5, msg=f"{part} {key}")
    for index, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_save_one_resumes(one_process_run, data_cache, tmp_path, strategy):
    run_dir = tmp_path / "run"
    spawn(_train_worker, 2, str(data_cache), [f"training.strategy={strategy}"], str(run_dir), False, 3)
    (start,) = _records(run_dir, "start")  # rank 0 alone logs
    assert (start["world_size"], start["strategy"], start["global_batch_size"]) == (2, strategy, 8)
    assert load_checkpoint(run_dir)["world_size"] == 2
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2"), run_dir, resume=True)
    assert_same_run(one_process_run, run_dir)


@pytest.mark.distributed
def test_one_process_saves_two_resume_with_fsdp(one_process_run, data_cache, tmp_path):
    run_dir = tmp_path / "run"
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2"), run_dir, max_steps=3)
    spawn(_train_worker, 2, str(data_cache), ["training.strategy=fsdp"], str(run_dir), True, None)
    assert_same_run(one_process_run, run_dir)


@pytest.mark.distributed
def test_torchrun_atat_train_resumes_a_one_process_run(one_process_run, data_cache, tmp_path):
    """`torchrun -m mdlm_atat train --resume`: the CLI under torchrun (DDP, the default), rank 0 reports."""
    run_dir = tmp_path / "run"
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2"), run_dir, max_steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "mdlm_atat", "train", "--resume", "--log-dir", str(run_dir), "training.gradient_accumulation_steps=1",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: step 6") == 1  # one report, from rank 0
    (resumed,) = _records(run_dir, "resume")
    assert (resumed["world_size"], resumed["strategy"], resumed["global_batch_size"]) == (2, "ddp", 8)
    assert_same_run(one_process_run, run_dir)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_save_one_gpu_resumes(data_cache, tmp_path, strategy):
    """NCCL, cuda:LOCAL_RANK, bf16 (FSDP2's MixedPrecisionPolicy): the same checks at bf16 tolerance."""
    gpu = ["training.device=auto", "training.mixed_precision=bf16"]
    reference = tmp_path / "reference"
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2", *gpu), reference)
    run_dir = tmp_path / "run"
    spawn(_train_worker, 2, str(data_cache), [f"training.strategy={strategy}", *gpu], str(run_dir), False, 3)
    (start,) = _records(run_dir, "start")
    assert (start["world_size"], start["strategy"], start["device"]) == (2, strategy, "cuda:0")
    train(_run_config(data_cache, "training.gradient_accumulation_steps=2", *gpu), run_dir, resume=True)
    losses = {r["step"]: r["loss"] for r in _records(reference, "train")}
    got = {r["step"]: r["loss"] for r in _records(run_dir, "train")}
    assert got.keys() == losses.keys()
    for step, loss in losses.items():
        assert got[step] == pytest.approx(loss, rel=2e-2), step  # bf16: about 4e-3 per rounding
    assert load_checkpoint(run_dir)["state"]["samples_seen"] == 6 * 8


# ----------------------------------------------------------------------------------------------------------
# The scaling benchmark's CPU smoke test


@pytest.mark.distributed
def test_scaling_benchmark_runs_on_cpu_with_gloo(tmp_path):
    """ATAT's step timed on 1 and 2 processes (DDP, FSDP2), then the trainer's FSDP2 checkpoint from 2 processes
    resumed in 1 (about 30 s on 2 cores; the MDLM step is the same code without the estimator)."""
    out = tmp_path / "scaling.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--device", "cpu", "--hidden-dim", "32",
        "--num-layers", "2", "--num-heads", "2", "--cond-dim", "16", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "100", "--steps", "2", "--warmup", "1", "--nproc", "1,2", "--variants", "ddp,fsdp",
        "--atat", "--resume-check", "fsdp", "--resume-steps", "2", "--output", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    results = record["results"]
    # One process is plain training (the baseline, measured once); 2 processes per strategy.
    assert [(r["variant"], r["world_size"], r["strategy"]) for r in results] == [
        ("ddp", 1, "none"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")
    ]
    assert all(r["losses_finite"] and r["scaling_efficiency"] > 0 for r in results)
    assert results[0]["scaling_efficiency"] == 1.0
    assert all(r["atat"] and (r["stage"], r["beta"]) == ("fixed", 0.5) for r in results)  # the hard tilt
    assert record["method"] == "atat" and "efficiency" in done.stdout
    # The trainer's checkpoint from 2 processes (FSDP2), resumed in 1: the same losses as the 2-process run's own
    # second half (fp32 on CPU: equal up to the reduction order).
    (check,) = record["resume_checks"]
    assert check["ok"], check["error"]
    assert (check["strategy"], check["written_on"], check["resumed_on"]) == ("fsdp", 2, 1)
    assert check["checkpoint"] == {"world_size": 2, "step": 2, "samples_seen": 16, "consolidated": True}
    assert (check["resumed_at_step"], check["resumed_steps"]) == (2, [3, 4])
    assert check["max_rel_gap"] < 1e-5
    assert "resume check" in done.stdout


def test_scaling_benchmark_worker_times_the_mdlm_step(tmp_path):
    """Without --atat: one point as a torchrun launch runs it, here in one plain process (no wrapping)."""
    out = tmp_path / "point.json"
    command = [
        sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--device", "cpu", "--hidden-dim", "32",
        "--num-layers", "2", "--num-heads", "2", "--cond-dim", "16", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "100", "--steps", "2", "--warmup", "1", "--worker", str(out), "--variant", "ddp",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    point = json.loads(out.read_text())
    assert (point["atat"], point["strategy"], point["world_size"], point["losses_finite"]) == (False, "none", 1, True)
    assert "stage" not in point and point["tokens_per_s_per_device"] > 0
