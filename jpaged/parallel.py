"""Tensor parallelism: a device mesh with one "tp" axis and the sharding rules.

Megatron-style, expressed as shardings that jit partitions (GSPMD), with the
attention kernels run once per shard through shard_map (models.base):

- the fused q/k/v projection and MLP gate/up (OPT fc1) split by output
  columns, i.e. by head; o_proj and MLP down (OPT fc2) split by input rows,
  so each layer ends in one all-reduce. A fused kernel is stored [q | k | v]
  (and [gate | up]); shard_model rearranges its columns per device,
  [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (models.convert.fuse_columns with
  num_shards = tp), so the contiguous share of device d is its own heads' q,
  k and v (and its own gate and up columns), and the module, told the mesh,
  splits the matmul's output the same way without moving data;
- the token embedding and the lm_head split by vocabulary row/column when
  the vocabulary divides (replicated otherwise); the logits are gathered
  whole before sampling;
- the KV pool split on its num_kv_heads axis (axis 2). When the KV heads do
  not divide over the devices (SmolLM2's 3 KV heads on 2 or 9 devices), the
  KV heads are replicated up to lcm(num_kv_heads, tp) heads: each KV head is
  repeated so that every device holds exactly the KV heads its own query
  heads read (1 per device when tp is a multiple of num_kv_heads). The k/v
  projection columns are repeated the same way, so each device computes the
  K/V of the heads it stores.
- when the query heads of a KV group do not split evenly over that group's
  copies (SmolLM2's 9 query / 3 KV heads at tp 2), each group is padded with
  zero query heads (zero q_proj columns and bias, zero o_proj rows) up to the
  next multiple of the copies: 9 / 3 at tp 2 -> 12 query / 6 KV heads, 6 and
  3 per device. A zero head adds exactly 0 to o_proj's output, so the model
  computes the same function; see ``sharded_heads`` for the rule.
- norms, biases after a row-parallel matmul, OPT's position table and
  project_in/out are replicated.

The host side does not change: one scheduler and one block manager, the same
block tables and slots for every shard.

Multi-host: call ``jax.distributed.initialize`` (``initialize_distributed``)
in every process before anything touches jax; ``jax.devices()`` then lists
every host's devices and the mesh spans them (see README, "Tensor
parallelism").

Data parallelism (jpaged.data_parallel) runs one engine per group of
``replica_devices``, each with a mesh of its own (or, at tensor_parallel_size
1, its one device: ``place_model``); with several processes each group lies
within one process, which runs only its own groups' replicas.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.base import TP_AXIS
from models.convert import fuse_params, unfuse_params

_COLUMN = r"(qkv_proj|gate_up_proj|fc1)"
_ROW = r"(o_proj|out_proj|down_proj|fc2)"
# "/"-joined param path -> how it splits over the "tp" axis; "vocab" entries
# split on the given axis only when the vocabulary divides. The rest: replicated.
SHARDING_RULES = (
    (rf"(^|/){_COLUMN}/kernel$", P(None, TP_AXIS)),
    (rf"(^|/){_COLUMN}/bias$", P(TP_AXIS)),
    (rf"(^|/){_ROW}/kernel$", P(TP_AXIS, None)),
    (r"^embed_tokens/embedding$", ("vocab", 0)),
    (r"^lm_head$", ("vocab", 1)),
)
KV_CACHE_SPEC = P(None, None, TP_AXIS, None, None)  # [2, blocks, KV HEADS, block_size, head_dim]


def replica_devices(tensor_parallel_size: int, data_parallel_size: int = 1,
                    devices=None) -> list[list]:
    """The devices of each engine replica: replica r gets
    ``devices[r * tp:(r + 1) * tp]`` (default: ``jax.devices()``, in jax's
    order, which lists the devices process by process). Data parallelism
    (jpaged.data_parallel) runs one engine per group.

    After jax.distributed.initialize (several processes): with dp 1, tp must
    span every device of every process (one engine whose steps every
    process runs); with dp > 1, every group must lie within one process
    (each process runs the replicas on its own devices, and nothing crosses
    between replicas), so tp must divide each process's device count.

    Returns:
      data_parallel_size lists of tensor_parallel_size devices each.
    Raises:
      ValueError when tp x dp exceeds the devices (on CPU, with the
      XLA_FLAGS that makes more), or with several processes when dp is 1 and
      tp is not the number of all devices, or dp > 1 and a group spans
      processes.
    """
    devices = list(jax.devices() if devices is None else devices)
    tp, dp = tensor_parallel_size, data_parallel_size
    for name, value in (("tensor_parallel_size", tp), ("data_parallel_size", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if tp * dp > len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{tp * dp} before jax starts")
        need = (f"tensor_parallel_size={tp} needs that many devices" if dp == 1 else
                f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {tp * dp} devices")
        raise ValueError(f"{need}, but jax sees {len(devices)}{hint}")
    groups = [devices[r * tp:(r + 1) * tp] for r in range(dp)]
    if jax.process_count() > 1:
        if dp == 1 and tp != len(devices):
            raise ValueError(f"with {jax.process_count()} processes, tensor_parallel_size must "
                             f"be the number of devices of all of them ({len(devices)}), got "
                             f"{tp}: every process runs the same steps (or use "
                             "data_parallel_size > 1: one replica per group of devices within "
                             "a host)")
        for r, group in enumerate(groups if dp > 1 else ()):
            owners = sorted({d.process_index for d in group})
            if len(owners) > 1:
                raise ValueError(
                    f"replica {r}'s devices span processes {', '.join(map(str, owners))} "
                    f"(tensor_parallel_size={tp}, data_parallel_size={dp}): with several "
                    "processes each replica must fit one host's devices (tensor_parallel_size "
                    "<= the local device count, dividing it)")
    return groups


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D mesh named "tp" over the first ``tensor_parallel_size`` of
    ``devices`` (default: jax.devices()); after jax.distributed.initialize,
    over all devices of all processes (replica_devices' rules and errors)."""
    return Mesh(np.array(replica_devices(tensor_parallel_size, 1, devices)[0]), (TP_AXIS,))


