"""`atat`: thin verbs over importable functions (STYLE principle 4): parse, build the config, call one function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mdlm_atat import __version__
from mdlm_atat.config import ConfigError, SampleOrder, SamplerName, apply_overrides, choices, from_dict, load_config

# torch (a second to import) loads with the verb that needs it, not for `atat --help`.

OVERRIDE_HELP = "config overrides, e.g. training.learning_rate=1e-4 model.size=tiny (section.key=value)"
COMPILE_HELP = (
    "torch.compile the denoiser's blocks first (a GPU's choice for long jobs: the first batches wait for the "
    "compilation, tens of seconds; on a CPU inductor needs a C++ compiler)"
)


def user_errors() -> tuple[type[Exception], ...]:
    """Errors a user can cause: one line naming the cause and the fix, no stack trace."""
    from mdlm_atat.data.sources import DataError
    from mdlm_atat.train.checkpoint import CheckpointError, RunDirError
    from mdlm_atat.train.faults import NonFiniteError

    return (ConfigError, DataError, CheckpointError, RunDirError, NonFiniteError)


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (exit 2), naming the verb and where its help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


INT64_MAX = 2**63 - 1


def count(minimum: int, maximum: int, meaning: str = ""):
    """An argparse type: an integer in [minimum, maximum]; anything else is one usage line, before any work."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not minimum <= value <= maximum:
            bound = f">= {minimum}" if maximum >= INT64_MAX else f"in [{minimum}, {maximum:,}]"
            raise argparse.ArgumentTypeError(f"must be {bound}{meaning}, got {text}")
        return value

    parse.__name__ = "count"  # argparse names the type in some messages
    return parse


# The numeric options of every verb and their valid ranges (tests/test_cli_fuzz.py throws bad values at each).
MAX_STEPS = count(1, INT64_MAX)
NUM_T = count(1, 4096)
EVAL_BATCH = count(1, 1 << 16)
MAX_BATCHES = count(0, INT64_MAX, " (0 = all)")
SEED = count(0, INT64_MAX)
SAMPLE_STEPS = count(1, 100_000)
NUM_SAMPLES = count(1, 1_000_000)
SAMPLE_BATCH = count(1, 1 << 16)
LENGTH = count(1, 10_000_000)
STRIDE = count(1, 10_000_000)


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (MDLM baseline or ATAT) from a YAML config",
        description="Train from a YAML config plus key=value overrides, or continue a run with --resume.",
    )
    p.add_argument("--config", type=Path, help="YAML run config, e.g. configs/atat/quickstart.yaml")
    p.add_argument(
        "--log-dir",
        type=Path,
        help="the run folder (config, metrics.jsonl, checkpoints/); default: logging.save_logs_dir/<config>-<time>",
    )
    p.add_argument(
        "--max-steps",
        type=MAX_STEPS,
        help="stop this invocation at this global step (the LR schedule still follows training.total_steps)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --log-dir exactly from its checkpoints/last.pt, with its saved config; with "
        "--config, a folder without a checkpoint starts a new run there (so one command can be relaunched)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)


def _add_eval(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="the NELBO perplexity bound of a checkpoint on a dataset (JSON)",
        description=(
            "Score a checkpoint with MDLM's uniform-masking NELBO (an upper bound on the NLL), several stratified "
            "t per sequence, a fixed seed, EMA weights. Prints JSON; never writes into the run's checkpoints."
        ),
    )
    p.add_argument(
        "--checkpoint", type=Path, required=True,
        help="a .pt checkpoint, a run folder (its last.pt) or a folder written by atat export",
    )
    p.add_argument(
        "--dataset",
        help="dataset to score: stdlib-docs, a local .jsonl/.txt file or folder, or a HF name "
        "(default: the checkpoint's training dataset)",
    )
    p.add_argument(
        "--datasets",
        help="several datasets in one call, comma-separated, each NAME or NAME:SPLIT (e.g. "
        "stdlib-docs:test,../shared/corpora/brown.jsonl); the JSON is then an object keyed by these entries",
    )
    p.add_argument("--split", help="split to score (default: the config's data.val_split)")
    p.add_argument("--output", type=Path, help="also write the JSON to this file")
    p.add_argument("--num-t", type=NUM_T, help="stratified times t per sequence (default: diffusion.eval_num_t)")
    p.add_argument("--batch-size", type=EVAL_BATCH, help="sequences per batch (default: data.batch_size)")
    p.add_argument("--max-batches", type=MAX_BATCHES, default=0, help="score at most this many batches (0 = all)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the masks and times (default 0)")
    p.add_argument("--no-ema", action="store_true", help="score the raw weights instead of the EMA")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (there is none when stderr is a file)")
    p.add_argument(
        "--no-cache", action="store_true",
        help="tokenize into a temporary folder, removed afterwards, instead of keeping a copy of the scored text in "
        "data.cache_dir (for private or held-out files; a HF dataset still goes through the datasets library's "
        "own cache)",
    )


def _add_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare",
        aliases=["download"],
        help="fetch datasets and tokenize them into memory-mapped token stores (reused when nothing changed)",
        description=(
            "Read each dataset (a HF name such as openwebtext, wikitext103, lm1b, text8, ptb, lambada; a local "
            ".jsonl/.txt/.parquet file or folder; stdlib-docs), tokenize it in parallel and write one memory-mapped "
            "token array per split plus a manifest, where `atat train` and `atat eval` look for them. The tokenizer, "
            "L and framing come from the config: data.tokenizer, data.max_length, data.framing."
        ),
    )
    p.add_argument(
        "--datasets",
        help="comma-separated dataset names or paths (default: the config's data.dataset_name)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        help="cache folder for the stores and tokenizers (default: data.cache_dir); train with the same "
        "data.cache_dir to use them",
    )
    p.add_argument("--config", type=Path, help="YAML run config whose data section to use (default: the defaults)")
    p.add_argument(
        "--splits",
        help="comma-separated splits to prepare (default: the config's train_split, val_split and test_split); "
        "a split the dataset does not have is skipped",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="config overrides, e.g. data.tokenizer=../shared/tokenizers/gpt2 data.max_length=128 data.framing=padded",
    )


