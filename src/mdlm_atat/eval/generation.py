"""Sample quality (DESIGN 3.6, issue 5): generative perplexity, unigram entropy, repetition.

- Generative perplexity: exp of the mean NLL per token that a reference causal LM assigns to the samples' text,
  re-tokenized with the reference's own tokenizer (as MDLM does with GPT-2). The reference is an AR checkpoint
  trained here (`model.name: ar`) or, when `transformers` is installed, any HF causal LM by name or folder.
  Low generative perplexity alone rewards dull, repetitive text: read it beside the entropy.
- Unigram entropy: per sample, the entropy (nats) of its token histogram, averaged over samples (Zheng et al.
  2024 use it to expose the low-temperature bias of float32 Gumbel sampling; GPT-2-length real text is about
  5.6 nats for 1024 tokens).
- Repetition: per sample, the fraction of its n-grams that repeat an earlier n-gram of the same sample
  (1 - distinct / total), averaged over samples; confidence-ordered decoding that loops shows up here.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch


def unigram_entropy(sequences: Sequence[Sequence[int]]) -> float:
    """Mean over sequences of the entropy (nats) of each sequence's token histogram."""
    values = []
    for seq in sequences:
        if not seq:
            continue
        counts = torch.tensor(list(Counter(int(i) for i in seq).values()), dtype=torch.float64)
        p = counts / counts.sum()
        values.append(float(-(p * p.log()).sum()))
    return sum(values) / len(values) if values else float("nan")


def repeated_ngram_fraction(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Mean over sequences of 1 - distinct n-grams / n-grams (0 = no n-gram occurs twice)."""
    values = []
    for seq in sequences:
        grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
        if grams:
            values.append(1.0 - len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else float("nan")


class ReferenceLM(Protocol):
    name: str

    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        """(summed NLL in nats, tokens scored) of the texts under the reference."""


def _chunk(ids: list[int], first: int, max_len: int) -> list[list[int]]:
    """Split a text's ids into model inputs of at most max_len: each starts with `first` (BOS) then max_len - 1
    tokens, every one of which is scored given what precedes it in its chunk."""
    step = max_len - 1
    return [[first, *ids[i : i + step]] for i in range(0, len(ids), step)]


class CheckpointReference:
    """An AR checkpoint trained here (`model.name: ar`), EMA weights, scoring with its own tokenizer."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        from mdlm_atat.config import ConfigError
        from mdlm_atat.run import load_for_inference
        from mdlm_atat.diffusion.objective import NextTokenObjective

        loaded = load_for_inference(checkpoint, device=device)
        model, cfg, tokenizer = loaded.model, loaded.cfg, loaded.tokenizer
        if not loaded.is_ar:
            raise ConfigError(
                f"--reference {checkpoint}: a {cfg.model.name!r} checkpoint; the reference must be a causal LM "
                "(an AR checkpoint, model.name: ar, or a HF causal LM)"
            )
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.max_len = cfg.data.max_length
        self.objective = NextTokenObjective(tokenizer.mask_id)
        self.name = f"{checkpoint} (AR, step {loaded.step})"

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        chunks = [c for text in texts for c in _chunk(self.tokenizer.encode(text), self.tokenizer.bos_id, self.max_len)]
        nll, count = 0.0, 0
        for start in range(0, len(chunks), self.batch_size):
            batch = chunks[start : start + self.batch_size]
            width = max(len(c) for c in batch)
            x0 = torch.full((len(batch), width), self.tokenizer.eos_id, dtype=torch.long)
            real = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, c in enumerate(batch):
                x0[row, : len(c)] = torch.tensor(c)
                real[row, : len(c)] = True
            # Causal attention: the right padding cannot change the scores of the real tokens before it.
            terms = self.objective(self.model, x0.to(self.device), attention_mask=real.to(self.device))
            nll += float(terms.nll_sum.double())
            count += int(terms.num_tokens)
        return nll, count


class HFReference:
    """A HF causal LM by name or local folder (needs `transformers`; the hub only for names not cached)."""

    def __init__(self, name: str, device: torch.device | str = "cpu", batch_size: int = 8):
        from mdlm_atat.config import ConfigError

        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ConfigError(
                f"--reference {name}: not an AR checkpoint of this package, and `transformers` is not installed for "
                "a HF causal LM (pip install 'mdlm-atat[hf]'); or pass an AR checkpoint trained with model.name=ar"
            ) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
        except Exception as err:  # hub unreachable, unknown name, not a causal LM: one clear line
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"--reference {name}: could not load a HF causal LM ({type(err).__name__}: {first_line})") from None
        config = self.model.config
        self.max_len = int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 1024))
        first = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if first is None:
            raise ConfigError(f"--reference {name}: its tokenizer has neither BOS nor EOS to start a sequence with")
        self.first, self.device, self.batch_size, self.name = first, device, batch_size, name

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> tuple[float, int]:
        chunks = [
            c for text in texts
            for c in _chunk(self.tokenizer(text, add_special_tokens=False)["input_ids"], self.first, self.max_len)
        ]
        nll, count = 0.0, 0
        for start in range(0, len(chunks), self.batch_size):
            batch = chunks[start : start + self.batch_size]
            width = max(len(c) for c in batch)
            ids = torch.full((len(batch), width), self.first, dtype=torch.long)
            real = torch.zeros((len(batch), width), dtype=torch.long)
            for row, c in enumerate(batch):
                ids[row, : len(c)] = torch.tensor(c)
                real[row, : len(c)] = 1
            ids, real = ids.to(self.device), real.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=real).logits[:, :-1].double()  # (B, W-1, V)
            target, scored = ids[:, 1:], real[:, 1:].bool()
            token_nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None]).squeeze(-1)
            nll += float(token_nll[scored].sum())
            count += int(scored.sum())
        return nll, count


def load_reference(spec: str, device: torch.device | str = "cpu") -> ReferenceLM:
    """An AR checkpoint (a .pt file or a run folder) when `spec` is one, else a HF causal LM name or folder."""
    path = Path(spec).expanduser()
    if path.is_file() or (path / "checkpoints" / "last.pt").is_file():
        return CheckpointReference(path, device=device)
    return HFReference(spec, device=device)


def generative_perplexity(reference: ReferenceLM, texts: Sequence[str]) -> dict[str, Any]:
    nll, count = reference.score(texts)
    mean = nll / count if count else float("nan")
    return {"gen_ppl": math.exp(mean) if count else float("nan"), "gen_nll": mean, "gen_tokens": count,
            "reference": reference.name}


def sample_quality(
    sequences: Sequence[Sequence[int]], texts: Sequence[str], reference: ReferenceLM | None = None
) -> dict[str, Any]:
    """The numbers `atat sample` reports: entropy and repetition always, generative perplexity with a reference."""
    quality: dict[str, Any] = {
        "unigram_entropy": unigram_entropy(sequences),
        "repeated_ngram_fraction": {str(n): repeated_ngram_fraction(sequences, n) for n in (1, 2, 4)},
    }
    if reference is not None:
        quality.update(generative_perplexity(reference, texts))
    return quality
