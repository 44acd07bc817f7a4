"""One typed root config, built from YAML plus `key=value` overrides and validated once (DESIGN section 2).

Each section is a small dataclass; a component receives only its own section. Every error a user can cause
here is a `ConfigError` whose message names the key (`training.learning_rate`) and says what would be valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the key and the fix, on one line (whatever the input held)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


# The choices of the config and the CLI, as types: the config is validated from them (`_check_type`) and the
# CLI's choices are read from them (`choices`), so a new option is added in one place.
Framing = Literal["packed", "padded"]
ModelName = Literal["atat-dit", "mdlm-dit", "ar"]  # ar: the autoregressive baseline (models/ar.py)
ScheduleName = Literal["loglinear", "cosine"]  # diffusion/schedule.py's SCHEDULES
LrSchedule = Literal["constant", "cosine"]
Precision = Literal["bf16", "fp32"]
Strategy = Literal["auto", "ddp", "fsdp", "none"]
ImportanceMode = Literal["full", "learned_only", "frequency_only", "none"]
Masking = Literal["importance", "inverse", "balanced", "uniform"]
EstimatorLoss = Literal["bce", "mse"]
CurriculumVariant = Literal["default", "early", "late", "none"]
SamplerName = Literal["ancestral", "ancestral-cache", "confidence", "semi-ar", "ar"]  # diffusion/samplers.py
SampleOrder = Literal["confidence", "easy-first"]  # how the confidence sampler picks positions


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a Literal choice type, in their declared order."""
    return typing.get_args(literal)


# Denoiser presets (DESIGN 3.1, issue 2): hidden width, blocks, heads.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (512, 8, 8),
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
}


@dataclass
class DataConfig:
    # "stdlib-docs" (text shipped with CPython, offline), a local .jsonl/.txt/.parquet file or folder (or the raw
    # text8 file), or a HF dataset: openwebtext, wikitext103, wikitext2, lm1b, text8, ptb, lambada, any hub id.
    dataset_name: str = "stdlib-docs"
    dataset_config: str | None = None
    streaming: bool = False  # HF datasets: read from the hub as they are tokenized, without a local copy
    cache_dir: str = "~/.cache/mdlm_atat"
    train_split: str = "train"
    val_split: str = "validation"
    test_split: str = "test"
    batch_size: int = 32  # sequences per device per micro-step
    max_length: int = 1024  # L: tokens per sequence, BOS and EOS included
    num_workers: int = 4
    # "bpe" (byte-level BPE trained on the training split, cached), "char" (text8's characters), a local tokenizer
    # folder, or a HF name.
    tokenizer: str = "bpe"
    tokenizer_vocab_size: int = 4096  # only for tokenizer: bpe
    # packed (MDLM: documents + EOS concatenated, cut into L - 2, framed BOS ... EOS) | padded (one document per
    # row, BOS ... EOS then PAD to L, truncated; for sentence-level data such as LM1B)
    framing: Framing = "packed"

    @property
    def padded(self) -> bool:
        """Rows are single documents padded with PAD (which is never counted); packed rows are all real tokens."""
        return self.framing == "padded"


@dataclass
class ModelConfig:
    name: ModelName = "atat-dit"
    size: str | None = None  # tiny | small | medium: fills hidden_dim / num_layers / num_heads
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    cond_dim: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.1
    time_conditioning: bool = False  # MDLM's default: the denoiser does not see t
    # Initial value of each block's two adaLN gates: 0 is MDLM's adaLN-zero (every block starts as the identity);
    # 1 starts the blocks open, as a plain pre-norm transformer (a hypothesis about MDLM's early plateau).
    gate_init: float = 0.0
    vocab_size: int | None = None  # the tokenizer's vocabulary (MASK excluded); null = take it from the tokenizer
    # The DiT's embedding and output layer get ceil(num_tokens / m) * m rows (num_tokens = ids + MASK): GPT-2's
    # 50,258 makes the output GEMMs fall back to 2-element-aligned kernels on GPUs, 50,304 does not (nanoGPT).
    # The padding rows are never predicted, sampled or counted; 1 = no padding (what runs saved without the key had).
    pad_vocab_multiple: int = 64

    @property
    def is_ar(self) -> bool:
        """The autoregressive baseline: a causal DiT with a next-token loss, no masks, no ATAT."""
        return self.name == "ar"


