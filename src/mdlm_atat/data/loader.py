"""Batches of blocks for training and evaluation, with an exactly resumable order.

The training order is a pure function of (seed, global sample index): epoch e visits the blocks in the
permutation drawn from `np.random.default_rng((seed, e))`, and the stream of samples is the epochs' permutations
one after another. Global batch k holds samples [k * B * W, (k + 1) * B * W) (B per rank, W ranks); rank r takes
the r-th slice of B. Resuming at `start_sample = samples_seen` therefore yields exactly the batches an
uninterrupted run would have seen, and no global RNG (torch's or numpy's) is consumed, since the trainer's
exact resume depends on those.

Batches are plain (B, L) int64 tensors in every framing; `attention_mask` says which positions are real tokens
(the padded framing's PAD id is unique to padding, see store.py), so the loss can count only those (DESIGN 3.1).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mdlm_atat.data.tokenizers import Tokenizer


def attention_mask(batch: torch.Tensor, tokenizer: Tokenizer, framing: str) -> torch.Tensor | None:
    """(B, L) bool, True at real tokens (BOS, document, EOS) and False at padding; None for the packed framing,
    where every position is real (callers then skip the masking work)."""
    if framing == "packed":
        return None
    if framing == "padded":
        if tokenizer.pad_id is None:
            raise ValueError(f"attention_mask: framing 'padded' but {tokenizer!r} has no pad id")
        return batch != tokenizer.pad_id
    raise ValueError(f"attention_mask: unknown framing {framing!r} (packed, padded)")


class BlockSampler:
    """Infinite iterator of this rank's block indices, one (B,) int64 array per batch."""

    def __init__(
        self, num_blocks: int, batch_size: int, seed: int, start_sample: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_blocks < 1:
            raise ValueError("BlockSampler: no blocks to sample from")
        if not 0 <= rank < world_size:
            raise ValueError(f"BlockSampler: rank {rank} outside world_size {world_size}")
        self.num_blocks = num_blocks
        self.batch_size = batch_size  # per rank
        self.seed = seed
        self.start_sample = start_sample  # global: counts every rank's samples
        self.rank = rank
        self.world_size = world_size

    def _indices(self, start: int, count: int) -> np.ndarray:
        """Block indices of global samples [start, start + count), across epoch boundaries."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, pos = divmod(start + filled, self.num_blocks)
            if epoch != self._epoch:
                self._epoch = epoch
                self._perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_blocks)
            take = min(count - filled, self.num_blocks - pos)
            out[filled : filled + take] = self._perm[pos : pos + take]
            filled += take
        return out

    def __iter__(self) -> Iterator[np.ndarray]:
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)
        global_batch = self.batch_size * self.world_size
        start = self.start_sample
        while True:
            yield self._indices(start + self.rank * self.batch_size, self.batch_size)
            start += global_batch


class _Blocks(Dataset):
    """Reads batches of rows; reopens a memmap by file name in a spawned worker instead of pickling its data."""

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = blocks

    def __getstate__(self) -> dict:
        b = self.blocks
        if isinstance(b, np.memmap) and b.filename is not None:
            return {"memmap": (b.filename, b.dtype.str, b.shape, b.offset)}
        return {"blocks": b}

    def __setstate__(self, state: dict) -> None:
        if "memmap" in state:
            filename, dtype, shape, offset = state["memmap"]
            self.blocks = np.memmap(filename, dtype=dtype, mode="r", shape=shape, offset=offset)
        else:
            self.blocks = state["blocks"]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return _read(self.blocks, np.asarray(indices))

    def __getitem__(self, index: int) -> torch.Tensor:
        return _read(self.blocks, np.asarray([index]))[0]


def _read(blocks: np.ndarray, indices: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(blocks[indices].astype(np.int64))  # (B, L)


def _as_is(batch: torch.Tensor) -> torch.Tensor:  # module level: picklable for spawned workers
    return batch


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A terminal's Ctrl-C and a scheduler's SIGTERM reach every process of the job: the main process finishes its
    step and saves (train/faults.py), which needs its workers alive. They exit when the loader shuts them down, or
    when the main process dies (torch's worker watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_batches(
    blocks: np.ndarray,
    batch_size: int,
    seed: int,
    start_sample: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> Iterator[torch.Tensor]:
    """Infinite stream of (batch_size, L) int64 batches for this rank, starting at global sample start_sample."""
    sampler = BlockSampler(len(blocks), batch_size, seed, start_sample, rank, world_size)
    if num_workers == 0:
        for indices in sampler:
            yield _read(blocks, indices)
        return
    loader = DataLoader(
        _Blocks(blocks),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_as_is,
        persistent_workers=False,
        # Workers only read; the order is fixed by the sampler. A generator of our own keeps DataLoader from
        # drawing its base seed from torch's global RNG (which the trainer checkpoints).
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )
    yield from loader


def eval_batches(blocks: np.ndarray, batch_size: int, max_batches: int = 0) -> Iterator[torch.Tensor]:
    """Blocks in order, (batch_size, L) int64 batches, the last one possibly smaller; max_batches 0 = all."""
    num_batches = -(-len(blocks) // batch_size)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    for k in range(num_batches):
        yield torch.from_numpy(np.asarray(blocks[k * batch_size : (k + 1) * batch_size]).astype(np.int64))
