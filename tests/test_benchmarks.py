"""The GPU benchmarks' CPU smoke runs: each script runs end to end at a tiny size and writes what it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import common  # noqa: E402
import sample_speed  # noqa: E402
import sampling_floor  # noqa: E402
import train_step  # noqa: E402

TINY = ["--device", "cpu", "--hidden-dim", "32", "--num-layers", "2", "--num-heads", "2", "--cond-dim", "16",
        "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300"]


@pytest.mark.parametrize("loss", ["fused", "rows", "full"])
def test_train_step_runs_each_loss_path_with_the_same_first_loss(tmp_path, loss):
    out = tmp_path / f"{loss}.json"
    assert train_step.main([*TINY, "--steps", "2", "--warmup", "1", "--variants", "eager,atat", "--loss", loss,
                            "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    eager, atat = report["results"]
    assert eager["variant"] == "eager" and atat["variant"] == "atat" and eager["loss"] == loss
    assert eager["tokens_per_s"] > 0 and eager["losses_finite"] and atat["losses_finite"]
    # Same seeded weights and batch on every path: the three loss paths compute one loss.
    reference = tmp_path / "full.json"
    if loss != "full":
        assert train_step.main([*TINY, "--steps", "1", "--warmup", "0", "--variants", "eager", "--loss", "full",
                                "--output", str(reference)]) == 0
    expected = json.loads(reference.read_text())["results"][0]["loss_first_batch"]
    assert eager["loss_first_batch"] == pytest.approx(expected, rel=1e-5)


def test_train_step_profile_lists_the_top_ops(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert train_step.main([*TINY, "--steps", "1", "--warmup", "1", "--variants", "eager", "--profile", "2",
                            "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["results"][0]["profile"]
    assert 0 < len(rows) <= common.PROFILE_TOP
    assert all(r["ms_per_step"] > 0 for r in rows) and 0 < sum(r["share"] for r in rows) <= 1 + 1e-9
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    assert "top" in capsys.readouterr().out


def test_sample_speed_cache_gives_the_same_tokens_on_cpu(tmp_path):
    out = tmp_path / "sample.json"
    assert sample_speed.main([*TINY, "--steps", "20", "--eval-batches", "1", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    by_name = {r["sampler"]: r for r in report["sampling"]}
    cached = by_name["ancestral-cache"]
    assert cached["tokens_equal_to_ancestral"] == 1.0  # fp32 on the CPU: the cache changes no sample
    assert by_name["ancestral"]["num_network_calls"] == 20 and cached["mask_left"] == 0
    assert cached["num_sequence_evals"] <= by_name["ancestral"]["num_sequence_evals"]
    assert report["eval"]["tokens_per_s"] > 0 and report["eval"]["nelbo"] > 0

    # The FLOP accounting: a sequence through 2 blocks of width 32 (12 x 32^2 matmul weights each) at L = 32 is
    # 32 x (2 x 2 x 12 x 32^2 + 4 x 2 x 32 x 32) FLOPs, plus 2 x 32 x 301 per decoded token.
    per_sequence, decoded = 32 * (2 * 2 * 12 * 32**2 + 4 * 2 * 32 * 32), 4 * 30
    assert cached["forward_flops"] == cached["num_sequence_evals"] * per_sequence + 2 * 32 * 301 * decoded
    assert cached["mfu"] is None and sample_speed.main([*TINY, "--steps", "4", "--eval-batches", "0", "--peak-flops",
                                                        "1e12", "--output", str(out)]) == 0
    rerun = {r["sampler"]: r for r in json.loads(out.read_text())["sampling"]}["ancestral"]
    assert rerun["seconds_at_peak"] == pytest.approx(rerun["forward_flops"] / 1e12)
    assert sampling_floor.main([str(out), "--peak-flops", "1e12"]) == 0


def test_sample_speed_evaluation_reports_its_trunk_mfu_and_profile(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert sample_speed.main([*TINY, "--steps", "2", "--samplers", "ancestral", "--eval-batches", "2", "--num-t", "3",
                              "--peak-flops", "1e12", "--profile", "2", "--output", str(out)]) == 0
    evaluation = json.loads(out.read_text())["eval"]
    # 2 batches of 4 sequences, each through the trunk 3 times (num_t), at the per-sequence FLOPs above.
    assert evaluation["trunk_flops"] == 2 * 4 * 3 * 32 * (2 * 2 * 12 * 32**2 + 4 * 2 * 32 * 32)
    assert evaluation["trunk_mfu"] == pytest.approx(evaluation["trunk_flops"] / evaluation["seconds"] / 1e12)
    rows = evaluation["profile"]
    assert 0 < len(rows) <= common.PROFILE_TOP and all(r["ms_per_step"] > 0 for r in rows)
    assert "[eval] top kernels" in capsys.readouterr().out


@pytest.mark.parametrize("capacity", [5, 32, 40, 100, 129, 300, 1000])
def test_largest_batch_search_finds_the_last_size_that_fits(capacity):
    calls = []

    def probe(batch_size):  # memory grows with the batch: sizes above `capacity` run out
        calls.append(batch_size)
        return 0.1 * batch_size if batch_size <= capacity else None

    found = train_step.largest_batch(probe, start=32, limit=512)
    best = min(capacity, 512)
    if capacity < 32:
        assert found["largest"] is None and found["smallest_failing"] == 32
        return
    assert found["largest"] <= best and best - found["largest"] < 8  # within one step of 8 below the true size
    assert found["peak_memory_gib"] == pytest.approx(0.1 * found["largest"])
    if capacity >= 512:
        assert found["smallest_failing"] is None and found["largest"] == 512
    else:  # the failing size brackets the capacity from above, one step of 8 from what fitted
        assert capacity < found["smallest_failing"] <= found["largest"] + 8
    assert len(calls) == len(set(calls)) <= 12  # no size probed twice; a handful of probes


def test_max_batch_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(["--device", "cpu", "--max-batch", "256"])
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_perf_suite_smoke_runs_every_step(tmp_path):
    """benchmarks/perf_suite.sh with SMOKE=1: every measurement of the GPU call runs at tiny sizes on the CPU."""
    import os
    import subprocess

    env = dict(os.environ, SMOKE="1")
    done = subprocess.run(["bash", "benchmarks/perf_suite.sh", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    written = {p.name for p in tmp_path.glob("*.json")}
    assert written == {"train_step_small_pad1.json", "train_step_small_pad64.json", "train_step_tiny.json",
                       "train_step_tiny_shared_a.json", "train_step_tiny_shared_b.json", "sample_speed_small.json"}
    pads = [json.loads((tmp_path / f"train_step_small_pad{p}.json").read_text())["results"][0] for p in (1, 64)]
    assert pads[0]["loss_first_batch"] == pytest.approx(pads[1]["loss_first_batch"], rel=1e-5)  # same function