def sharded_heads(config, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) of the model sharded tp ways; ValueError when
    it cannot be split (check_divisible).

    With K KV heads and G = num_heads / K query heads per KV head, each KV
    head is stored r = lcm(K, tp) / K times so that the pool splits evenly,
    and its group's query heads are shared out over those r copies: the
    group is padded with zero heads to G' = ceil(G / r) * r, the smallest
    multiple of r that is >= G. Then K * G' query heads and K * r KV heads
    both split over tp (K * r is a multiple of tp and K * G' of K * r), every
    device gets G' / r query heads per stored KV head, and query head i still
    reads KV head i // (G' / r), a copy of its own original one.
    Examples: 9 / 3 at tp 2 -> (12, 6); at tp 4 -> (12, 12); at tp 3 -> (9, 3).
    """
    check_divisible(config, tp)
    num_kv_heads = config.num_kv_heads
    repeats = math.lcm(num_kv_heads, tp) // num_kv_heads
    group_size = config.num_heads // num_kv_heads
    padded_group_size = -(-group_size // repeats) * repeats
    num_heads, num_kv_heads = num_kv_heads * padded_group_size, num_kv_heads * repeats
    assert num_heads % tp == 0 and num_kv_heads % tp == 0 and num_heads % num_kv_heads == 0
    return num_heads, num_kv_heads


def _can_pad_heads(config) -> bool:
    """Whether num_heads, num_kv_heads and head_dim are independent config
    fields, so a padded copy of the config keeps head_dim (Llama: yes; OPT
    derives num_kv_heads and head_dim from num_heads: no)."""
    fields = {f.name for f in dataclasses.fields(config)}
    return {"num_heads", "num_kv_heads", "head_dim"} <= fields


def check_divisible(config, tp: int) -> None:
    """ValueError naming the dimension when the model cannot be split tp ways."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
    if config.num_heads % tp and not _can_pad_heads(config):
        raise ValueError(f"tensor_parallel_size={tp} must divide the number of attention "
                         f"heads ({config.num_heads}) of this {type(config).__name__} model: "
                         "every device runs a whole number of query heads, and this family "
                         "derives head_dim from the head count, so zero heads cannot pad it; "
                         f"pick a divisor of {config.num_heads}")
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    if ffn is not None and ffn % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the MLP width ({ffn}): "
                         "its columns are split over the devices; pick a divisor of "
                         f"{ffn}")


