"""The scripts' engine flags come from EngineConfig's fields (jpaged.engine_args)."""
import argparse
import dataclasses

import pytest

from jpaged.config import EngineConfig
from jpaged.engine_args import add_engine_args, field_docs, llm_kwargs


def _parser():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p


def test_every_field_has_a_flag_and_a_doc():
    docs = field_docs()
    flags = {a.dest for a in _parser()._actions}
    for f in dataclasses.fields(EngineConfig):
        assert docs.get(f.name), f"EngineConfig's docstring has no doc for {f.name}"
        dest = "no_" + f.name if f.default is True else f.name
        assert dest in flags, f"no flag for {f.name}"
    assert "random_weights" in flags


def test_the_help_formats():
    """argparse formats every help with %: a field doc with a literal one
    (data_parallel_size's "i % N") crashed --help."""
    text = _parser().format_help()
    assert "host i % N" in text and "--long-prefill-token-threshold" in text


def test_flags_round_trip_to_the_config():
    # No flags: EngineConfig's defaults, but the scripts' context limit.
    kw = llm_kwargs(_parser().parse_args([]))
    assert EngineConfig(**kw) == dataclasses.replace(EngineConfig(), max_model_len=2048)
    args = _parser().parse_args(
        ["--max-num-seqs", "4", "--no-async-scheduling", "--enable-prefix-caching",
         "--max-model-len", "0", "--preemption-mode", "swap", "--watermark", "0.05",
         "--decode-window-idle-s", "0", "--max-decode-window", "4", "--dtype", "float32",
         "--tensor-parallel-size", "2", "--data-parallel-size", "3"])
    cfg = EngineConfig(**llm_kwargs(args))
    assert (cfg.max_num_seqs, cfg.async_scheduling, cfg.enable_prefix_caching,
            cfg.max_model_len, cfg.preemption_mode, cfg.watermark, cfg.decode_window_idle_s,
            cfg.max_decode_window, cfg.dtype) == (4, False, True, None, "swap", 0.05, 0.0, 4,
                                                  "float32")
    assert (cfg.tensor_parallel_size, cfg.data_parallel_size) == (2, 3)


def test_parallel_flags_share_a_group():
    p = _parser()
    group = next(g for g in p._action_groups if g.title.startswith("parallelism"))
    assert {a.dest for a in group._group_actions} >= {"tensor_parallel_size",
                                                      "data_parallel_size"}
    assert "fewest unfinished requests" in next(
        a.help for a in group._group_actions if a.dest == "data_parallel_size")


@pytest.mark.parametrize("argv, match", [(["--dtype", "int8"], "invalid choice"),
                                         (["--block-size", "x"], "invalid int value")])
def test_bad_flags_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert match in capsys.readouterr().err
