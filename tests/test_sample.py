"""`atat sample` and `atat eval --datasets` on a tiny trained checkpoint; sample-quality measures."""

from __future__ import annotations

import json
import math

import pytest

from mdlm_atat.cli import main
from mdlm_atat.config import ConfigError, load_config
from mdlm_atat.eval.generation import (
    HFReference,
    generative_perplexity,
    repeated_ngram_fraction,
    unigram_entropy,
)
from mdlm_atat.eval.run import evaluate_datasets, load_for_inference, split_dataset_entry
from mdlm_atat.sample import build_canvas, parse_template, sample_checkpoint
from mdlm_atat.train.trainer import train

from conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    """A tiny MDLM (L = 32: 30 content tokens per block) trained for 6 steps."""
    run = tmp_path_factory.mktemp("sample") / "run"
    train(load_config(None, [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", "model.dropout=0.0"]), run)
    return run


def sample(run_dir, capsys, *args) -> tuple[int, dict, str]:
    code = main(["sample", "--checkpoint", str(run_dir), "--device", "cpu", "--no-progress", "--steps", "8", *args])
    captured = capsys.readouterr()
    if code != 0:
        return code, {}, captured.err
    out = captured.out
    start = out.rindex("\n{\n") + 1 if "\n{\n" in out else 0
    return code, json.loads(out[start:]), out[:start]


@pytest.mark.parametrize("sampler", ["ancestral", "ancestral-cache", "confidence", "semi-ar"])
def test_every_sampler_writes_text_without_mask(run_dir, tmp_path, capsys, sampler):
    output = tmp_path / "samples.txt"
    length = ["--length", "70"] if sampler == "semi-ar" else []
    code, summary, _ = sample(run_dir, capsys, "--sampler", sampler, "--num-samples", "3", "--batch-size", "2",
                              "--output", str(output), *length)
    assert code == 0
    text = output.read_text()
    assert text.count("=== sample ") == 3 and "[MASK]" not in text
    assert summary["sampler"] == sampler and summary["num_samples"] == 3
    assert summary["length"] == (70 if sampler == "semi-ar" else 30)
    assert summary["num_network_calls"] > 0 and summary["categorical"].endswith("float64")
    quality = summary["quality"]
    assert 0 < quality["unigram_entropy"] <= math.log(70)
    assert set(quality["repeated_ngram_fraction"]) == {"1", "2", "4"}


def test_easy_first_order_uses_the_checkpoint_estimator(run_dir, capsys):
    code, summary, text = sample(run_dir, capsys, "--sampler", "confidence", "--order", "easy-first",
                                 "--num-samples", "2")
    assert code == 0 and summary["order"] == "easy-first" and "[MASK]" not in text
    code, _, err = sample(run_dir, capsys, "--order", "easy-first")  # the default sampler is ancestral
    assert code == 2 and "--order easy-first" in err and "--sampler confidence" in err


def test_easy_first_needs_an_atat_checkpoint(tmp_path, data_cache, capsys):
    mdlm = tmp_path / "mdlm"
    overrides = [*TINY_OVERRIDES, f"data.cache_dir={data_cache}", "atat.enabled=false", "training.total_steps=2"]
    train(load_config(None, overrides), mdlm)
    code, _, err = sample(mdlm, capsys, "--sampler", "confidence", "--order", "easy-first")
    assert code == 2 and "no importance estimator" in err and "atat.enabled=false" in err


def test_prefix_is_kept_exactly(run_dir, tmp_path, capsys):
    output = tmp_path / "samples.jsonl"
    prefix = "The function returns"
    code, summary, _ = sample(run_dir, capsys, "--prefix", prefix, "--num-samples", "2", "--output", str(output))
    assert code == 0
    tokenizer = load_for_inference(run_dir).tokenizer
    given = tokenizer.encode(prefix)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    for row in rows:
        assert row["token_ids"][: len(given)] == given
        assert row["text"].startswith(prefix)
    assert summary["num_given_tokens"] == len(given)


def test_infill_spans_are_kept_exactly(run_dir, tmp_path, capsys):
    output = tmp_path / "infill.jsonl"
    template = "Return the [MASK:5] of the list[MASK] and raise [MASK:4] if it is empty."
    code, summary, _ = sample(run_dir, capsys, "--infill", template, "--sampler", "confidence", "--num-samples", "2",
                              "--output", str(output), "--trace", str(tmp_path / "trace.html"))
    assert code == 0
    tokenizer = load_for_inference(run_dir).tokenizer
    layout = parse_template(tokenizer, template)
    assert layout.count(tokenizer.mask_id) == 10
    for row in (json.loads(line) for line in output.read_text().splitlines()):
        ids = row["token_ids"]
        assert len(ids) == len(layout)
        assert all(a == b for a, b in zip(ids, layout) if b != tokenizer.mask_id)  # given spans, id for id
        assert tokenizer.mask_id not in ids
        text = row["text"]
        pieces = ["Return the", " of the list", " and raise", " if it is empty."]
        positions = [text.find(p) for p in pieces]
        assert -1 not in positions and positions == sorted(positions)
    page = (tmp_path / "trace.html").read_text()
    assert page.startswith("<!doctype html>") and "const DATA" in page and "<script src" not in page
    assert summary["trace"].endswith("trace.html")


def test_canvas_layout_and_errors():
    class Tok:
        mask_id = 99

        def encode(self, text):
            return [ord(c) for c in text]

    assert build_canvas(Tok(), 6, prefix="ab") == [97, 98, 99, 99, 99, 99]
    assert build_canvas(Tok(), 6, length=3) == [99, 99, 99]
    assert build_canvas(Tok(), 6, infill="a[MASK:2]b[MASK]") == [97, 99, 99, 98, 99]
    assert build_canvas(Tok(), 6, infill="a[MASK]", length=4) == [97, 99, 99, 99]
    with pytest.raises(ConfigError, match="^--prefix and --infill"):
        build_canvas(Tok(), 6, prefix="a", infill="[MASK]")
    with pytest.raises(ConfigError, match="^--prefix"):
        build_canvas(Tok(), 3, prefix="abc")
    with pytest.raises(ConfigError, match="^--infill: the template has no"):
        build_canvas(Tok(), 6, infill="abc")


def test_same_seed_same_samples(run_dir):
    kwargs = dict(sampler="ancestral", num_steps=6, num_samples=2, seed=3, device="cpu", progress=False)
    a = sample_checkpoint(run_dir, **kwargs)
    b = sample_checkpoint(run_dir, **kwargs)
    c = sample_checkpoint(run_dir, **{**kwargs, "seed": 4})
    assert a["samples"] == b["samples"] and a["samples"] != c["samples"]


@pytest.mark.parametrize("sampler", ["ancestral", "confidence"])
def test_a_sample_does_not_depend_on_the_others_in_its_batch(run_dir, sampler):
    """Sample i comes from (seed, i) alone: --num-samples 2 gives the first two of --num-samples 4, at any batch
    size (it used to differ: the effective batch was min(num-samples, batch-size))."""
    kwargs = dict(sampler=sampler, num_steps=6, seed=3, device="cpu", progress=False)
    two = sample_checkpoint(run_dir, num_samples=2, batch_size=16, **kwargs)["samples"]
    four = sample_checkpoint(run_dir, num_samples=4, batch_size=16, **kwargs)["samples"]
    one_by_one = sample_checkpoint(run_dir, num_samples=3, batch_size=1, **kwargs)["samples"]
    assert two == four[:2] == one_by_one[:2] and four[2] == one_by_one[2]
    assert len(set(four)) == 4  # each sample its own stream


def test_infill_typos_are_errors_not_text():
    class Tok:
        mask_id = 99

        def encode(self, text):
            return [ord(c) for c in text]

    for typo in ("[MASK: 3]", "[mask:2]", "[MASK:abc]", "[Mask]", "[MASK:4"):
        with pytest.raises(ConfigError, match=r"^--infill: .* is not a gap; write \[MASK\]"):
            parse_template(Tok(), f"a {typo} b")
    assert parse_template(Tok(), "[masked] [MASK]") == [ord(c) for c in "[masked] "] + [99]


def test_ancestral_cache_matches_ancestral_from_the_cli(run_dir):
    kwargs = dict(num_steps=64, num_samples=2, seed=0, device="cpu", progress=False)
    plain = sample_checkpoint(run_dir, sampler="ancestral", **kwargs)
    cached = sample_checkpoint(run_dir, sampler="ancestral-cache", **kwargs)
    assert plain["samples"] == cached["samples"]
    assert cached["num_sequence_evals"] < plain["num_sequence_evals"]


def test_user_errors_are_one_line(run_dir, tmp_path, capsys):
    cases = [
        (["--length", "100"], "use --sampler semi-ar"),
        (["--output", str(tmp_path / "x.csv")], ".txt"),
        (["--sampler", "ar"], "diffusion"),
        (["--reference", "no-such-model-anywhere"], "--reference"),
    ]
    for args, message in cases:
        code, _, err = sample(run_dir, capsys, *args)
        assert code == 2 and message in err and err.count("\n") <= 2, (args, err)


def test_eval_datasets_writes_one_result_per_dataset(run_dir, tmp_path, capsys):
    corpus = tmp_path / "local.jsonl"
    docs = [{"id": str(i), "split": "validation", "text": f"def f{i}(x):\n    return x + {i} " * 20} for i in range(20)]
    corpus.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    output = tmp_path / "eval.json"
    entries = f"stdlib-docs,stdlib-docs:test,{corpus}"
    assert main(["eval", "--checkpoint", str(run_dir), "--datasets", entries, "--max-batches", "1",
                 "--device", "cpu", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert list(result) == entries.split(",")
    assert result["stdlib-docs"]["split"] == "validation" and result["stdlib-docs:test"]["split"] == "test"
    assert result[str(corpus)]["dataset"] == str(corpus)
    for r in result.values():
        for key in ("nelbo", "stderr", "ppl", "num_tokens", "step", "config_hash", "framing", "num_t", "seed"):
            assert key in r
    assert result["stdlib-docs"]["nelbo"] != result["stdlib-docs:test"]["nelbo"]
    again = evaluate_datasets(run_dir, entries.split(","), max_batches=1, device="cpu")
    assert again == result  # deterministic for a fixed seed
    assert main(["eval", "--checkpoint", str(run_dir), "--dataset", "a", "--datasets", "b"]) == 2
    assert "give one" in capsys.readouterr().err


def test_a_bad_split_names_the_flag_that_fixes_it(run_dir, data_cache, capsys):
    """B10: the fix suggested was a config key (data.val_split) that atat eval does not take."""
    for args in (["--split", "foo"], ["--datasets", "stdlib-docs:foo"]):
        assert main(["eval", "--checkpoint", str(run_dir), "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err
        assert "split 'foo'" in err and "pass --split" in err and "data." not in err and err.count("\n") == 1, err
    tokenizer = [o for o in TINY_OVERRIDES if o.startswith(("data.tokenizer", "data.max_length"))]
    assert main(["prepare", "--datasets", "stdlib-docs", "--splits", "foo", "--no-progress", "--output-dir",
                 str(data_cache), *tokenizer]) == 2
    err = capsys.readouterr().err
    assert "no split could be prepared" in err and "pass --splits" in err and "data.train_split" not in err


def test_eval_counts_never_fall_back_silently(run_dir):
    """B3: --num-t 0 meant 4 and --batch-size 0 meant 32; negative values were tracebacks."""
    for kwargs, flag in ((dict(num_t=0), "--num-t"), (dict(batch_size=-4), "--batch-size"),
                         (dict(max_batches=-1), "--max-batches")):
        with pytest.raises(ConfigError, match=f"^{flag}: must be >= "):
            evaluate_datasets(run_dir, ["stdlib-docs"], device="cpu", **kwargs)


def test_eval_no_cache_leaves_no_copy_of_the_data(run_dir, data_cache, tmp_path, capsys):
    """--no-cache: a private file is scored from a temporary store; the cache holds no copy of it afterwards."""
    corpus = tmp_path / "private.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"secret number {i} " * 30, "split": "validation"})
                                 for i in range(12)) + "\n")
    before = sorted(p.name for p in (data_cache / "stores").iterdir())
    argv = ["eval", "--checkpoint", str(run_dir), "--dataset", str(corpus), "--device", "cpu", "--max-batches", "1"]
    assert main([*argv, "--no-cache"]) == 0
    uncached = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (data_cache / "stores").iterdir()) == before
    assert main(argv) == 0  # the default keeps the tokenized copy (and scores the same)
    assert json.loads(capsys.readouterr().out)["nelbo"] == uncached["nelbo"]
    assert len(list((data_cache / "stores").iterdir())) == len(before) + 1


def test_eval_shows_progress_per_dataset_and_batch(run_dir, capsys, monkeypatch):
    """A six-dataset evaluation sat silent for minutes: on a terminal, a bar per dataset, batch by batch."""
    monkeypatch.setattr("mdlm_atat.progress.interactive", lambda stream: True)
    assert main(["eval", "--checkpoint", str(run_dir), "--datasets", "stdlib-docs,stdlib-docs:test",
                 "--max-batches", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "eval [1/2] stdlib-docs:validation" in err and "eval [2/2] stdlib-docs:test" in err and "3/3" in err
    assert main(["eval", "--checkpoint", str(run_dir), "--max-batches", "1", "--device", "cpu", "--no-progress"]) == 0
    assert "eval " not in capsys.readouterr().err


def test_eos_in_samples_is_explained(run_dir, capsys):
    tokenizer = load_for_inference(run_dir).tokenizer
    eos = tokenizer.decode([tokenizer.eos_id])
    code, summary, _ = sample(run_dir, capsys, "--infill", f"one{eos}[MASK:4]", "--num-samples", "1")
    assert code == 0 and any(note.startswith(f"{eos} inside a sample is EOS") for note in summary["notes"])


def test_dataset_entries():
    assert split_dataset_entry("stdlib-docs") == ("stdlib-docs", None)
    assert split_dataset_entry("stdlib-docs:test") == ("stdlib-docs", "test")
    assert split_dataset_entry("/data/a.jsonl:validation") == ("/data/a.jsonl", "validation")


def test_entropy_and_repetition():
    assert unigram_entropy([[1, 2, 3, 4]]) == pytest.approx(math.log(4))
    assert unigram_entropy([[7, 7, 7], [1, 2]]) == pytest.approx(math.log(2) / 2)
    assert repeated_ngram_fraction([[1, 2, 3, 4]], 2) == 0.0
    assert repeated_ngram_fraction([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(1 - 2 / 5)
    assert repeated_ngram_fraction([[5, 5, 5, 5]], 1) == pytest.approx(0.75)


def test_generative_perplexity_is_exp_of_mean_nll():
    class Fixed:
        name = "fixed"

        def score(self, texts):
            return 2.0 * 10, 10

    result = generative_perplexity(Fixed(), ["a", "b"])
    assert result["gen_ppl"] == pytest.approx(math.exp(2.0)) and result["gen_tokens"] == 10


def test_hf_reference_without_transformers_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed (the test extra installs it)
    with pytest.raises(ConfigError, match="transformers"):
        HFReference("gpt2")


def test_sample_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--sampler", "--steps", "--num-samples", "--batch-size", "--seed", "--length",
                 "--stride", "--prefix", "--infill", "--output", "--trace", "--reference", "--no-ema", "--device",
                 "ancestral-cache", "confidence", "semi-ar"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--datasets" in capsys.readouterr().out
