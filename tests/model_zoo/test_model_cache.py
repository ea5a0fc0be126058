"""The converted-weights cache: atomic saves, content checks on load, and the
default model's cache rebuilt from its GGUF when it is partial or corrupt."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import models
from models import checkpoint, convert, gguf
from tiny import LLAMA


@pytest.fixture(scope="module")
def tiny():
    return models.random_model(LLAMA, seed=1)


@pytest.fixture(scope="module")
def other():
    return models.random_model(LLAMA, seed=2)


def _same_params(a, b) -> bool:
    fa, fb = convert.flatten_params(a), convert.flatten_params(b)
    return fa.keys() == fb.keys() and all(
        np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def _save(model, directory) -> pathlib.Path:
    return checkpoint.save_converted(directory, model.params, model.hf_config)


def _siblings(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in (directory / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _overwrite_bytes(path: pathlib.Path, offset: int = 100, data: bytes = b"\x7f" * 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _q(path) -> str:
    """``path`` as a regex matching itself."""
    return re.escape(str(path))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------
# Atomic save


def test_interrupted_save_leaves_nothing(tmp_path, tiny, monkeypatch):
    """A save that fails after orbax wrote the params leaves no directory and
    no temporary sibling behind, and a later save works."""
    out = tmp_path / "ckpt"

    def fail(directory):
        assert (directory / "params").is_dir()  # params were written
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_checksums", fail)
    with pytest.raises(KeyboardInterrupt):
        _save(tiny, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    _save(tiny, out)
    assert _same_params(checkpoint.load_converted(out).params, tiny.params)


def test_interrupted_replacement_keeps_the_old_checkpoint(tmp_path, tiny, other, monkeypatch):
    out = _save(tiny, tmp_path / "ckpt")
    monkeypatch.setattr(checkpoint, "_checksums", lambda d: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _save(other, out)
    assert _siblings(out) == []
    assert _same_params(checkpoint.load_converted(out).params, tiny.params)


def test_replacing_an_older_checkpoint(tmp_path, tiny, other):
    out = _save(tiny, tmp_path / "ckpt")
    assert _save(other, out) == out
    assert _siblings(out) == []
    assert _same_params(checkpoint.load_converted(out).params, other.params)


def test_concurrent_writer_that_loses_keeps_the_winners(tmp_path, tiny, other, monkeypatch):
    """Two first-time saves race: the one that renames second keeps the winner's."""
    out = tmp_path / "ckpt"
    real = checkpoint._checksums
    raced = []

    def winner_finishes_first(directory):
        if not raced:
            raced.append(True)
            _save(other, out)  # the other process's whole save
        return real(directory)

    monkeypatch.setattr(checkpoint, "_checksums", winner_finishes_first)
    assert _save(tiny, out) == out
    assert raced and _siblings(out) == []
    assert _same_params(checkpoint.load_converted(out).params, other.params)


def test_temp_dirs_of_dead_writers_are_removed(tmp_path, tiny):
    out = tmp_path / "ckpt"
    host = checkpoint._HOST
    dead = tmp_path / f".ckpt.tmp-{host}-{_dead_pid()}-0123abcd"
    alive = tmp_path / f".ckpt.tmp-{host}-{os.getpid()}-0123abcd"
    remote = tmp_path / f".ckpt.tmp-elsewhere-{_dead_pid()}-0123abcd"
    for d in (dead, alive, remote):
        (d / "params").mkdir(parents=True)
    _save(tiny, out)
    assert _siblings(out) == sorted([alive.name, remote.name])
    assert _same_params(checkpoint.load_converted(out).params, tiny.params)


def test_non_checkpoint_directory_is_refused_and_kept(tmp_path, tiny):
    """A directory a user passed that holds anything but a checkpoint is never
    deleted, neither by saving over it nor by loading it."""
    user = tmp_path / "mine"
    (user / "params").mkdir(parents=True)
    (user / "params" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a converted checkpoint.*refusing to overwrite"):
        _save(tiny, user)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(user)
    assert (user / "params" / "notes.txt").read_text() == "keep"
    assert _siblings(user) == []


# ----------------------------------------------------------------------------
# Content checks on load


def test_overwritten_bytes_are_detected(tmp_path, tiny):
    out = _save(tiny, tmp_path / "ckpt")
    victim = _largest_file(out)
    _overwrite_bytes(victim)
    rel = victim.relative_to(out).as_posix()
    with pytest.raises(ValueError, match=rf"{_q(out)} is corrupt: 1 file\(s\) differ .*{_q(rel)}.*"
                                         rf"delete {_q(out)} .*scripts/convert.py"):
        models.load_model(out)
    assert victim.is_file()  # a user's directory is reported, never deleted


def test_truncated_and_missing_files_are_named(tmp_path, tiny, capfd):
    out = _save(tiny, tmp_path / "ckpt")
    victim = _largest_file(out)
    rel = victim.relative_to(out).as_posix()
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=rf"incomplete .*truncated or resized: {_q(rel)} "
                                         rf"\({size - 10} bytes, saved {size}\)"):
        checkpoint.load_converted(out)
    victim.unlink()
    (out / "params" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=rf"{_q(out)} is an incomplete converted checkpoint "
                                         rf"\(missing: .*params/_METADATA.*delete {_q(out)}"):
        models.load_model(out)
    (out / "params").rename(out / "elsewhere")
    with pytest.raises(ValueError, match="params/ is missing"):
        models.load_model(out)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_checkpoint_without_checksums_still_loads(tmp_path, tiny, capfd):
    """Checkpoints written before checksums load unchecked; a missing metadata
    file is still named, without orbax's asyncio tracebacks."""
    out = _save(tiny, tmp_path / "ckpt")
    meta = json.loads((out / checkpoint.MARKER).read_text())
    del meta["checksums"]
    (out / checkpoint.MARKER).write_text(json.dumps(meta))
    assert _same_params(models.load_model(out).params, tiny.params)
    (out / "params" / "_METADATA").unlink()
    with pytest.raises(ValueError, match=rf"{_q(out)} is an incomplete converted checkpoint: "
                                         r"params/_METADATA missing"):
        models.load_model(out)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_corrupt_marker(tmp_path, tiny):
    out = _save(tiny, tmp_path / "ckpt")
    (out / checkpoint.MARKER).write_text('{"format": "jpaged-converted",\n  "version": ')
    with pytest.raises(ValueError, match=rf"{_q(out / checkpoint.MARKER)} is not valid JSON"
                                         r": .* at line 2 column 14; delete"):
        models.load_model(out)
    (out / checkpoint.MARKER).write_text(json.dumps({"format": checkpoint.FORMAT,
                                                     "version": checkpoint.VERSION}))
    with pytest.raises(ValueError, match=r"lacks the keys \['architecture', 'dtype', "
                                         r"'hf_config'\]"):
        models.load_model(out)


