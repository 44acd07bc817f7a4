import pytest
import yaml

from mdlm_atat.config import MODEL_SIZES, ConfigError, Config, from_dict, load_config, saved_config

from conftest import CONFIG_DIR

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"base_config.yaml", "quickstart.yaml", "wikitext103.yaml", "openwebtext.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The resolved config round-trips through YAML to the same config.
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_base_config_lists_every_key_with_its_default():
    raw = yaml.safe_load((CONFIG_DIR / "base_config.yaml").read_text())
    assert from_dict(raw) == Config()
    defaults = Config().to_dict()
    assert {s: set(v) for s, v in raw.items()} == {s: set(v) for s, v in defaults.items()}


def test_openwebtext_is_the_production_recipe():
    cfg = load_config(CONFIG_DIR / "openwebtext.yaml")
    assert (cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.num_heads) == (768, 12, 12)
    assert cfg.model.vocab_size == 50257 and cfg.data.tokenizer == "gpt2" and cfg.data.max_length == 1024
    assert cfg.data.batch_size == 32
    t = cfg.training
    assert (t.total_steps, t.warmup_steps, t.learning_rate, t.weight_decay) == (500_000, 10_000, 1e-4, 0.01)
    assert t.mixed_precision == "bf16"
    assert (t.log_every_n_steps, t.eval_every_n_steps, t.save_every_n_steps) == (100, 5000, 10_000)
    assert (cfg.curriculum.stage_1_end, cfg.curriculum.stage_2_end) == (0.33, 0.66)


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config(None, ["training.learning_rate=1e-4", "model.time_conditioning=true", "model.vocab_size=null"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.model.time_conditioning is True
    assert cfg.model.vocab_size is None


def test_size_presets_fill_the_shape():
    for size, (width, depth, heads) in MODEL_SIZES.items():
        m = load_config(None, [f"model.size={size}"]).model
        assert (m.hidden_dim, m.num_layers, m.num_heads) == (width, depth, heads)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.hidden_dm=256"], "model.hidden_dm"),
        (["trainin.total_steps=5"], "trainin"),
        (["training.total_steps=-1"], "training.total_steps"),
        (["training.learning_rate=fast"], "training.learning_rate"),
        (["training.total_steps=1.5"], "training.total_steps"),
        (["model.dropout=true"], "model.dropout"),
        (["model.num_heads=5"], "model.num_heads"),
        (["model.size=huge"], "model.size"),
        (["model.size=small", "model.hidden_dim=512"], "model.hidden_dim"),
        (["curriculum.stage_1_end=0.8", "curriculum.stage_2_end=0.5"], "curriculum.stage_1_end"),
        (["training.mixed_precision=fp8"], "training.mixed_precision"),
        (["data.batch_size=0"], "data.batch_size"),
        (["model.pad_vocab_multiple=0"], "model.pad_vocab_multiple"),
        (["no_equals_sign"], "no_equals_sign"),
    ],
)
def test_bad_config_fails_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key)


def test_a_saved_config_without_a_later_key_reads_as_the_code_that_wrote_it():
    """Checkpoints and exports from before model.pad_vocab_multiple hold unpadded tensors: their configs read as 1,
    a new config defaults to 64, and a saved value is kept."""
    old = Config().to_dict()
    del old["model"]["pad_vocab_multiple"]
    assert from_dict(saved_config(old)).model.pad_vocab_multiple == 1
    assert "pad_vocab_multiple" not in old["model"]  # a new dict: the caller's is not changed
    assert from_dict(old).model.pad_vocab_multiple == Config().model.pad_vocab_multiple == 64
    assert from_dict(saved_config(Config().to_dict())) == Config()
    assert saved_config(None) is None  # not a config: from_dict says what is wrong with it


def test_missing_or_invalid_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    section = tmp_path / "section.yaml"
    section.write_text("training: 5\n")
    with pytest.raises(ConfigError, match="^training: expected a mapping"):
        load_config(section)


def test_hash_is_stable_and_sensitive():
    a, b = load_config(None), load_config(None)
    assert a.hash() == b.hash()
    assert a.hash() != load_config(None, ["training.seed=1"]).hash()


def test_a_preset_on_the_command_line_replaces_what_the_file_spells_out():
    cfg = load_config(CONFIG_DIR / "openwebtext.yaml", ["model.size=tiny"])
    assert (cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.num_heads) == (512, 8, 8)
    cfg = load_config(CONFIG_DIR / "openwebtext.yaml", ["curriculum.variant=late"])
    assert (cfg.curriculum.stage_1_end, cfg.curriculum.stage_2_end) == (0.35, 0.8)
    with pytest.raises(ConfigError, match="^model.hidden_dim"):  # both on the command line: a real conflict
        load_config(CONFIG_DIR / "openwebtext.yaml", ["model.size=tiny", "model.hidden_dim=256"])


def test_a_strong_tilt_is_valid_but_named_with_its_cost():
    from mdlm_atat.config import advisories

    assert advisories(load_config(None, ["atat.beta0=1.0"])) == []
    assert advisories(load_config(None, ["atat.beta0=2.0", "atat.enabled=false"])) == []
    (line,) = advisories(load_config(None, ["atat.beta0=2.0"]))
    assert "atat.beta0=2" in line and "403x" in line
    with pytest.raises(ConfigError, match="atat.uniform_every"):
        load_config(None, ["atat.uniform_every=1"])


def test_choices_are_literal_types_the_config_and_the_cli_read():
    """One place per choice: the config validates from the Literal type, the CLI lists its values."""
    import argparse
    import typing

    from mdlm_atat.cli import build_parser
    from mdlm_atat.config import AtatConfig, SampleOrder, SamplerName, choices
    from mdlm_atat.diffusion.samplers import AR_SAMPLERS, DIFFUSION_SAMPLERS

    hints = typing.get_type_hints(AtatConfig)
    assert choices(hints["masking"]) == ("importance", "inverse", "balanced", "uniform")
    with pytest.raises(ConfigError, match="^atat.masking: 'tilted' is not one of importance, inverse"):
        load_config(None, ["atat.masking=tilted"])
    with pytest.raises(ConfigError, match=r"^training.strategy: expected one of auto, ddp, fsdp, none, got 3$"):
        load_config(None, ["training.strategy=3"])
    with pytest.raises(ConfigError, match=r"^training.mixed_precision: expected one of bf16, fp32, got False \(YAML"):
        load_config(None, ["training.mixed_precision=no"])  # YAML 1.1: `no` is a boolean
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["sample"]
    options = {a.dest: a.choices for a in sub._actions}
    assert tuple(options["sampler"]) == choices(SamplerName) == DIFFUSION_SAMPLERS + AR_SAMPLERS
    assert tuple(options["order"]) == choices(SampleOrder)


def test_train_derives_the_vocab_size_without_changing_the_config_it_is_given(tiny_config, tmp_path):
    from mdlm_atat.train.checkpoint import load_checkpoint
    from mdlm_atat.train.trainer import train

    cfg = tiny_config()
    before = cfg.to_dict()
    train(cfg, tmp_path / "run", max_steps=1)
    assert cfg.to_dict() == before and cfg.model.vocab_size is None
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["model"]["vocab_size"]
    assert isinstance(saved, int) and saved > 0  # the run records the tokenizer's