SCHEDULE_NAMES = choices(ScheduleName)


@dataclass
class DiffusionConfig:
    schedule: ScheduleName = "loglinear"  # loglinear (MDLM: alpha = (1 - eps) t) | cosine (alpha = (1 - eps)(1 - cos(pi t / 2)))
    eps: float = 1e-3  # the schedule's floor: alpha(1) = 1 - eps, and training samples t in [eps, 1) (DESIGN 3.1)
    antithetic: bool = True  # stratified t over the batch
    eval_num_t: int = 4  # stratified t per sequence for the validation bound
    # Padded framing: PAD is never counted; true also masks it in x_t as MDLM does (its LM1B figures), false keeps
    # it visible. The bounds differ slightly; true is the one to compare with the paper.
    mask_padding: bool = False


@dataclass
class TrainingConfig:
    total_steps: int = 500_000  # optimiser steps; the LR schedule and the curriculum use it
    warmup_steps: int = 2_500
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    lr_schedule: LrSchedule = "constant"  # constant | cosine (after the linear warm-up)
    min_lr_ratio: float = 0.1  # cosine ends at learning_rate * min_lr_ratio
    grad_clip: float = 1.0
    gradient_accumulation_steps: int = 1
    ema_decay: float = 0.9999  # 0 disables the EMA
    log_every_n_steps: int = 100
    eval_every_n_steps: int = 5_000
    eval_batches: int = 50  # validation batches per evaluation; 0 = the whole split
    save_every_n_steps: int = 10_000
    max_nonfinite_steps: int = 10  # NaN/inf loss or gradients: skip the update; stop after this many in a row
    mixed_precision: Precision = "bf16"  # bf16 | fp32; bf16 applies on CUDA only, CPU runs in fp32
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N; under torchrun auto/cuda is cuda:LOCAL_RANK
    compile: bool = False
    # Data parallelism under torchrun (train/distributed.py): auto (ddp with several processes) | ddp | fsdp
    # (FSDP2) | none. One process never wraps the model, whatever this says.
    strategy: Strategy = "auto"


@dataclass
class AtatConfig:
    """ATAT (DESIGN 3.2-3.3). `enabled: false` is the MDLM baseline exactly: no estimator, uniform masks."""

    enabled: bool = True
    importance_mode: ImportanceMode = "full"  # full | learned_only | frequency_only | none
    masking: Masking = "importance"  # importance (beta > 0 masks hard tokens more) | inverse | balanced | uniform
    beta0: float = 0.5  # tilt strength in logit space; p_i / t stays within about exp(+-3 beta0)
    # Every uniform_every-th row of the global batch keeps MDLM's uniform masks under a tilt; the estimator learns
    # from those rows (from every row while beta = 0), so its target does not move with beta (DESIGN 3.2).
    uniform_every: int = 4
    correction: bool = True  # weight 1/p_i (keeps each token's expected weight); false = the "focus" ablation
    estimator_hidden_dim: int = 128
    estimator_num_layers: int = 2
    estimator_num_heads: int = 4
    estimator_cond_dim: int = 64
    estimator_learning_rate: float = 1e-3
    estimator_loss: EstimatorLoss = "bce"  # bce | mse, against the rank percentile of the denoiser's per-token loss
    estimator_warmup_steps: int = 1000  # optimiser steps before the estimator drives masking
    diagnostics_batches: int = 8  # validation batches for the estimator's diagnostics at each evaluation


# Curriculum variants (DESIGN 3.4): stage boundaries as fractions of training, one per CurriculumVariant.
CURRICULUM_VARIANTS: dict[str, tuple[float, float] | None] = {
    "default": (0.33, 0.66),
    "early": (0.2, 0.6),
    "late": (0.35, 0.8),
    "none": None,  # fixed beta = beta0 throughout
}


@dataclass
class CurriculumConfig:
    variant: CurriculumVariant = "default"  # default | early | late | none; default uses stage_1_end / stage_2_end as given
    stage_1_end: float = 0.33  # easy (beta = -beta0) until here
    stage_2_end: float = 0.66  # medium (beta = 0) until here, hard (beta = +beta0) after
    ramp: float = 0.0  # width (fraction of training) of a linear beta ramp centred on each boundary


