"""Every numeric option of every verb, given 0, a negative, a huge number or no number at all: one line on stderr,
exit 2, nothing written (issue 19: `atat eval --num-t -3` was a traceback, `--num-t 0` silently meant 4,
`atat train --max-steps 0` made an empty run, `atat sample --stride 0` meant 63)."""

from __future__ import annotations

import pytest

from mdlm_atat.cli import build_parser, main

# verb -> (the arguments it needs besides the option, {option: whether 0 is a valid value})
NUMERIC = {
    "train": (["--config", "c.yaml", "--log-dir", "run"], {"--max-steps": False}),
    "eval": (["--checkpoint", "ckpt.pt"], {"--num-t": False, "--batch-size": False, "--max-batches": True,
                                           "--seed": True}),
    "sample": (["--checkpoint", "ckpt.pt"], {"--steps": False, "--num-samples": False, "--batch-size": False,
                                             "--seed": True, "--length": False, "--stride": False}),
    "prepare": ([], {}),
    "report": (["run"], {}),
    "export": (["--checkpoint", "ckpt.pt", "--out", "out"], {}),
    "import": (["--mdlm", "mdlm-owt", "--out", "out"], {}),
}
CASES = [(verb, option, value) for verb, (_, options) in NUMERIC.items() for option, zero_ok in options.items()
         for value in (["-5", "10" * 15, "abc", "1.5", "", "1e3"] + ([] if zero_ok else ["0"]))]


def test_every_numeric_option_is_listed_and_range_checked():
    """A numeric option added to a verb must be added here too, with a range (cli.count), not a bare int."""
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb, sub in verbs.items():
        if verb == "download":
            continue
        numeric = {a.option_strings[0]: a.type.__name__ for a in sub._actions
                   if getattr(a.type, "__name__", "") in ("int", "count")}
        assert set(numeric) == set(NUMERIC[verb][1]), verb
        assert set(numeric.values()) <= {"count"}, (verb, numeric)
    # The valid edges still parse: 0 where 0 means something, the largest seed.
    args = parser.parse_args(["eval", "--checkpoint", "c", "--max-batches", "0", "--seed", "0", "--num-t", "4096"])
    assert (args.max_batches, args.seed, args.num_t) == (0, 0, 4096)
    args = parser.parse_args(["sample", "--checkpoint", "c", "--stride", "1", "--length", "1",
                              "--seed", str(2**63 - 1)])
    assert (args.stride, args.length, args.seed) == (1, 1, 2**63 - 1)


@pytest.mark.parametrize("verb, option, value", CASES)
def test_bad_numbers_are_one_line_and_write_nothing(verb, option, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # a cache under ~ would show up here too
    with pytest.raises(SystemExit) as exit_:
        main([verb, *NUMERIC[verb][0], f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"atat {verb}: error: argument {option}: "), err
    assert list(tmp_path.iterdir()) == []

