"""The GPU benchmarks' CPU smoke runs: each script runs end to end at a tiny size and writes what it prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

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
    profile = json.loads(out.read_text())["results"][0]["profile"]
    rows = profile["top"]
    assert 0 < len(rows) <= common.PROFILE_TOP
    assert all(r["ms_per_step"] > 0 for r in rows) and 0 < sum(r["share"] for r in rows) <= 1 + 1e-9
    assert sum(r["ms_per_step"] for r in rows) <= profile["busy_ms_per_step"] * (1 + 1e-9)
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows), reverse=True)
    assert "top" in capsys.readouterr().out


def test_profile_counts_each_gpu_kernel_once():
    """On the GPU a CPU op's own device time, and a named range's, is its kernels' time again: only kernels count."""
    from torch.autograd import DeviceType

    def event(key, device_type, device_us, cpu_us=5.0, count=2, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, count=count, self_device_time_total=device_us,
                               self_cpu_time_total=cpu_us, is_user_annotation=annotation)

    events = [event("aten::mm", DeviceType.CPU, 600.0), event("gemm_kernel", DeviceType.CUDA, 600.0),
              event("triton_fused", DeviceType.CPU, 300.0), event("triton_fused", DeviceType.CUDA, 300.0),
              event("Memset", DeviceType.CUDA, 100.0), event("aten::empty", DeviceType.CPU, 0.0),
              event("Optimizer.step#AdamW.step", DeviceType.CUDA, 300.0, annotation=True)]
    gpu = common.kernel_rows(events, calls=2, cuda=True)
    assert [r["name"] for r in gpu["top"]] == ["gemm_kernel", "triton_fused", "Memset"]
    assert gpu["busy_ms_per_step"] == pytest.approx(0.5)  # (600 + 300 + 100) us over 2 calls
    assert [r["share"] for r in gpu["top"]] == pytest.approx([0.6, 0.3, 0.1])
    cpu = common.kernel_rows(events[:1] + events[2:3], calls=1, cuda=False)  # without a GPU: the ops' CPU time
    assert cpu["busy_ms_per_step"] == pytest.approx(0.01) and len(cpu["top"]) == 2


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
    rows = evaluation["profile"]["top"]
    assert 0 < len(rows) <= common.PROFILE_TOP and all(r["ms_per_step"] > 0 for r in rows)
    assert "[eval] kernels per batch" in capsys.readouterr().out


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
                       "train_step_tiny_shared_a.json", "train_step_tiny_shared_b.json", "tiny_shared_combined.json",
                       "sample_speed_small.json"}
    combined = json.loads((tmp_path / "tiny_shared_combined.json").read_text())
    assert len(combined["jobs"]) == 2 and combined["combined_tokens_per_s"] > 0
    pads = [json.loads((tmp_path / f"train_step_small_pad{p}.json").read_text())["results"][0] for p in (1, 64)]
    assert pads[0]["loss_first_batch"] == pytest.approx(pads[1]["loss_first_batch"], rel=1e-5)  # same function


def test_shared_gpu_combines_overlapping_jobs_and_refuses_disjoint_ones(tmp_path):
    import shared_gpu

    def report(start, end, steps=10, tokens=1000):
        return {"tokens_per_step": tokens, "results": [{"variant": "compiled", "timed_window": [start, end],
                                                        "step_s": [0.1] * steps, "tokens_per_s": 5e3}]}

    both = shared_gpu.combine([report(0.0, 2.0), report(0.0, 2.5)], min_overlap=0.75)
    assert both["ok"] and both["combined_tokens_per_s"] == pytest.approx(20_000 / 2.5)  # all tokens, first to last
    assert [j["overlapped"] for j in both["jobs"]] == pytest.approx([1.0, 0.8])  # 2.0 s of the second's 2.5 s
    assert not shared_gpu.combine([report(0.0, 2.0), report(0.0, 2.5)], min_overlap=0.9)["ok"]
    apart = shared_gpu.combine([report(0.0, 1.0), report(1.5, 2.5)], min_overlap=0.9)
    assert not apart["ok"] and [j["overlapped"] for j in apart["jobs"]] == [0.0, 0.0]
    paths = []
    for name, r in (("a", report(0.0, 1.0)), ("b", report(0.05, 1.05))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "combined.json"
    assert shared_gpu.main([*map(str, paths), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["combined_tokens_per_s"] == pytest.approx(20_000 / 1.05)
    assert shared_gpu.main([str(paths[0]), str(tmp_path / "b.json"), "--min-overlap", "0.99"]) == 1
