"""Malformed configs meet only ConfigError: one line that starts with the key (issue 8, bad input).

Property tests (hypothesis) throw random nested values, random keys, mutations of valid configs, random
`key=value` overrides and random YAML text at the loader. Whatever comes in, the loader returns a Config or raises
a ConfigError whose message is one line; when a single known key was broken, the message starts with a key.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdlm_atat.config import Config, ConfigError, from_dict, load_config

SECTIONS = {f.name: [k.name for k in dataclasses.fields(f.default_factory())] for f in dataclasses.fields(Config)}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]

# ATAT_FUZZ_EXAMPLES=5000 for a longer hunt; 150 keeps the suite fast.
FUZZ = settings(
    max_examples=int(os.environ.get("ATAT_FUZZ_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["auto", "cpu", "bf16", "tiny", "default", "none", "1e-4", "1e999", ".nan", "null", "[1", "@"])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(list(SECTIONS)) | st.text(max_size=8) | st.integers() | st.none() | st.booleans()


def known_key_prefix(message: str) -> bool:
    head = message.split(":", 1)[0]
    return head in KEYS or head in SECTIONS


def outcome(build) -> Config | ConfigError:
    try:
        return build()
    except ConfigError as err:
        assert "\n" not in str(err), repr(str(err))
        return err


@FUZZ
@given(st.dictionaries(keys, values | st.dictionaries(st.sampled_from(KEYS[:40]) | st.text(max_size=8), values),
                       max_size=4) | values)
def test_random_structures_give_a_config_or_a_config_error(raw):
    outcome(lambda: from_dict(raw))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3))
def test_wrong_values_for_real_keys_name_a_key(changes):
    raw: dict = {}
    for key, value in changes:
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    result = outcome(lambda: from_dict(raw))
    if isinstance(result, ConfigError):
        assert known_key_prefix(str(result)), str(result)


@FUZZ
@given(st.lists(st.sampled_from(KEYS) | st.text(max_size=10), max_size=3), st.lists(st.text(max_size=10), max_size=3))
def test_random_overrides_give_a_config_or_a_config_error(names, texts):
    overrides = [f"{name}={text}" for name, text in zip(names, texts)] + texts[len(names):]
    outcome(lambda: load_config(None, overrides))


@FUZZ
@given(st.text(max_size=60) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_random_yaml_files_give_a_config_or_a_config_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") if text.isascii() else text.encode("latin-1", "replace"))
        outcome(lambda: load_config(path))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["training.learning_rate=1e999"], "training.learning_rate"),  # inf
        (["training.learning_rate=.nan"], "training.learning_rate"),
        (["training.learning_rate=[1"], "training.learning_rate"),  # not YAML
        (["model.hidden_dim=@x"], "model.hidden_dim"),
        (["training.max_nonfinite_steps=0"], "training.max_nonfinite_steps"),
        (["logging.tensorboard=maybe"], "logging.tensorboard"),
    ],
)
def test_found_by_fuzzing(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_non_string_keys_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="^1: unknown section"):
        from_dict({1: {}, "model": {}})
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing, ["training.seed=1"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin)
