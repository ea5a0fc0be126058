"""Hugging Face checkpoints -> our params, driven by a table of rules.

A rule pairs an HF tensor-name template with our param-path template and a
transform, e.g.::

    Rule("model.layers.{i}.self_attn.{proj}.weight",
         "layers_{i}/self_attn/{proj}/kernel", "T")

``{i}`` matches a layer number, any other ``{name}`` one name component. The
converter walks every HF tensor, maps it through the first matching rule,
checks its shape against the module's own abstract params, and collects
every unknown, unexpected, misshapen or missing tensor into one ValueError.

Some of our params are several HF tensors side by side (``Fused``): Llama's
q/k/v projections are one ``qkv_proj`` kernel [hidden, (H + 2 K) * head_dim]
and gate/up one ``gate_up_proj`` [hidden, 2 * intermediate], so a layer runs
one matmul where HF runs three and two. The table still names the HF
tensors one by one (q_proj, k_proj, ...); the converter checks each against
its share of the fused param and concatenates them on the last axis in the
order the ``Fused`` entry lists. ``fuse_columns`` / ``split_columns`` define
that layout, also for tensor parallelism (jpaged.parallel), where each
device's contiguous share holds its own slice of every part.

Readers: ``read_hf_state_dict(dir)`` handles model.safetensors, sharded
safetensors with model.safetensors.index.json, and pytorch_model.bin (with
or without an index; needs torch).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Iterable

import jax.numpy as jnp
import numpy as np

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "id": lambda x: x,
    "T": lambda x: x.T,  # torch Linear [out, in] -> our kernel [in, out]
}


def _template_regex(template: str, sep: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        m = re.fullmatch(r"\{(\w+)\}", part)
        if m is None:
            out.append(re.escape(part))
        elif m.group(1) == "i":
            out.append(r"(?P<i>\d+)")
        else:
            out.append(rf"(?P<{m.group(1)}>[^{re.escape(sep)}]+)")
    return re.compile("".join(out))


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF name template -> our '/'-separated param path template + transform."""
    hf: str
    ours: str
    transform: str = "id"

    def __post_init__(self):
        assert self.transform in TRANSFORMS, self.transform

    def match_hf(self, name: str) -> tuple[str, ...] | None:
        m = _template_regex(self.hf, ".").fullmatch(name)
        return None if m is None else tuple(self.ours.format(**m.groupdict()).split("/"))

    def hf_name(self, path: tuple[str, ...]) -> str | None:
        m = _template_regex(self.ours, "/").fullmatch("/".join(path))
        return None if m is None else self.hf.format(**m.groupdict())


@dataclasses.dataclass(frozen=True)
class Fused:
    """A param that is sibling projections concatenated on the last axis.

    Attributes:
      ours:  template of the fused module's path, e.g. "layers_{i}/self_attn/qkv_proj";
             every leaf under it (kernel [in, sum of widths], bias [sum of widths])
             is the concatenation of the same leaf of each part.
      parts: ((sibling module name, width on the last axis), ...) in order,
             e.g. (("q_proj", H * D), ("k_proj", K * D), ("v_proj", K * D)).
    """
    ours: str
    parts: tuple[tuple[str, int], ...]

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(w for _, w in self.parts)

    def match(self, module_path: tuple[str, ...]) -> bool:
        return _template_regex(self.ours, "/").fullmatch("/".join(module_path)) is not None


