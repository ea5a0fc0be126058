"""Save and restore converted params with orbax-checkpoint.

A converted checkpoint is a directory::

    <dir>/jpaged.json   {"format": "jpaged-converted", "version": 2,
                         "architecture": ..., "dtype": ..., "hf_config": {...},
                         "checksums": {"algorithm": "crc32", "chunk_bytes": ...,
                                       "files": {"params/...": {"size": ...,
                                                                "crc32": [...]}}}}
    <dir>/params/       the param pytree, written by orbax
    <dir>/tokenizer/    the tokenizer (save_pretrained), when there is one

Saving is atomic: everything is written into a hidden sibling
``.<name>.tmp-<host>-<pid>-<random>`` that is renamed to ``<dir>`` once
complete, so ``<dir>`` is either absent, the old checkpoint or the new one.
Temporary siblings left by a killed writer are removed by the next save on
the same host.

Loading checks that every file the marker lists is there at its size before
orbax opens any (a missing one otherwise ends in TensorStore errors and
asyncio tracebacks), and their CRC-32s while orbax reads the arrays straight
into the default device in the saved dtype (stored uncompressed, so it runs
at disk speed). Checkpoints written before checksums existed load unchecked.

Versions: 2 stores the params as the modules hold them, with q/k/v and
gate/up fused (models.convert.Fused); 1 (older jpaged) stored those
projections apart, and models.load_model fuses them after the restore.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import numpy as np

MARKER = "jpaged.json"
FORMAT = "jpaged-converted"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: q/k/v and gate/up apart (fused on load by models)
CHECKSUM_CHUNK_BYTES = 64 << 20  # per-chunk CRCs let several threads check one big file
_REQUIRED_META = ("architecture", "dtype", "hf_config")


class ConvertedCheckpoint(NamedTuple):
    params: Any          # pytree of jax arrays
    hf_config: dict
    tokenizer: Any       # transformers tokenizer or None
    architecture: str
    dtype: str
    version: int = VERSION  # of the saved layout (SUPPORTED_VERSIONS)


def is_converted_dir(path) -> bool:
    """True when ``path`` is a directory written by save_converted."""
    return (pathlib.Path(path) / MARKER).is_file()


def _redo_hint(directory) -> str:
    """What a user does about a broken converted checkpoint at ``directory``."""
    return (f"delete {directory} and convert the model again (scripts/convert.py "
            f"--model ... --out {directory})")


# ----------------------------------------------------------------------------
# Checksums


_local = threading.local()


def _crc_range(path: pathlib.Path, offset: int, length: int) -> int:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(4 << 20))
    crc = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            n = f.readinto(buf[:min(length, len(buf))])
            if not n:
                break
            crc = zlib.crc32(buf[:n], crc)
            length -= n
    return crc


def _file_crcs(directory: pathlib.Path, sizes: dict[str, int], chunk: int) -> dict[str, list]:
    """CRC-32 of each ``chunk``-byte piece of every file (relative path -> size)."""
    jobs = [(rel, offset) for rel, size in sizes.items()
            for offset in range(0, max(size, 1), chunk)]
    # NOTE: zlib.crc32 releases the GIL on large buffers, so threads scale.
    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        crcs = list(pool.map(lambda job: _crc_range(directory / job[0], job[1], chunk), jobs))
    out: dict[str, list] = {rel: [] for rel in sizes}
    for (rel, _), crc in zip(jobs, crcs):
        out[rel].append(crc)
    return out


def _checksums(directory: pathlib.Path) -> dict:
    sizes = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER}
    crcs = _file_crcs(directory, sizes, CHECKSUM_CHUNK_BYTES)
    return {"algorithm": "crc32", "chunk_bytes": CHECKSUM_CHUNK_BYTES,
            "files": {rel: {"size": size, "crc32": crcs[rel]} for rel, size in sizes.items()}}


def _listing(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_present(directory: pathlib.Path, meta: dict) -> None:
    """Raises ValueError unless every file the marker lists is there at its saved size."""
    checksums = meta.get("checksums")
    if checksums is None:  # written before checksums: orbax needs at least these
        needed = ["params/_METADATA", "params/manifest.ocdbt"]
        missing = [rel for rel in needed if not (directory / rel).is_file()]
        if missing:
            raise ValueError(f"{directory} is an incomplete converted checkpoint: "
                             f"{_listing(missing)} missing; {_redo_hint(directory)}")
        return
    files = checksums.get("files") if isinstance(checksums, dict) else None
    if (not isinstance(files, dict) or checksums.get("algorithm") != "crc32"
            or not all(isinstance(e, dict) and {"size", "crc32"} <= e.keys()
                       for e in files.values())):
        raise ValueError(f"{directory / MARKER}: unreadable or unsupported checksums; "
                         f"{_redo_hint(directory)}")
    missing, resized = [], []
    for rel, entry in checksums["files"].items():
        path = directory / rel
        if not path.is_file():
            missing.append(rel)
        elif path.stat().st_size != entry["size"]:
            resized.append(f"{rel} ({path.stat().st_size} bytes, saved {entry['size']})")
    if missing or resized:
        what = "; ".join(([f"missing: {_listing(missing)}"] if missing else [])
                         + ([f"truncated or resized: {_listing(resized)}"] if resized else []))
        raise ValueError(f"{directory} is an incomplete converted checkpoint ({what}); "
                         f"{_redo_hint(directory)}")


def _check_contents(directory: pathlib.Path, meta: dict) -> None:
    """Raises ValueError if a file's CRC-32s differ from the marker's (after _check_present)."""
    checksums = meta.get("checksums")
    if checksums is None:
        return
    files = checksums["files"]
    crcs = _file_crcs(directory, {rel: e["size"] for rel, e in files.items()},
                      int(checksums["chunk_bytes"]))
    changed = [rel for rel, entry in files.items() if crcs[rel] != list(entry["crc32"])]
    if changed:
        raise ValueError(f"{directory} is corrupt: {len(changed)} file(s) differ from the "
                         f"checksums saved with them ({_listing(changed)}); "
                         f"{_redo_hint(directory)}")


# ----------------------------------------------------------------------------
# Atomic writes


_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _sibling(directory: pathlib.Path, kind: str) -> pathlib.Path:
    return directory.with_name(f".{directory.name}.{kind}-{_HOST}-{os.getpid()}-"
                               f"{secrets.token_hex(4)}")


def _remove(path: pathlib.Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_writes(directory) -> None:
    """Deletes temporary siblings of ``directory`` left by dead writers on this host.

    A writer on another host (a shared file system) is never judged dead.
    """
    directory = pathlib.Path(directory)
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(tmp|old)-(?P<host>.+)-"
                         r"(?P<pid>\d+)-[0-9a-f]{8}")
    if not directory.parent.is_dir():
        return
    for path in directory.parent.iterdir():
        m = pattern.fullmatch(path.name)
        if m and m["host"] == _HOST and not _pid_alive(int(m["pid"])):
            _remove(path)


def _target_holds_checkpoint(directory: pathlib.Path) -> bool:
    """True if ``directory`` is a converted checkpoint, False if absent or empty."""
    if not directory.exists():
        return False
    if not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; refusing to overwrite "
                         "it (pick a new directory)")
    if is_converted_dir(directory):
        return True
    if any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not a converted checkpoint (no {MARKER}); "
                         "refusing to overwrite it: pick an empty or new directory, or "
                         "delete it if an interrupted conversion left it")
    return False


def _move_into_place(tmp: pathlib.Path, directory: pathlib.Path, replace: bool) -> None:
    old = None
    if replace:
        old = _sibling(directory, "old")
        try:
            os.rename(directory, old)
        except FileNotFoundError:  # another writer moved it aside first
            old = None
    try:
        os.rename(tmp, directory)  # NOTE: rename(2) also replaces an empty directory
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if not is_converted_dir(directory):
            raise ValueError(f"{directory} appeared during the save and is not a converted "
                             "checkpoint; refusing to overwrite it") from None
        # NOTE: a concurrent writer renamed its checkpoint into place first; it
        # holds the same conversion, so keep it and drop ours (the caller does).
    finally:
        if old is not None:
            _remove(old)


def save_converted(directory, params, hf_config: dict, tokenizer=None, *,
                   architecture: str | None = None) -> pathlib.Path:
    """Writes params (+ config, + tokenizer, + checksums) to ``directory`` atomically.

    Args:
      directory:    where to write; created, or replaced if it holds a
                    previous converted checkpoint (anything else is refused).
      params:       pytree of arrays (all one floating dtype).
      hf_config:    the Hugging Face config dict the params belong to.
      tokenizer:    a transformers tokenizer (saved with save_pretrained) or None.
      architecture: HF architecture name; default hf_config["architectures"][0].
    Returns:
      the directory as an absolute path. When a concurrent save of the same
      directory finished first, its checkpoint is kept and this one dropped.
    """
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().absolute()
    dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
    if len(dtypes) != 1:
        raise ValueError(f"params must share one dtype, got {sorted(dtypes)}")
    if architecture is None:
        architecture = (hf_config.get("architectures") or [None])[0]
    if not architecture:
        raise ValueError("hf_config has no 'architectures' entry; pass architecture=")
    replace = _target_holds_checkpoint(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_writes(directory)
    tmp = _sibling(directory, "tmp")
    try:
        tmp.mkdir()
        # NOTE: uncompressed: restoring then runs at disk speed (zstd halved it).
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
            ckptr.save(tmp / "params", params)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": FORMAT, "version": VERSION, "architecture": architecture,
                "dtype": dtypes.pop(), "hf_config": hf_config, "checksums": _checksums(tmp)}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _move_into_place(tmp, directory, replace)
    finally:
        if tmp.exists():
            _remove(tmp)
    return directory


# ----------------------------------------------------------------------------
# Loading


def read_meta(directory) -> dict:
    """The marker of a converted checkpoint; FileNotFoundError / ValueError if unusable."""
    directory = pathlib.Path(directory)
    marker = directory / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{directory} is not a converted checkpoint "
                                f"(no {MARKER}); write one with scripts/convert.py")
    from models.convert import read_json_object
    try:
        meta = read_json_object(marker)
    except ValueError as e:
        raise ValueError(f"{e}; {_redo_hint(directory)}") from None
    version = meta.get("version")
    if (meta.get("format") != FORMAT or type(version) is not int
            or version not in SUPPORTED_VERSIONS):
        raise ValueError(f"{marker}: unsupported format "
                         f"{meta.get('format')!r} version {meta.get('version')!r}; "
                         f"{_redo_hint(directory)}")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"{marker} lacks the keys {missing}; {_redo_hint(directory)}")
    return meta


def _restore(directory: pathlib.Path, abstract_params):
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def restore_arg(a):
        # The saved sharding metadata names the saving machine's devices;
        # place on this machine's default device unless told otherwise.
        target = getattr(a, "sharding", None)
        if not isinstance(target, jax.sharding.Sharding):
            target = sharding
        return ocp.ArrayRestoreArgs(sharding=target, dtype=a.dtype,
                                    global_shape=tuple(a.shape))

    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            if abstract_params is None:
                item = ckptr.metadata(directory / "params").item_metadata
                if item is None:
                    raise ValueError("orbax finds no param metadata in params/")
                abstract_params = item.tree
            restore_args = jax.tree.map(restore_arg, abstract_params)
            return ckptr.restore(directory / "params",
                                 args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax / TensorStore raise many types for one cause: bad files
        # TensorStore appends its whole spec after the first line; the chain keeps it.
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{directory}: cannot restore params/ ({type(e).__name__}: {detail}); "
                         f"{_redo_hint(directory)}") from e


def load_converted(directory, abstract_params=None) -> ConvertedCheckpoint:
    """Restores what save_converted wrote, after checking its files.

    Args:
      directory:       the checkpoint directory.
      abstract_params: optional pytree of jax.ShapeDtypeStruct to restore
                       into (shapes are checked against it); default: the
                       saved tree, placed on the default device.
    Raises:
      FileNotFoundError if ``directory`` holds no marker; ValueError naming
      the directory and what is wrong when it is incomplete, corrupt or
      unreadable.
    """
    directory = pathlib.Path(directory).expanduser().absolute()
    meta = read_meta(directory)
    if not (directory / "params").is_dir():
        raise ValueError(f"{directory} is an incomplete converted checkpoint: params/ is "
                         f"missing; {_redo_hint(directory)}")
    _check_present(directory, meta)
    # NOTE: the CRCs run beside orbax's restore (both mostly outside the GIL),
    # so the check costs little wall time; a mismatch wins over orbax's error.
    with ThreadPoolExecutor(1) as pool:
        contents = pool.submit(_check_contents, directory, meta)
        try:
            params = _restore(directory, abstract_params)
        except ValueError:
            contents.result()
            raise
        contents.result()
    tokenizer = None
    if (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
        except Exception as e:  # tokenizers raises a bare Exception for a corrupt file
            raise ValueError(f"{directory / 'tokenizer'}: cannot load the tokenizer ({e}); "
                             f"{_redo_hint(directory)}") from e
    return ConvertedCheckpoint(params=params, hf_config=meta["hf_config"], tokenizer=tokenizer,
                               architecture=meta["architecture"], dtype=meta["dtype"],
                               version=meta["version"])