@dataclass
class LoggingConfig:
    wandb_project: str | None = None
    wandb_entity: str | None = None
    save_logs_dir: str = "runs"  # parent folder of run folders when --log-dir is not given
    tensorboard: bool = True  # event files in <run>/tensorboard when the tensorboard package is installed


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    atat: AtatConfig = field(default_factory=AtatConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short, stable hash of the resolved config (reported by eval beside the numbers)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# Building: dict -> dataclasses, with type checks that name the key.


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    """(int,) for `int`; (str, NoneType) for `str | None`; floats also accept ints."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(type(None) if a is None else a for a in typing.get_args(annotation))
    return (annotation,)


def _name(key: Any) -> str:
    """A key as an error message shows it: as written, or quoted when it holds newlines or other unprintables."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    if typing.get_origin(annotation) is Literal:  # a choice: a string among the type's values
        options = choices(annotation)
        if not isinstance(value, str):
            hint = " (YAML reads no/yes/off/on as booleans)" if isinstance(value, bool) else ""
            raise ConfigError(f"{key}: expected one of {', '.join(options)}, got {value!r}{hint}")
        if value not in options:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}")
        return value
    allowed = _allowed_types(annotation)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key}: must not be null")
    # bool is a subclass of int in Python: accept it only where a bool is wanted.
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif float in allowed and isinstance(value, (int, float)):
        if not math.isfinite(value):  # 1e999 and .nan are YAML floats, never meaningful settings
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    elif int in allowed and isinstance(value, int):
        return value
    elif str in allowed and isinstance(value, str):
        return value
    names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
    raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__ import annotations`
    unknown = sorted(set(raw) - set(fields), key=str)  # YAML keys may be numbers, booleans or null
    if unknown:
        raise ConfigError(
            f"{prefix}.{_name(unknown[0])}: unknown key; valid keys in '{prefix}' are: {', '.join(fields)}"
        )
    kwargs = {name: _check_type(f"{prefix}.{name}", value, hints[name]) for name, value in raw.items()}
    return cls(**kwargs)


def _apply_model_size(model: ModelConfig, raw: dict[str, Any]) -> None:
    if model.size is None:
        return
    if model.size not in MODEL_SIZES:
        raise ConfigError(f"model.size: unknown size {model.size!r}; choose one of {', '.join(MODEL_SIZES)}")
    preset = dict(zip(("hidden_dim", "num_layers", "num_heads"), MODEL_SIZES[model.size]))
    for key, value in preset.items():
        if key in raw and raw[key] != value:
            raise ConfigError(
                f"model.{key}: {raw[key]} conflicts with model.size={model.size} ({value}); set one of the two"
            )
        setattr(model, key, value)


def _apply_curriculum_variant(curriculum: CurriculumConfig, raw: dict[str, Any]) -> None:
    bounds = CURRICULUM_VARIANTS[curriculum.variant]
    if curriculum.variant in ("default", "none") or bounds is None:
        return
    defaults = CURRICULUM_VARIANTS["default"]
    for key, value, default in zip(("stage_1_end", "stage_2_end"), bounds, defaults):
        # Stage ends written at their default values (as configs that spell out the whole recipe do) yield to
        # the variant; any other value is a real conflict.
        if key in raw and raw[key] not in (value, default):
            raise ConfigError(
                f"curriculum.{key}: {raw[key]} conflicts with curriculum.variant={curriculum.variant} ({value}); "
                "set one of the two (variant default takes the stage ends as given)"
            )
        setattr(curriculum, key, value)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(sections), key=str)
    if unknown:
        raise ConfigError(f"{_name(unknown[0])}: unknown section; valid sections are: {', '.join(sections)}")
    built = {}
    for name, f in sections.items():
        section_cls = f.default_factory().__class__  # type: ignore[misc]
        built[name] = _build_section(section_cls, raw.get(name), name)
    cfg = Config(**built)
    _apply_model_size(cfg.model, raw.get("model") or {})
    _apply_curriculum_variant(cfg.curriculum, raw.get("curriculum") or {})
    validate(cfg)
    return cfg


# Keys added after runs were first saved whose default is not what the older code did: a saved config (a
# checkpoint's, an export's) without one was written by code that behaved as this value does.
KEYS_ADDED: dict[tuple[str, str], Any] = {
    ("model", "pad_vocab_multiple"): 1,  # no vocabulary padding: the tensors hold num_tokens rows
}


def saved_config(raw: Any) -> Any:
    """A config as a checkpoint or an export saved it (a dict), with every key it predates (KEYS_ADDED) set as the
    code that wrote it had it; a new dict, which `from_dict` then validates as any other. The readers of saved
    configs (run.RunCheckpoint.from_dict, run.load_export) go through here, so a resume, an evaluation, a sample
    or an export of an old run builds the model its tensors were saved from."""
    if not isinstance(raw, dict):
        return raw  # from_dict names what is wrong with it
    out = dict(raw)
    for (section, key), value in KEYS_ADDED.items():
        keys = out.get(section) or {}
        if isinstance(keys, dict) and key not in keys:
            out[section] = {**keys, key: value}
    return out


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars: 1e-4, true, null, 'text'; text that is not YAML is taken as written."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:  # "[1", "@x": the key's type check then names the key
        return text
    # YAML 1.1 reads "1e-4" as a string (no dot); users mean a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            return value
    return value


# A preset key set on the command line replaces the keys it determines in the file below it: `model.size=tiny`
# on a config that spells out 768 x 12 means tiny, not a conflict. Keys given on the command line too still win.
PRESET_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("model", "size"): ("hidden_dim", "num_layers", "num_heads"),
    ("curriculum", "variant"): ("stage_1_end", "stage_2_end"),
}


def _split_override(item: str) -> tuple[str, str, str]:
    if "=" not in item:
        raise ConfigError(f"{item}: overrides are written section.key=value, e.g. training.learning_rate=1e-4")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{key}: overrides name one key inside a section, e.g. model.hidden_dim=256")
    return parts[0], parts[1], text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw config dict (returns a new dict)."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    parsed = [_split_override(item) for item in overrides]
    given = {(section, name) for section, name, _ in parsed}
    for section, name, text in parsed:
        if not isinstance(out.get(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {out[section]!r}")
        if out.get(section) is None:
            out[section] = {}
        for determined in PRESET_KEYS.get((section, name), ()):
            if (section, determined) not in given:
                out[section].pop(determined, None)
        out[section][name] = _parse_value(text)
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from the defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: file not found; the shipped configs are in configs/atat/")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"--config {path}: not valid YAML{where} ({problem})") from None
    return from_dict(apply_overrides(raw, overrides or []))


# ----------------------------------------------------------------------------------------------------------
# Validation of values (types were checked while building).


SAFE_BETA0 = 1.0  # above it the 1/p_i weights' spread, up to exp(3 beta0) times MDLM's 1/t, inflates the loss variance


def advisories(cfg: Config) -> list[str]:
    """Valid settings a user should know the cost of: one line each, printed when a run starts."""
    notes = []
    a = cfg.atat
    if a.enabled and a.masking != "uniform" and a.beta0 > SAFE_BETA0:
        notes.append(
            f"atat.beta0={a.beta0:g} is above {SAFE_BETA0:g}: a masked token's weight can reach "
            f"exp(3 beta0) = {math.exp(3 * a.beta0):.0f}x MDLM's 1/t (1/p_i keeps its expectation, not its "
            f"variance); 0.25-1 is the range the ablations use"
        )
    return notes


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    d, m, df, t, c = cfg.data, cfg.model, cfg.diffusion, cfg.training, cfg.curriculum
    _require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _require(d.max_length >= 4, "data.max_length", f"must be >= 4 (BOS, EOS and content), got {d.max_length}")
    _require(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    _require(d.tokenizer_vocab_size >= 260, "data.tokenizer_vocab_size", "must be >= 260 (256 bytes + specials)")

    _require(
        not (m.is_ar and cfg.atat.enabled),
        "atat.enabled",
        "must be false with model.name: ar (ATAT adapts the masks of a diffusion model; the AR baseline has none)",
    )
    _require(m.hidden_dim >= 8, "model.hidden_dim", f"must be >= 8, got {m.hidden_dim}")
    _require(m.num_layers >= 1, "model.num_layers", f"must be >= 1, got {m.num_layers}")
    _require(m.num_heads >= 1, "model.num_heads", f"must be >= 1, got {m.num_heads}")
    _require(
        m.hidden_dim % m.num_heads == 0 and (m.hidden_dim // m.num_heads) % 2 == 0,
        "model.num_heads",
        f"hidden_dim {m.hidden_dim} / num_heads {m.num_heads} must be an even integer head width (rotary)",
    )
    _require(m.cond_dim >= 1, "model.cond_dim", f"must be >= 1, got {m.cond_dim}")
    _require(m.mlp_ratio >= 1, "model.mlp_ratio", f"must be >= 1, got {m.mlp_ratio}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.vocab_size is None or m.vocab_size >= 2, "model.vocab_size", "must be >= 2 or null")
    _require(
        m.pad_vocab_multiple >= 1, "model.pad_vocab_multiple", f"must be >= 1 (1 = no padding), got {m.pad_vocab_multiple}"
    )

    _require(0.0 < df.eps < 0.5, "diffusion.eps", f"must be in (0, 0.5), got {df.eps}")
    _require(df.eval_num_t >= 1, "diffusion.eval_num_t", f"must be >= 1, got {df.eval_num_t}")

    _require(t.total_steps >= 1, "training.total_steps", f"must be >= 1, got {t.total_steps}")
    _require(t.warmup_steps >= 0, "training.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.learning_rate > 0, "training.learning_rate", f"must be > 0, got {t.learning_rate}")
    _require(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0 <= t.beta1 < 1, "training.beta1", f"must be in [0, 1), got {t.beta1}")
    _require(0 <= t.beta2 < 1, "training.beta2", f"must be in [0, 1), got {t.beta2}")
    _require(0 <= t.min_lr_ratio <= 1, "training.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.grad_clip >= 0, "training.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    _require(
        t.gradient_accumulation_steps >= 1,
        "training.gradient_accumulation_steps",
        f"must be >= 1, got {t.gradient_accumulation_steps}",
    )
    _require(0 <= t.ema_decay < 1, "training.ema_decay", f"must be in [0, 1) (0 disables), got {t.ema_decay}")
    for key in ("log_every_n_steps", "eval_every_n_steps", "save_every_n_steps"):
        value = getattr(t, key)
        _require(value >= 1, f"training.{key}", f"must be >= 1, got {value}")
    _require(t.eval_batches >= 0, "training.eval_batches", f"must be >= 0 (0 = whole split), got {t.eval_batches}")
    _require(
        t.max_nonfinite_steps >= 1, "training.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}"
    )
    _require(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        "training.device",
        f"{t.device!r} is not auto, cpu, cuda or cuda:N",
    )

    a = cfg.atat
    _require(0 <= a.beta0 <= 5, "atat.beta0", f"must be in [0, 5] (p_i / t is bounded by exp(3 beta0)), got {a.beta0}")
    _require(a.uniform_every >= 2, "atat.uniform_every", f"must be >= 2 (1 would mask every row uniformly), got {a.uniform_every}")
    for key in ("estimator_hidden_dim", "estimator_num_layers", "estimator_num_heads", "estimator_cond_dim"):
        value = getattr(a, key)
        _require(value >= 1, f"atat.{key}", f"must be >= 1, got {value}")
    _require(
        a.estimator_hidden_dim % a.estimator_num_heads == 0 and (a.estimator_hidden_dim // a.estimator_num_heads) % 2 == 0,
        "atat.estimator_num_heads",
        f"estimator_hidden_dim {a.estimator_hidden_dim} / estimator_num_heads {a.estimator_num_heads} must be an even integer",
    )
    _require(a.estimator_learning_rate > 0, "atat.estimator_learning_rate", f"must be > 0, got {a.estimator_learning_rate}")
    _require(a.estimator_warmup_steps >= 0, "atat.estimator_warmup_steps", f"must be >= 0, got {a.estimator_warmup_steps}")
    _require(a.diagnostics_batches >= 0, "atat.diagnostics_batches", f"must be >= 0, got {a.diagnostics_batches}")

    _require(0 <= c.ramp < 0.5, "curriculum.ramp", f"must be in [0, 0.5), got {c.ramp}")
    _require(0 < c.stage_1_end < 1, "curriculum.stage_1_end", f"must be in (0, 1), got {c.stage_1_end}")
    _require(0 < c.stage_2_end <= 1, "curriculum.stage_2_end", f"must be in (0, 1], got {c.stage_2_end}")
    _require(
        c.stage_1_end <= c.stage_2_end,
        "curriculum.stage_1_end",
        f"{c.stage_1_end} must not exceed curriculum.stage_2_end ({c.stage_2_end})",
    )
