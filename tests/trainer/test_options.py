"""RunOptions, the one declaration of the run flags: the CLI derived from it, its checks, and
the flag combinations a Cerebras command line may carry."""

from __future__ import annotations

import dataclasses

import pytest

from tests.helpers import small_config
from wsjax.errors import ConfigError
from wsjax.train import build_parser, main
from wsjax.trainer import RunOptions, Trainer
from wsjax.trainer.options import options_from_args


def test_every_option_is_a_flag_and_parses_back():
    """Each CLI field of RunOptions is a flag, and parsing it gives the field back."""
    values = {
        "mode": "eval",
        "model_dir": "runs/x",
        "compile_dir": "cache",
        "max_steps": 7,
        "eval_steps": 0,
        "save_checkpoints_steps": 3,
        "save_summary_steps": 2,
        "keep_checkpoint_max": 0,
        "checkpoint_path": "ck",
        "eval_text": "t.txt",
        "disk_path": "tier",
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
    }
    fields = [f for f in dataclasses.fields(RunOptions) if f.metadata.get("cli", True)]
    switches = [f.name for f in fields if f.type == "bool"]
    argv = [f"--{k}={v}" for k, v in values.items()] + [f"--{name}" for name in switches]
    # every switch but the pretrained one is independent; that one needs --checkpoint_path,
    # which values gives
    options = options_from_args(build_parser().parse_intermixed_args(argv))
    assert {f.name for f in fields} == set(values) | {"steps", *switches}
    for k, v in values.items():
        assert str(getattr(options, k)) == str(v), k
    assert all(getattr(options, name) is True for name in switches)
    assert {"is_pretrained_checkpoint", "allow_pickle", "validate_only", "compile_only"} <= set(
        switches
    )


def test_hyphenated_and_cerebras_spellings():
    p = build_parser()
    for flag in ("--compile-only", "--compile_only"):
        assert options_from_args(p.parse_intermixed_args([flag])).compile_only
    for flag in ("--validation-only", "--validation_only", "--validate-only", "--validate_only"):
        assert options_from_args(p.parse_intermixed_args([flag])).validate_only
    assert options_from_args(p.parse_intermixed_args(["--max-steps", "4"])).max_steps == 4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"steps": 0}, "--steps 0 is invalid"),
        ({"steps": 2, "max_steps": 3}, "exclude each other"),
        ({"max_steps": 0}, "--max_steps 0 is invalid: must be >= 1"),
        ({"save_summary_steps": 0}, "--save_summary_steps 0 is invalid"),
        ({"mode": "fit"}, "unknown mode 'fit'"),
        ({"is_pretrained_checkpoint": True}, "give --checkpoint_path too"),
        ({"mode": "train", "eval_text": "x.txt"}, "--eval_text needs -m eval or eval_all"),
    ],
)
def test_invalid_options_are_one_line(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        RunOptions(**kwargs)


def test_runconfig_flags_override_and_zero_is_a_value():
    cfg = small_config("runconfig.keep_checkpoint_max=2")
    t = Trainer(cfg, RunOptions(keep_checkpoint_max=0, max_steps=3))
    assert t.config.runconfig.keep_checkpoint_max == 0 and t.config.runconfig.max_steps == 3
    assert Trainer(cfg).config.runconfig.keep_checkpoint_max == 2


def test_pretrained_without_checkpoint_path_exits_2(tmp_path, capsys):
    code = main(["-o", str(tmp_path / "m"), "--is_pretrained_checkpoint"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--checkpoint_path" in err[0]
    assert not (tmp_path / "m").exists()  # refused before anything is written


def test_validate_only_and_compile_only_together_do_both(tmp_path, own_compile_dir):
    """The verdict of the plan (validate) and the executables in the cache (compile)."""
    md = tmp_path / "both"
    options = RunOptions(validate_only=True, compile_only=True)
    result = Trainer(small_config(), options, md).run()
    assert (md / "plan.json").is_file()
    assert "compile_only" in result.message
    assert list(md.glob("compile_*/compile_log.json")), "nothing compiled"
    assert not list(md.glob("model-ckpt-*"))  # no weights, no training
