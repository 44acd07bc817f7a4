"""GPT-2 tokenization into the token store, in tokens/s, with two ways of using several cores (issue 3).

`threads`: the store's own path: `Tokenizer.encode_batch` (HF `encode_batch_fast`) over batches of about 2M
characters; the Rust tokenizer spreads each batch over its thread pool (one thread per core) and releases the GIL.
`pool`: the same batches sent to a `multiprocessing` pool (spawn), one single-threaded tokenizer per process,
at most two batches in flight per worker so memory stays bounded, results consumed in order.
`serial`: one thread (TOKENIZERS_PARALLELISM=false), the baseline both should beat.
`offsets`: like `threads` but HF's plain `encode_batch`, which also computes character offsets (unused here).

Each variant runs `prepare_split` end to end into a fresh temporary cache: reading the JSONL, tokenizing, MDLM
packing into L = 1024 blocks, unigram counts and writing the uint16 .bin; only the encoder differs (the other two
replace `store.encode_documents`). tokens/s = the manifest's `num_document_tokens` (document tokens plus one EOS
per document) / wall time of `prepare_split`; the fastest of `--repeats` runs is reported, since on a shared
machine the slow runs measure the neighbours. The stores of all variants must be byte-identical (checked).

    python benchmarks/tokenize_throughput.py --output benchmarks/results/tokenize_throughput.json

Default corpus: the train splits of all of ../shared/corpora (8.1M GPT-2 tokens of prose and reStructuredText).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers

from mdlm_atat.config import DataConfig
from mdlm_atat.data import store as store_mod
from mdlm_atat.data.sources import InputReport
from mdlm_atat.data.tokenizers import Tokenizer, build_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the checkout

# ----------------------------------------------------------------------------------------------------------
# The `pool` encoder


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    _worker_tokenizer = Tokenizer.from_json(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def pool_encoder(pool, num_workers: int):
    """A drop-in for store.encode_documents that farms batches out to `pool`, in order, bounded."""

    def encode_documents(tokenizer: Tokenizer, docs: Iterable[str], report: InputReport | None = None
                         ) -> Iterator[list[store_mod.Segment]]:
        in_flight: deque = deque()
        for texts, ends in store_mod.text_batches(docs, report):
            in_flight.append((pool.apply_async(_encode_in_worker, (texts,)), ends))
            if len(in_flight) >= 2 * num_workers:
                result, ends_ = in_flight.popleft()
                yield list(zip(result.get(), ends_))
        while in_flight:
            result, ends_ = in_flight.popleft()
            yield list(zip(result.get(), ends_))

    return encode_documents


def serial_encoder(tokenizer: Tokenizer, docs: Iterable[str], report: InputReport | None = None):
    for texts, ends in store_mod.text_batches(docs, report):
        yield list(zip(tokenizer.encode_batch(texts), ends))


def offsets_encoder(tokenizer: Tokenizer, docs: Iterable[str], report: InputReport | None = None):
    for texts, ends in store_mod.text_batches(docs, report):
        encodings = tokenizer._tk.encode_batch(texts, add_special_tokens=False)
        yield list(zip([e.ids for e in encodings], ends))


# ----------------------------------------------------------------------------------------------------------


def run_once(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[float, float, dict, bytes]:
    """(wall seconds, CPU seconds of this process and its children, manifest, the blocks' bytes)."""
    with tempfile.TemporaryDirectory() as cache:
        c = DataConfig(**{**cfg.__dict__, "cache_dir": cache})
        cpu0 = _cpu_seconds()
        start = time.perf_counter()
        store = store_mod.prepare_split(c, tokenizer, c.train_split, progress=False)
        seconds = time.perf_counter() - start
        return seconds, _cpu_seconds() - cpu0, store.manifest, np.asarray(store.blocks).tobytes()


def _cpu_seconds() -> float:
    # Pool workers are not children until they exit, so their CPU time is not here: only the threads and serial
    # variants get a meaningful cores-used figure (CPU seconds / wall seconds; 2.0 = both cores busy).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(SHARED / "corpora"), help="a .jsonl/.txt file or folder")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--methods", default="threads,pool,serial,offsets")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes of the pool variant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the results as JSON")
    args = parser.parse_args()

    cfg = DataConfig(dataset_name=args.corpus, tokenizer=args.tokenizer, max_length=args.max_length)
    tokenizer = build_tokenizer(cfg, list)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results, reference = {}, None
    real_encoder = store_mod.encode_documents
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, _init_worker, (tokenizer.to_json(),)) if "pool" in methods else None
    try:
        if pool is not None:
            pool.map(_encode_in_worker, [["warm up"]] * args.workers)  # start-up is not tokenization
        for method in methods:
            encoder = {"threads": real_encoder, "serial": serial_encoder, "offsets": offsets_encoder}.get(method)
            if method == "pool":
                encoder = pool_encoder(pool, args.workers)
            if encoder is None:
                parser.error(f"--methods: unknown method {method!r} (threads, pool, serial, offsets)")
            store_mod.encode_documents = encoder
            if method == "serial":
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            times, cores, loads = [], [], []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])  # > 0.5 before a run: someone else is using the cores
                seconds, cpu_seconds, manifest, blocks = run_once(cfg, tokenizer)
                times.append(seconds)
                cores.append(cpu_seconds / seconds)
                if reference is None:
                    reference = blocks
                if blocks != reference:
                    print(f"{method}: the store differs from the first variant's", file=sys.stderr)
                    return 1
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            n = manifest["num_document_tokens"]
            results[method] = {
                "tokens_per_s": n / min(times),
                "seconds_min": min(times),
                "seconds_all": times,
                "cores_used_all": cores if method != "pool" else None,
                "load_average_1min_before_each": loads,
                "num_document_tokens": n,
                "num_documents": manifest["num_documents"],
                "num_blocks": manifest["num_blocks"],
            }
            best = times.index(min(times))
            print(f"{method:>8}: {n / min(times) / 1e6:6.3f}M tokens/s  ({n:,} tokens, best of "
                  f"{', '.join(f'{t:.2f}' for t in times)} s; load before the best run {loads[best]:.2f}"
                  + (f", cores used {cores[best]:.2f})" if method != "pool" else ")"), flush=True)
    finally:
        store_mod.encode_documents = real_encoder
        if pool is not None:
            pool.close()
            pool.join()

    from common import repo_relative, shown_command  # here, not at the top: spawned workers need no torch

    record = {
        "benchmark": "tokenize_throughput",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shown_command(),
        "corpus": repo_relative(args.corpus),
        "tokenizer": tokenizer.name,
        "max_length": args.max_length,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "results": results,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