def param_spec(path: str, shape, vocab_size: int, tp: int) -> P:
    """The PartitionSpec of one param (its "/"-joined path) under SHARDING_RULES."""
    for pattern, spec in SHARDING_RULES:
        if re.search(pattern, path):
            if isinstance(spec, tuple):  # vocabulary split, when it divides
                _, axis = spec
                if vocab_size % tp or shape[axis] != vocab_size:
                    return P()
                return P(*(TP_AXIS if i == axis else None for i in range(len(shape))))
            return spec
    return P()


def param_shardings(params, mesh: Mesh, vocab_size: int):
    """Pytree of NamedSharding matching ``params``."""
    tp = mesh.shape[TP_AXIS]

    def one(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, param_spec(name, x.shape, vocab_size, tp))
    return jax.tree_util.tree_map_with_path(one, params)


def _repeat_kv_heads(attn: dict, num_kv_heads: int, head_dim: int, repeats: int) -> dict:
    """A copy of a layer's self_attn params whose k_proj / v_proj columns (and
    biases) have each KV head repeated ``repeats`` times in place: head h
    becomes heads h*repeats .. h*repeats+repeats-1."""
    attn = dict(attn)
    for proj in ("k_proj", "v_proj"):
        p = dict(attn[proj])
        kernel = p["kernel"]  # [hidden, num_kv_heads * head_dim]
        kernel = kernel.reshape(kernel.shape[0], num_kv_heads, head_dim)
        p["kernel"] = jnp.repeat(kernel, repeats, axis=1).reshape(kernel.shape[0], -1)
        if "bias" in p:
            bias = p["bias"].reshape(num_kv_heads, head_dim)
            p["bias"] = jnp.repeat(bias, repeats, axis=0).reshape(-1)
        attn[proj] = p
    return attn


def _pad_query_heads(attn: dict, num_kv_heads: int, head_dim: int, group_size: int,
                     padded_group_size: int) -> dict:
    """A copy of a layer's self_attn params whose q_proj columns (and bias)
    and o_proj rows hold each KV group's ``group_size`` query heads followed
    by zero heads up to ``padded_group_size``: group g's head j (j <
    group_size) moves to g*padded_group_size + j.

    NOTE: a zero head's q is 0, so it attends uniformly and yields a finite
    mean of V, which the zero o_proj rows then multiply by 0: the output is
    unchanged. Its FLOPs (q/o matmul columns, attention) are spent for nothing;
    that is the price of an even split.
    """
    pad = padded_group_size - group_size

    def pad_heads(x, axis):  # axis of x holding num_heads * head_dim
        shape = x.shape[:axis] + (num_kv_heads, group_size, head_dim) + x.shape[axis + 1:]
        widths = [(0, 0)] * len(shape)
        widths[axis + 1] = (0, pad)
        padded = jnp.pad(x.reshape(shape), widths)
        return padded.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 1:])

    attn = dict(attn)
    q = dict(attn["q_proj"])
    q["kernel"] = pad_heads(q["kernel"], 1)  # [hidden, num_heads * head_dim]
    if "bias" in q:
        q["bias"] = pad_heads(q["bias"], 0)
    o = dict(attn["o_proj"])
    o["kernel"] = pad_heads(o["kernel"], 0)  # [num_heads * head_dim, hidden]
    attn["q_proj"], attn["o_proj"] = q, o  # o_proj's bias is per output: unchanged
    return attn


