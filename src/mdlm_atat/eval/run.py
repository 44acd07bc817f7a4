"""`atat eval`: load a checkpoint, prepare the dataset with the checkpoint's own tokenizer, score the bound."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from mdlm_atat.config import ConfigError
from mdlm_atat.data.loader import eval_batches
from mdlm_atat.data.sources import DataError, with_split_fix
from mdlm_atat.data.store import prepare_split
from mdlm_atat.diffusion.schedule import SCHEDULES
from mdlm_atat.eval.likelihood import evaluate_bound
from mdlm_atat.progress import progress_bar
from mdlm_atat.runtime import autocast_for, precision_name, resolve_device
from mdlm_atat.run import LoadedModel, load_for_inference, make_objective, resolve_checkpoint



# How the eval JSON names the masking schedule (config.ScheduleName).
def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset: str | None = None,
    split: str | None = None,
    num_t: int | None = None,
    batch_size: int | None = None,
    max_batches: int = 0,
    seed: int = 0,
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    cache: bool = True,
    compile: bool = False,
) -> dict[str, Any]:
    """The NELBO bound (DESIGN 3.5) of a checkpoint on one dataset split, as a JSON-ready dict; `compile`:
    torch.compile the denoiser's blocks first."""
    _check_counts(num_t, batch_size, max_batches)
    path = resolve_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    loaded = load_for_inference(path, use_ema=use_ema, device=torch_device, compile=compile)
    return _evaluate_loaded(loaded, path, torch_device, dataset, split, num_t, batch_size, max_batches, seed,
                            progress, cache=cache)


def split_dataset_entry(entry: str) -> tuple[str, str | None]:
    """`NAME` or `NAME:SPLIT` (e.g. stdlib-docs:test); a path that exists is taken whole, colon or not."""
    if ":" in entry and not Path(entry).expanduser().exists():
        name, split = entry.rsplit(":", 1)
        return name, split or None
    return entry, None


def evaluate_datasets(
    checkpoint: str | Path,
    datasets: list[str],
    split: str | None = None,
    num_t: int | None = None,
    batch_size: int | None = None,
    max_batches: int = 0,
    seed: int = 0,
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
    cache: bool = True,
    compile: bool = False,
) -> dict[str, dict[str, Any]]:
    """`evaluate_checkpoint` on several datasets with one load of the model: {entry: result}, in the given order.

    An entry is `NAME` (scored on `split`, default the config's data.val_split) or `NAME:SPLIT`."""
    if not datasets:
        raise ConfigError("--datasets: name at least one dataset, e.g. --datasets stdlib-docs,../shared/corpora/brown.jsonl")
    if len(set(datasets)) != len(datasets):
        raise ConfigError(f"--datasets: {','.join(datasets)} names a dataset twice")
    _check_counts(num_t, batch_size, max_batches)
    path = resolve_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    loaded = load_for_inference(path, use_ema=use_ema, device=torch_device, compile=compile)
    results = {}
    for i, entry in enumerate(datasets):
        name, entry_split = split_dataset_entry(entry)
        results[entry] = _evaluate_loaded(
            loaded, path, torch_device, name, entry_split or split, num_t, batch_size, max_batches, seed, progress,
            position=f" [{i + 1}/{len(datasets)}]", cache=cache,
        )
    return results


def _check_counts(num_t: int | None, batch_size: int | None, max_batches: int) -> None:
    """None takes the config's value; 0 or less is an error (it never silently means the default)."""
    for flag, value in (("--num-t", num_t), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: must be >= 1, got {value}")
    if max_batches < 0:
        raise ConfigError(f"--max-batches: must be >= 0 (0 = all), got {max_batches}")


def _evaluate_loaded(
    loaded: LoadedModel,
    path: Path,
    torch_device: torch.device,
    dataset: str | None,
    split: str | None,
    num_t: int | None,
    batch_size: int | None,
    max_batches: int,
    seed: int,
    progress: bool = True,
    position: str = "",
    cache: bool = True,
) -> dict[str, Any]:
    cfg, tokenizer = loaded.cfg, loaded.tokenizer
    data_cfg = cfg.data if dataset is None else dataclasses.replace(cfg.data, dataset_name=dataset)
    split = split or data_cfg.val_split
    batch_size = data_cfg.batch_size if batch_size is None else batch_size
    num_t = cfg.diffusion.eval_num_t if num_t is None else num_t
    with contextlib.ExitStack() as stack:
        if not cache:  # --no-cache: the tokenized copy lives in a temporary folder, removed once scored
            temporary = stack.enter_context(tempfile.TemporaryDirectory(prefix="atat-eval-"))
            data_cfg = dataclasses.replace(data_cfg, cache_dir=temporary)
        try:
            store = prepare_split(data_cfg, tokenizer, split, progress=progress)
        except DataError as err:  # atat eval takes the split as --split (or NAME:SPLIT), not as a config key
            raise with_split_fix(err, "pass --split (or NAME:SPLIT in --datasets) with one of them") from None
        num_batches = min(-(-len(store.blocks) // batch_size), max_batches or math.inf)
        result = evaluate_bound(
            loaded.model,
            make_objective(cfg, tokenizer),
            progress_bar(  # on a terminal: one bar per dataset, batch by batch
                eval_batches(store.blocks, batch_size, max_batches=max_batches), total=num_batches, unit="batch",
                desc=f"eval{position} {data_cfg.dataset_name}:{split}", disable=not progress, dynamic_ncols=True,
                mininterval=1.0,
            ),
            num_t=num_t,
            seed=seed,
            device=torch_device,
            autocast=autocast_for(torch_device, cfg.training.mixed_precision),
            pad_id=tokenizer.pad_id if data_cfg.padded else None,
        )
    L = data_cfg.max_length
    return {
        **result.to_dict(),
        "step": loaded.step,
        "tokens_seen": loaded.tokens_seen,  # training tokens behind these weights (not in an older export)
        "config_hash": loaded.config_hash,
        "weights": loaded.weights,
        "checkpoint": str(path),
        "dataset": data_cfg.dataset_name,
        "split": split,
        "tokenizer": tokenizer.name,
        "framing": (
            f"packed: documents + EOS concatenated, cut into {L - 2}-token blocks framed [BOS] ... [EOS] (L = {L})"
            if not data_cfg.padded
            else f"{data_cfg.framing}: one document per row, [BOS] document [EOS] then PAD to L = {L}"
        ),
        "precision": precision_name(torch_device, cfg.training.mixed_precision),
        "objective": (
            "exact NLL: autoregressive next-token loss, causal DiT; each block's first token (BOS) is context, "
            "the other L - 1 are counted"
            if loaded.is_ar
            else f"MDLM NELBO, uniform masking, {SCHEDULES[cfg.diffusion.schedule].title} schedule, continuous time"
        ),
    }