def fuse_columns(parts, num_shards: int = 1):
    """Concatenates arrays on their last axis, per shard: with ``num_shards``
    n, the result's last axis is n contiguous pieces and piece d is
    [parts[0]'s d-th 1/n, parts[1]'s d-th 1/n, ...]; n = 1 is plain
    concatenation. numpy in, numpy out; jax arrays (traced too) otherwise.

    Args:
      parts: arrays [..., w_j], each w_j divisible by num_shards, same leading shape.
    Returns:
      [..., sum_j w_j]
    """
    xp = np if all(isinstance(p, np.ndarray) for p in parts) else jnp
    lead = parts[0].shape[:-1]
    assert all(p.shape[:-1] == lead and p.shape[-1] % num_shards == 0 for p in parts)
    pieces = [p.reshape(*lead, num_shards, p.shape[-1] // num_shards) for p in parts]
    return xp.concatenate(pieces, axis=-1).reshape(*lead, -1)


def split_columns(fused, widths, num_shards: int = 1) -> list:
    """The inverse of fuse_columns: [..., sum(widths)] -> [[..., w] for w in widths].

    NOTE: under jit with the last axis split over ``num_shards`` devices, each
    part is taken from the device's own piece, so no data moves between devices.
    """
    xp = np if isinstance(fused, np.ndarray) else jnp
    lead = fused.shape[:-1]
    assert fused.shape[-1] == sum(widths) and all(w % num_shards == 0 for w in widths)
    pieces = fused.reshape(*lead, num_shards, fused.shape[-1] // num_shards)
    bounds = np.cumsum([w // num_shards for w in widths])[:-1].tolist()
    return [p.reshape(*lead, -1) for p in xp.split(pieces, bounds, axis=-1)]


def _fused_entry(path: tuple[str, ...], fused: Iterable[Fused]) -> Fused | None:
    return next((f for f in fused if f.match(path[:-1])), None)


def _part_path(path: tuple[str, ...], part: str) -> tuple[str, ...]:
    return path[:-2] + (part, path[-1])


def unfused_shapes(expected_flat: dict, fused: Iterable[Fused]) -> dict:
    """{path: shape} with every fused param replaced by its parts' shapes."""
    fused = tuple(fused)
    out = {}
    for path, leaf in expected_flat.items():
        shape = tuple(leaf.shape)
        entry = _fused_entry(path, fused)
        if entry is None:
            out[path] = shape
            continue
        assert shape[-1] == sum(entry.widths), (path, shape, entry)
        for part, width in entry.parts:
            out[_part_path(path, part)] = shape[:-1] + (width,)
    return out


def fuse_params(params, fused: Iterable[Fused], num_shards: int = 1) -> dict:
    """params whose separate parts (e.g. q_proj, k_proj, v_proj) are replaced
    by their Fused param (qkv_proj), laid out for ``num_shards`` devices
    (fuse_columns). Params without such parts pass through unchanged."""
    fused = tuple(fused)
    flat = flatten_params(params)
    out, taken = {}, set()
    for path in flat:
        if path in taken:
            continue
        for entry in fused:
            name = path[-2] if len(path) >= 2 else None
            if name not in dict(entry.parts):
                continue
            target = path[:-2] + (entry.ours.rsplit("/", 1)[-1], path[-1])
            if not entry.match(target[:-1]):
                continue
            part_paths = [_part_path(path, p) for p, _ in entry.parts]
            assert all(p in flat for p in part_paths), (path, entry)
            out[target] = fuse_columns([flat[p] for p in part_paths], num_shards)
            taken.update(part_paths)
            break
        else:
            out[path] = flat[path]
    return unflatten_params(out)


def unfuse_params(params, fused: Iterable[Fused], num_shards: int = 1) -> dict:
    """The inverse of fuse_params: each Fused param split into its parts."""
    fused = tuple(fused)
    out = {}
    for path, x in flatten_params(params).items():
        entry = _fused_entry(path, fused)
        if entry is None:
            out[path] = x
            continue
        for (part, _), piece in zip(entry.parts, split_columns(x, entry.widths, num_shards)):
            out[_part_path(path, part)] = piece
    return unflatten_params(out)


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def flatten_params(tree) -> dict[tuple[str, ...], Any]:
    """{"a": {"b": x}} -> {("a", "b"): x} (flax FrozenDicts work too)."""
    return _flatten(dict(tree))


def unflatten_params(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert_state_dict(state_dict: dict[str, np.ndarray], rules: Iterable[Rule],
                       expected: dict, dtype, *, ignore: Iterable[str] = (),
                       fused: Iterable[Fused] = (), source: str = "checkpoint") -> dict:
    """Maps HF tensors onto our param tree.

    Args:
      state_dict: HF tensor name -> array.
      rules:      the family's Rule table.
      expected:   our abstract params (pytree of objects with .shape), e.g.
                  from jax.eval_shape of the module's init.
      dtype:      dtype of the returned arrays.
      ignore:     regexes of HF names to skip (tied lm_head, rotary buffers).
      fused:      the family's Fused params: the rules map HF tensors to
                  their parts, which are checked one by one, then concatenated.
      source:     where the tensors came from, for error messages.
    Returns:
      the param pytree (nested dicts of jax arrays).
    Raises:
      ValueError listing every unknown, unexpected, misshapen and missing tensor.
    """
    rules, fused = list(rules), tuple(fused)
    ignore_res = [re.compile(p) for p in ignore]
    want = unfused_shapes(flatten_params(expected), fused)
    got: dict[tuple[str, ...], Any] = {}
    unknown, unexpected, misshapen = [], [], []
    misshapen_paths = set()
    for name, array in state_dict.items():
        if any(r.fullmatch(name) for r in ignore_res):
            continue
        for rule in rules:
            path = rule.match_hf(name)
            if path is not None:
                break
        else:
            unknown.append(name)
            continue
        if path not in want:
            unexpected.append(name)
            continue
        value = TRANSFORMS[rule.transform](np.asarray(array))
        want_shape = want[path]
        if value.shape != want_shape:
            hf_shape = TRANSFORMS[rule.transform](np.empty(want_shape, np.int8)).shape
            misshapen.append(f"{name}: shape {tuple(np.shape(array))}, expected {hf_shape}")
            misshapen_paths.add(path)
            continue
        got[path] = value
    missing = []
    for path in want:
        if path not in got and path not in misshapen_paths:
            names = [r.hf_name(path) for r in rules]
            missing.append(next((n for n in names if n), "/".join(path)))
    problems = []
    for title, items in (("missing tensors", missing), ("misshapen tensors", misshapen),
                         ("unknown tensors", unknown),
                         ("unexpected tensors (the config does not use them)", unexpected)):
        if items:
            shown = "\n  ".join(sorted(items)[:20])
            more = f"\n  ... and {len(items) - 20} more" if len(items) > 20 else ""
            problems.append(f"{len(items)} {title}:\n  {shown}{more}")
    if problems:
        raise ValueError(f"cannot convert {source}:\n" + "\n".join(problems))
    jdtype = jnp.dtype(dtype)
    params = fuse_params(unflatten_params(got), fused)
    return unflatten_params({p: jnp.asarray(v, jdtype)
                             for p, v in flatten_params(params).items()})


# ----------------------------------------------------------------------------
# Readers


def read_json_object(path: pathlib.Path) -> dict:
    """The JSON object in ``path``; ValueError naming the file (and line, column) if not."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object "
                         "({...})")
    return value


def read_hf_config(model_dir) -> dict:
    """config.json of an HF model directory as a dict."""
    model_dir = pathlib.Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; is it a Hugging Face "
                                "model directory?")
    return read_json_object(path)


def _read_safetensors(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
    from safetensors import safe_open
    out = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def _read_torch_bin(files: list[pathlib.Path]) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{files[0].name} is a PyTorch checkpoint and reading it needs torch, which "
            "is not installed: `pip install torch` (CPU build is enough), or save the "
            "model as safetensors") from e
    out = {}
    for file in files:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            out[key] = tensor.detach().float().numpy() if tensor.is_floating_point() \
                else tensor.numpy()
    return out


def _sharded_files(model_dir: pathlib.Path, index_name: str) -> list[pathlib.Path]:
    index = read_json_object(model_dir / index_name)
    if not isinstance(index.get("weight_map"), dict):
        raise ValueError(f"{model_dir / index_name} has no weight_map")
    files = [model_dir / f for f in sorted(set(index["weight_map"].values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir / index_name} lists shards that are not in "
                                f"{model_dir}: {missing}")
    return files


def read_hf_state_dict(model_dir) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory, by HF name.

    Looks for, in order: model.safetensors, model.safetensors.index.json,
    pytorch_model.bin, pytorch_model.bin.index.json.
    """
    model_dir = pathlib.Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return _read_safetensors([model_dir / "model.safetensors"])
    if (model_dir / "model.safetensors.index.json").is_file():
        return _read_safetensors(_sharded_files(model_dir, "model.safetensors.index.json"))
    if (model_dir / "pytorch_model.bin").is_file():
        return _read_torch_bin([model_dir / "pytorch_model.bin"])
    if (model_dir / "pytorch_model.bin.index.json").is_file():
        return _read_torch_bin(_sharded_files(model_dir, "pytorch_model.bin.index.json"))
    raise FileNotFoundError(
        f"{model_dir} has no weights: expected model.safetensors, "
        "model.safetensors.index.json (sharded), or pytorch_model.bin")