def _add_sample(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate text from a checkpoint with a chosen sampler (prefix, infill, beyond the block)",
        description=(
            "Generate text from a checkpoint (EMA weights) with MDLM's ancestral sampler, its cached variant, "
            "confidence-ordered decoding, or semi-autoregressive blocks for lengths beyond the block; an AR "
            "checkpoint (model.name: ar) samples left to right. Categorical draws are in float64. Given text "
            "(--prefix, --infill) is never masked. Prints the samples (without --output) and a JSON summary with "
            "sample-quality numbers."
        ),
    )
    p.add_argument(
        "--checkpoint", type=Path, required=True,
        help="a .pt checkpoint, a run folder (its last.pt) or a folder written by atat export",
    )
    p.add_argument(
        "--sampler",
        choices=choices(SamplerName),
        help="ancestral (MDLM's reverse process), ancestral-cache (same samples, skips the network for unchanged "
        "sequences; needs no time conditioning), confidence (most confident positions first, the scheduled count "
        "per step), semi-ar (block after block, for --length beyond the block), ar (AR checkpoints); default: "
        "ancestral, or ar for an AR checkpoint",
    )
    p.add_argument(
        "--order",
        choices=choices(SampleOrder),
        default="confidence",
        help="with --sampler confidence: the most confident positions first (default), or easy-first, the "
        "positions ATAT's importance estimator (saved with the checkpoint) rates least important first",
    )
    p.add_argument("--steps", type=SAMPLE_STEPS, default=128,
                   help="denoising steps per block (default 128; unused by ar)")
    p.add_argument("--num-samples", type=NUM_SAMPLES, default=4, help="samples to generate (default 4)")
    p.add_argument("--batch-size", type=SAMPLE_BATCH, default=16, help="samples per batch (default 16)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of every draw (default 0); same seed, same samples")
    p.add_argument(
        "--length",
        type=LENGTH,
        help="content tokens per sample, framing excluded (default: one block, L - 2 when packed); beyond the "
        "block with --sampler semi-ar",
    )
    p.add_argument("--stride", type=STRIDE, help="semi-ar: new tokens per block (default: half a block)")
    p.add_argument("--prefix", help="text the samples continue (kept exactly)")
    p.add_argument(
        "--infill",
        metavar="TEMPLATE",
        help="text with gaps to fill: [MASK] is one token, [MASK:N] is N tokens, e.g. "
        "'The[MASK:8] said on Friday that[MASK:16].'; the text around the gaps is kept exactly (with a GPT-2-style "
        "BPE, leave the space before a gap to the gap: its first token usually carries it)",
    )
    p.add_argument("--output", type=Path, help="write the samples to FILE.txt or FILE.jsonl (with token ids)")
    p.add_argument("--trace", type=Path, help="write the denoising trajectory of the first samples as an HTML page")
    p.add_argument(
        "--reference",
        help="generative perplexity under this causal LM: an AR checkpoint trained here (model.name: ar) or a HF "
        "causal LM name or folder (needs transformers)",
    )
    p.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of the EMA")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="atat",
        description="Train, evaluate and sample masked diffusion language models (MDLM) with adaptive "
        "time-aware token masking (ATAT).",
    )
    parser.add_argument("--version", action="version", version=f"mdlm-atat {__version__}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=Parser)
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_prepare(subparsers)
    _add_sample(subparsers)
    _add_report(subparsers)
    _add_export(subparsers)
    _add_import(subparsers)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from mdlm_atat.run import read_resume_checkpoint
    from mdlm_atat.train.checkpoint import CheckpointError, has_checkpoint
    from mdlm_atat.train.distributed import is_main_process, rank0_value
    from mdlm_atat.train.trainer import train

    run_dir = args.log_dir
    if args.resume and run_dir is None:
        raise ConfigError("--resume: name the run folder with --log-dir RUN_DIR")
    resumable = run_dir is not None and has_checkpoint(run_dir)  # last.pt, last.prev.pt or best.pt
    if args.resume and (resumable or args.config is None):
        # Continue with the run's saved config (plus any overrides): the same command relaunched after a
        # pre-emption picks up where the run stopped.
        if not resumable:
            raise CheckpointError(f"{run_dir}: no checkpoints/last.pt to resume from; pass --config to start it")
        # Read once: the trainer continues from this checkpoint (falls back to last.prev.pt when last.pt is unreadable).
        checkpoint = read_resume_checkpoint(run_dir)
        if args.config is not None:
            print(f"note: continuing {run_dir} with its saved config; --config {args.config} is not read", file=sys.stderr)
        cfg = from_dict(apply_overrides(checkpoint[0].config, args.overrides))
        summary = train(cfg, run_dir, resume=True, max_steps=args.max_steps, checkpoint=checkpoint)
    else:
        if args.config is None:
            raise ConfigError("--config: required to start a run, e.g. atat train --config configs/atat/quickstart.yaml")
        cfg = load_config(args.config, args.overrides)
        # Under torchrun every process must name the same folder: rank 0's clock decides.
        run_dir = run_dir or rank0_value(
            Path(cfg.logging.save_logs_dir) / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}", cfg.training.device
        )
        # --resume on a folder without a checkpoint: the same command relaunched may start over a run that never
        # saved one; without --resume, a folder holding a run is refused.
        summary = train(cfg, run_dir, resume=False, max_steps=args.max_steps, restart=args.resume)
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    val = summary["val"]
    lines = [f"done: step {summary['step']}, run folder {summary['run_dir']}"]
    if summary["first_loss"] is None and val is None and not summary.get("stopped"):
        # Nothing to do (a finished run relaunched): its figures as metrics.jsonl recorded them.
        limit = ("training.total_steps", cfg.training.total_steps)
        if summary["step"] < cfg.training.total_steps:
            limit = ("--max-steps", args.max_steps)
        lines[0] += f" (already at {limit[0]} ({limit[1]}): nothing to train; as recorded in metrics.jsonl:)"
        summary, val = _recorded_figures(Path(summary["run_dir"]), summary)
    if summary.get("stopped"):  # SIGTERM / SIGINT: the step finished and last.pt was written (train/faults.py)
        lines = [
            f"stopped by {summary['stopped']} at step {summary['step']}; checkpoint written: "
            f"{Path(summary['run_dir']) / 'checkpoints' / 'last.pt'}; continue with: "
            f"atat train --log-dir {summary['run_dir']} --resume"
        ]
    if summary["first_loss"] is not None:
        lines.append(f"train loss {summary['first_loss']:.4f} (first log) -> {summary['last_loss']:.4f} (last log)")
    if val is not None:
        # The AR baseline's validation number is its exact NLL, not a bound.
        name, relation = ("NLL", "=") if cfg.model.is_ar else ("NELBO", "<=")
        at = f"step {val['step']}, " if "step" in val else ""
        lines.append(
            f"validation {name} {val['nelbo']:.4f} +- {val['stderr']:.4f} nats/token, PPL {relation} {val['ppl']:.2f} "
            f"({at}{val['num_tokens']} tokens, EMA weights)"
        )
    print("\n".join(lines))
    return 0


