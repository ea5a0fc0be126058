"""Save and restore converted params with orbax-checkpoint.

A converted checkpoint is a directory::

    <dir>/jpaged.json   {"format": "jpaged-converted", "version": 1,
                         "architecture": ..., "dtype": ..., "hf_config": {...}}
    <dir>/params/       the param pytree, written by orbax
    <dir>/tokenizer/    the tokenizer (save_pretrained), when there is one

Restoring reads the arrays straight into the default device in the saved
dtype (stored uncompressed, so it runs at disk speed).
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
    # NOTE: uncompressed: restoring then runs at disk speed (zstd halved it).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(directory / "params", params)
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
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        if abstract_params is None:
            abstract_params = ckptr.metadata(directory / "params").item_metadata.tree

        def restore_arg(a):
            # The saved sharding metadata names the saving machine's devices;
            # place on this machine's default device unless told otherwise.
            target = getattr(a, "sharding", None)
            if not isinstance(target, jax.sharding.Sharding):
                target = sharding
            return ocp.ArrayRestoreArgs(sharding=target, dtype=a.dtype,
                                        global_shape=tuple(a.shape))

        restore_args = jax.tree.map(restore_arg, abstract_params)
        params = ckptr.restore(directory / "params",
                               args=ocp.args.PyTreeRestore(restore_args=restore_args))
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    return ConvertedCheckpoint(params=params, hf_config=meta["hf_config"], tokenizer=tokenizer,
                               architecture=meta["architecture"], dtype=meta["dtype"])