# ----------------------------------------------------------------------------
# The default model's cache


@pytest.fixture
def default_cache(tmp_path, monkeypatch, tiny):
    """$JPAGED_CACHE in tmp_path; "converting the GGUF" returns the tiny model
    and counts the calls."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("JPAGED_CACHE", str(cache))
    monkeypatch.setattr(gguf, "find_default_model", lambda name: tmp_path / "fake.gguf")
    calls = []

    def fake_convert(path, dtype):
        assert path == tmp_path / "fake.gguf"
        calls.append(path)
        return tiny.hf_config, tiny.params, None

    monkeypatch.setattr(models, "_convert_source", fake_convert)
    return cache / "smollm2-135m", calls


def _load_default_rebuilt(cached, tiny):
    with pytest.warns(UserWarning, match=rf"converted cache {_q(cached)} of 'smollm2-135m' is "
                                         r"unusable, rebuilding it from the GGUF"):
        model = models.load_model("smollm2-135m")
    assert _same_params(model.params, tiny.params)
    assert checkpoint.is_converted_dir(cached) and _siblings(cached) == []


def test_partial_default_cache_is_rebuilt(default_cache, tiny):
    """A directory that an interrupted, non-atomic conversion left (params but
    no marker, orbax's own temp dir) is replaced by a fresh conversion."""
    cached, calls = default_cache
    (cached / "params" / "d").mkdir(parents=True)
    (cached / "params" / "d" / "0123").write_bytes(b"half")
    (cached / "params.orbax-checkpoint-tmp-1700000000").mkdir()
    _load_default_rebuilt(cached, tiny)
    assert len(calls) == 1
    models.load_model("smollm2-135m")
    assert len(calls) == 1


def test_corrupt_default_cache_is_rebuilt(default_cache, tiny):
    cached, calls = default_cache
    models.load_model("smollm2-135m")
    _overwrite_bytes(_largest_file(cached))
    _load_default_rebuilt(cached, tiny)
    (cached / checkpoint.MARKER).write_text("{")
    _load_default_rebuilt(cached, tiny)
    (cached / "params" / "_METADATA").unlink()
    _load_default_rebuilt(cached, tiny)
    assert len(calls) == 4


def test_interrupted_first_conversion_does_not_block(default_cache, tiny, monkeypatch):
    cached, calls = default_cache
    real = checkpoint._checksums
    monkeypatch.setattr(checkpoint, "_checksums", lambda d: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        models.load_model("smollm2-135m")
    assert not cached.exists()
    (cached.parent / f".{cached.name}.tmp-{checkpoint._HOST}-{_dead_pid()}-89abcdef").mkdir()
    monkeypatch.setattr(checkpoint, "_checksums", real)
    assert _same_params(models.load_model("smollm2-135m").params, tiny.params)
    assert len(calls) == 2 and _siblings(cached) == []


def test_foreign_files_in_the_default_cache_are_kept(default_cache):
    cached, calls = default_cache
    cached.mkdir(parents=True)
    (cached / "weights.bin").write_text("mine")
    with pytest.raises(ValueError, match=rf"{_q(cached)} is where jpaged caches 'smollm2-135m', "
                                         "but it holds files jpaged did not write"):
        models.load_model("smollm2-135m")
    assert (cached / "weights.bin").read_text() == "mine" and calls == []


# ----------------------------------------------------------------------------
# transformers' torch advisory


def test_no_torch_advisory_when_jpaged_imports_transformers():
    """Importing the models (and through them transformers) prints no
    "PyTorch was not found" advisory; transformers' other warnings still show."""
    code = ("import models, models.tokenizer\n"
            "from transformers.utils import logging\n"
            "logging.get_logger('transformers').warning('another transformers warning')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_VERBOSITY")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=pathlib.Path(__file__).resolve().parents[2], check=True)
    assert "PyTorch was not found" not in run.stderr
    assert "another transformers warning" in run.stderr
    plain = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True,
                           text=True, env=env, check=True)
    try:
        import torch  # noqa: F401
    except ImportError:  # without jpaged's filter transformers does print it
        assert "PyTorch was not found" in plain.stderr