def _sharded_layer(key: str, layer: dict, config, sharded, tp: int) -> dict:
    """{key: layer} in the sharded model's layout: query heads padded, KV
    heads repeated, fused projections' columns arranged per device."""
    tree = unfuse_params({key: layer}, config.fused_params())
    layer = dict(tree[key])
    attn = layer["self_attn"]
    if sharded.num_heads != config.num_heads:
        attn = _pad_query_heads(attn, config.num_kv_heads, config.head_dim,
                                config.num_heads // config.num_kv_heads,
                                sharded.num_heads // config.num_kv_heads)
    if sharded.num_kv_heads != config.num_kv_heads:
        attn = _repeat_kv_heads(attn, config.num_kv_heads, config.head_dim,
                                sharded.num_kv_heads // config.num_kv_heads)
    layer["self_attn"] = attn
    return fuse_params({key: layer}, sharded.fused_params(), num_shards=tp)


def shard_model(model, mesh: Mesh):
    """The tensor-parallel twin of a models.LoadedModel (the original is left
    as it was): params placed with their NamedShardings, KV heads replicated
    where needed, fused projections laid out per device, the module told the
    mesh, the KV pool sharded on axis 2.

    Returns:
      a LoadedModel whose config.num_heads and config.num_kv_heads are
      sharded_heads(...) (zero query heads padded in, KV heads repeated) and
      whose init_kv_caches builds [2, num_blocks, num_kv_heads, block_size,
      head_dim] arrays sharded over "tp".
    """
    tp = mesh.shape[TP_AXIS]
    config = model.config
    num_heads, num_kv_heads = sharded_heads(config, tp)
    sharded = config
    if num_heads != config.num_heads:
        sharded = dataclasses.replace(sharded, num_heads=num_heads)
    if num_kv_heads != config.num_kv_heads:
        sharded = dataclasses.replace(sharded, num_kv_heads=num_kv_heads)
    params = {}
    # NOTE: one layer at a time, placed before the next is rearranged, so the
    # unsharded temporaries never exceed one layer's projections.
    for key, value in model.params.items():
        tree = {key: value}
        if key.startswith("layers_"):
            tree = _sharded_layer(key, value, config, sharded, tp)
        params.update(_place(tree, param_shardings(tree, mesh, sharded.vocab_size)))
    module = model.module.clone(config=sharded, mesh=mesh)
    return dataclasses.replace(model, config=sharded, params=params, module=module,
                               _jit_apply=None,
                               kv_sharding=NamedSharding(mesh, KV_CACHE_SPEC))


def place_model(model, device):
    """The twin of a models.LoadedModel on one device (a data-parallel
    replica at tensor_parallel_size 1): params committed to ``device`` (the
    same arrays when they are there already, else a copy), its KV pool
    built there (kv_sharding), so every jitted step runs there."""
    sharding = jax.sharding.SingleDeviceSharding(device)
    return dataclasses.replace(model, params=jax.device_put(model.params, sharding),
                               _jit_apply=None, kv_sharding=sharding)


def _place(tree, shardings):
    """device_put, or for a mesh spanning several processes (each holding the
    same values, e.g. loaded from the same checkpoint), each process filling
    its own devices' shards from a host copy."""
    def one(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(one, tree, shardings)


def kv_cache_shardings(mesh: Mesh, num_layers: int) -> tuple:
    """One NamedSharding per layer of the KV pool (split on num_kv_heads)."""
    return (NamedSharding(mesh, KV_CACHE_SPEC),) * num_layers


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of the mesh."""
    return NamedSharding(mesh, P())


def per_shard(fn, mesh: Mesh, num_layers: int, num_replicated: int):
    """fn(kv_caches, *replicated) run on each device's share of the pool
    (for Pallas kernels, which jit cannot partition); returns the pool.
    check_vma is off for the reason given in models.base.sharded_attention."""
    pool = (KV_CACHE_SPEC,) * num_layers
    return jax.shard_map(fn, mesh=mesh, in_specs=(pool,) + (P(),) * num_replicated,
                         out_specs=pool, check_vma=False)


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """jax.distributed.initialize for a multi-host run; call it first, in
    every process. Arguments left None come from the environment
    (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or from a
    cluster jax detects (SLURM, Open MPI, Cloud TPU)."""
    import os
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
