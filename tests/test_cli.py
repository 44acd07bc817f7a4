"""The `atat` command: help, train, eval, and one-line errors."""

import json
import subprocess
import sys

import pytest
import torch

from mdlm_atat.cli import main

from conftest import TINY_OVERRIDES


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_describes_every_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = {"--help": ["train", "eval"], "train": ["--config", "--log-dir", "--max-steps", "--resume", "key=value"],
             "eval": ["--checkpoint", "--dataset", "--split", "--output", "--num-t", "--seed", "--no-ema"]}
    for flag in flags[argv[0]]:
        assert flag in out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mdlm_atat", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout and "eval" in out.stdout


def test_train_then_eval_writes_json(tmp_path, data_cache, capsys, monkeypatch):
    run = tmp_path / "run"
    overrides = TINY_OVERRIDES + [f"data.cache_dir={data_cache}"]
    assert main(["train", "--log-dir", str(run), "--max-steps", "3", *overrides]) == 2  # no --config
    assert "--config: required" in capsys.readouterr().err
    config = tmp_path / "tiny.yaml"
    config.write_text("training:\n  total_steps: 6\n")
    assert main(["train", "--config", str(config), "--log-dir", str(run), "--max-steps", "3", *overrides]) == 0
    assert "done: step 3" in capsys.readouterr().out
    assert main(["train", "--log-dir", str(run), "--resume"]) == 0  # continues to total_steps with the saved config
    assert "done: step 6" in capsys.readouterr().out
    output = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--output", str(output),
                 "--max-batches", "2", "--device", "cpu"])
    assert code == 0
    result = json.loads(output.read_text())
    for key in ("nelbo", "ppl", "bits_per_token", "num_tokens", "step", "stderr", "config_hash", "framing"):
        assert key in result
    assert result["step"] == 6 and result["num_tokens"] == 2 * 8 * 32

    # --compile hands the DiT's trunk to torch.compile (an identity stand-in here: inductor on CPU is slow to build)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn.__name__, kw)) or fn)
    again = tmp_path / "eval_compiled.json"
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "best.pt"), "--output", str(again),
                 "--max-batches", "2", "--device", "cpu", "--compile"]) == 0
    assert compiled == [("trunk", {"dynamic": True})] and json.loads(again.read_text())["nelbo"] == result["nelbo"]
    assert main(["sample", "--checkpoint", str(run), "--num-samples", "1", "--steps", "2", "--device", "cpu",
                 "--compile"]) == 0
    assert len(compiled) == 2


def test_bad_key_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("training:\n  learning_rat: 1e-3\n")
    assert main(["train", "--config", str(config), "--log-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atat train: error: training.learning_rat: unknown key") and "\n" not in err
    assert not (tmp_path / "r").exists()  # nothing is created for a run that cannot start


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_stray_argument_is_rejected(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", "x.yaml", "--bogus"])
    assert exit_.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_resume_flag_starts_or_continues(tmp_path, data_cache, capsys):
    """The same command, relaunched, continues the run: --resume with --config starts a run if none exists."""
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  dropout: 0.0\n")
    argv = ["train", "--config", str(config), "--log-dir", str(run), "--resume",
            *TINY_OVERRIDES, f"data.cache_dir={data_cache}", "training.total_steps=4"]
    assert main(argv + ["--max-steps", "2"]) == 0
    assert "done: step 2" in capsys.readouterr().out
    assert main(argv) == 0
    assert "done: step 4" in capsys.readouterr().out
    assert main(["train", "--log-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err


def test_help_does_not_import_torch():
    """`atat --help` took 1.4 s, 1.0 s of it importing torch: the verbs import it, the parser does not."""
    code = "import sys, mdlm_atat.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_repository_paths_are_relative():
    """Tests and benchmarks find ../shared beside the checkout, not one machine's absolute path; `data/` (the
    README's prepare example) is not committed by accident."""
    from conftest import REPO

    for path in [*REPO.glob("tests/*.py"), *REPO.glob("benchmarks/*.py"), *REPO.glob("benchmarks/results/*.json")]:
        assert "".join(['"', "/work", "/"]) not in path.read_text(), path  # one machine's checkout
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/stores/x.bin"], cwd=REPO)
    assert ignored.returncode in (0, 128)  # 128: not a git checkout (an sdist), nothing to commit by accident
