"""Save and restore converted params with orbax-checkpoint.

A converted checkpoint is a directory::

    <dir>/jpaged.json   {"format": "jpaged-converted", "version": 1,
                         "architecture": ..., "dtype": ..., "hf_config": {...}}
    <dir>/params/       the param pytree, written by orbax
    <dir>/tokenizer/    the tokenizer (save_pretrained), when there is one

Restoring reads the arrays straight into the default device in the saved
dtype, which is much faster than converting the source weights again.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np

MARKER = "jpaged.json"
FORMAT = "jpaged-converted"
VERSION = 1


class ConvertedCheckpoint(NamedTuple):
    params: Any          # pytree of jax arrays
    hf_config: dict
    tokenizer: Any       # transformers tokenizer or None
    architecture: str
    dtype: str


def is_converted_dir(path) -> bool:
    """True when ``path`` is a directory written by save_converted."""
    return (pathlib.Path(path) / MARKER).is_file()


def save_converted(directory, params, hf_config: dict, tokenizer=None, *,
                   architecture: str | None = None) -> pathlib.Path:
    """Writes params (+ config, + tokenizer) to ``directory``, replacing it.

    Args:
      directory:    where to write; created, or replaced if it holds a
                    previous converted checkpoint.
      params:       pytree of arrays (all one floating dtype).
      hf_config:    the Hugging Face config dict the params belong to.
      tokenizer:    a transformers tokenizer (saved with save_pretrained) or None.
      architecture: HF architecture name; default hf_config["architectures"][0].
    Returns:
      the directory as an absolute path.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().absolute()
    if directory.exists():
        if not directory.is_dir() or (any(directory.iterdir())
                                      and not is_converted_dir(directory)):
            raise ValueError(f"{directory} exists and is not a converted checkpoint; "
                             "refusing to overwrite it (pick an empty or new directory)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"params must share one dtype, got {sorted(dtypes)}")
    if architecture is None:
        architecture = (hf_config.get("architectures") or [None])[0]
    if not architecture:
        raise ValueError("hf_config has no 'architectures' entry; pass architecture=")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
        ckptr.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
    meta = {"format": FORMAT, "version": VERSION, "architecture": architecture,
            "dtype": dtypes.pop(), "hf_config": hf_config}
    # NOTE: the marker is written last, so a crash mid-save leaves a directory
    # that is_converted_dir() rejects.
    (directory / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def read_meta(directory) -> dict:
    directory = pathlib.Path(directory)
    if not is_converted_dir(directory):
        raise FileNotFoundError(f"{directory} is not a converted checkpoint "
                                f"(no {MARKER}); write one with scripts/convert.py")
    meta = json.loads((directory / MARKER).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{directory / MARKER}: unsupported format "
                         f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def load_converted(directory, abstract_params=None) -> ConvertedCheckpoint:
    """Restores what save_converted wrote.

    Args:
      directory:       the checkpoint directory.
      abstract_params: optional pytree of jax.ShapeDtypeStruct to restore
                       into (shapes are checked against it); default: the
                       saved tree, placed on the default device.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().absolute()
    meta = read_meta(directory)
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_params is None:
            saved = ckptr.metadata(directory / "params").item_metadata
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            abstract_params = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
        params = ckptr.restore(directory / "params", abstract_params)
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    return ConvertedCheckpoint(params=params, hf_config=meta["hf_config"], tokenizer=tokenizer,
                               architecture=meta["architecture"], dtype=meta["dtype"])