def _recorded_figures(run_dir: Path, summary: dict) -> tuple[dict, dict | None]:
    """(summary with the first and last logged losses, the last validation) from the run's metrics.jsonl."""
    from mdlm_atat.viz.report import ReportError, read_metrics

    try:
        records = read_metrics(run_dir)
    except ReportError:
        return summary, None
    losses = records.series("train", "loss")[1]
    if losses:
        summary = {**summary, "first_loss": losses[0], "last_loss": losses[-1]}
    vals = records.get("val")
    if not vals:
        return summary, None
    last = vals[-1]
    return summary, {"nelbo": last["val_nelbo"], "stderr": last["val_stderr"], "ppl": last["val_ppl"],
                     "num_tokens": last["val_tokens"], "step": last["step"]}


def run_eval(args: argparse.Namespace) -> int:
    from mdlm_atat.eval.run import evaluate_checkpoint, evaluate_datasets

    options = dict(split=args.split, num_t=args.num_t, batch_size=args.batch_size, max_batches=args.max_batches,
                   seed=args.seed, use_ema=not args.no_ema, device=args.device, progress=not args.no_progress,
                   cache=not args.no_cache, compile=args.compile)
    if args.datasets is not None:
        if args.dataset is not None:
            raise ConfigError("--dataset and --datasets: give one (--datasets takes a comma-separated list)")
        names = [d.strip() for d in args.datasets.split(",") if d.strip()]
        result = evaluate_datasets(args.checkpoint, names, **options)
    else:
        result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, **options)
    text = json.dumps(result, indent=2)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from mdlm_atat.data.prepare import prepare_datasets

    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"data.cache_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] if args.splits else None
    prepare_datasets(cfg.data, datasets, splits, progress=not args.no_progress)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from mdlm_atat.sample import sample_checkpoint

    summary = sample_checkpoint(
        args.checkpoint,
        sampler=args.sampler,
        num_steps=args.steps,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        length=args.length,
        stride=args.stride,
        prefix=args.prefix,
        infill=args.infill,
        output=args.output,
        trace=args.trace,
        reference=args.reference,
        use_ema=not args.no_ema,
        device=args.device,
        progress=not args.no_progress,
        order=args.order,
        compile=args.compile,
    )
    texts = summary.pop("samples")
    if args.output is None:
        print("".join(f"=== sample {i} ===\n{text}\n\n" for i, text in enumerate(texts)), end="")
    print(json.dumps(summary, indent=2))
    return 0


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="plots of a run (loss, LR, curriculum, masking, importance, estimator) and an HTML page",
        description=(
            "Read a run folder's metrics.jsonl and config.yaml (and any atat eval JSON there) and write PNG plots: "
            "training and validation loss / PPL vs tokens, LR, gradient norm and throughput, curriculum stage and "
            "beta, masking rate vs t per stage and token frequency, importance distribution per stage, NELBO by "
            "token-frequency bin, the estimator's correlation over time; plus index.html showing them with the "
            "config and final numbers. Needs matplotlib; works without a display."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder (--log-dir of atat train)")
    p.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/report)")


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="a checkpoint as a HuggingFace-style folder (safetensors, config.json, tokenizer, model card)",
        description=(
            "Write model.safetensors (EMA denoiser weights), estimator.safetensors (ATAT's estimator, if any), "
            "config.json, tokenizer.json + tokenizer_config.json + special_tokens_map.json and a README.md model "
            "card with the evaluation numbers found (the run's validation bound at the checkpoint's step, atat "
            "eval JSON files in the run folder, --eval files). atat eval and atat sample take the folder as "
            "--checkpoint."
        ),
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pt checkpoint or a run folder (its last.pt)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (new, or empty; see --force)")
    p.add_argument("--eval", type=Path, action="append", default=[], metavar="FILE",
                   help="an atat eval JSON file whose numbers go into the model card (repeatable)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _add_import(subparsers) -> None:
    p = subparsers.add_parser(
        "import",
        help="MDLM's released checkpoints (hub folder or Lightning .ckpt) as an export folder",
        description=(
            "Convert a checkpoint of MDLM (kuleshov-group/mdlm): its hub folder (config.json with model_type mdlm "
            "and model.safetensors, e.g. kuleshov-group/mdlm-owt) or a Lightning .ckpt of its training (the EMA "
            "weights by default), into the folder atat export writes: atat eval and atat sample take it as "
            "--checkpoint, and transformers loads it. The weights are not changed, only renamed."
        ),
    )
    p.add_argument(
        "--mdlm", type=Path, required=True, metavar="PATH",
        help="MDLM's hub folder (e.g. from hf download kuleshov-group/mdlm-owt --local-dir mdlm-owt) "
        "or a .ckpt file",
    )
    p.add_argument("--out", type=Path, required=True, help="the folder to write (new, or empty; see --force)")
    p.add_argument(
        "--tokenizer",
        help="the tokenizer the model was trained with: gpt2 for OpenWebText (a HF name, or a local folder such as "
        "../shared/tokenizers/gpt2); MASK is appended after it, as MDLM does",
    )
    p.add_argument(
        "--dataset", default="openwebtext",
        help="the dataset atat eval scores by default (default openwebtext, MDLM's training set)",
    )
    p.add_argument("--no-ema", action="store_true", help="a .ckpt's raw weights instead of its EMA")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run_import(args: argparse.Namespace) -> int:
    from mdlm_atat.mdlm_import import import_mdlm

    result = import_mdlm(args.mdlm, args.out, tokenizer=args.tokenizer, dataset=args.dataset,
                         use_ema=not args.no_ema, overwrite=args.force)
    print(json.dumps(result, indent=2))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from mdlm_atat.viz.report import write_report

    result = write_report(args.run_dir, args.out)
    print(f"report: {result['page']} ({len(result['figures'])} figures)")
    if result["missing"]:
        print(f"not in this run's records: {', '.join(result['missing'])}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from mdlm_atat.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, use_ema=not args.no_ema, eval_files=args.eval,
                               overwrite=args.force)
    print(json.dumps(result, indent=2))
    return 0


VERBS = {"train": run_train, "eval": run_eval, "prepare": run_prepare, "download": run_prepare, "sample": run_sample,
         "report": run_report, "export": run_export, "import": run_import}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may come before or after the flags.
    stray = [item for item in unknown if "=" not in item or item.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        if args.verb not in ("train", "prepare", "download"):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    try:
        return VERBS[args.verb](args)
    except user_errors() as err:
        print(f"atat {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"atat {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
