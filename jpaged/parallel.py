"""Tensor parallelism: a device mesh with one "tp" axis and the sharding rules.

Megatron-style, expressed as shardings that jit partitions (GSPMD), with the
attention kernels run once per shard through shard_map (models.base):

- q/k/v projections, MLP gate/up (OPT fc1) split by output columns, i.e. by
  head; o_proj and MLP down (OPT fc2) split by input rows, so each layer
  ends in one all-reduce;
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
- norms, biases after a row-parallel matmul, OPT's position table and
  project_in/out are replicated.

The host side does not change: one scheduler and one block manager, the same
block tables and slots for every shard.

Multi-host: call ``jax.distributed.initialize`` (``initialize_distributed``)
in every process before anything touches jax; ``jax.devices()`` then lists
every host's devices and the mesh spans them (see README, "Tensor
parallelism").
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

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1)"
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


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D mesh named "tp" over the first ``tensor_parallel_size`` devices;
    after jax.distributed.initialize, over all devices of all processes."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
    if tensor_parallel_size > len(devices):
        hint = ""
        if devices and devices[0].platform == "cpu":
            hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{tensor_parallel_size} before jax starts")
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices, "
                         f"but jax sees {len(devices)}{hint}")
    if jax.process_count() > 1 and tensor_parallel_size != len(devices):
        raise ValueError(f"with {jax.process_count()} processes, tensor_parallel_size must be "
                         f"the number of devices of all of them ({len(devices)}), got "
                         f"{tensor_parallel_size}: every process runs the same steps")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP_AXIS,))


def sharded_num_kv_heads(config, tp: int) -> int:
    """KV heads the sharded model stores: num_kv_heads when tp divides it,
    else lcm(num_kv_heads, tp) (each KV head repeated for the devices whose
    query heads read it). Raises ValueError when the heads cannot be split."""
    check_divisible(config, tp)
    return math.lcm(config.num_kv_heads, tp)


def check_divisible(config, tp: int) -> None:
    """ValueError naming the dimension when the model cannot be split tp ways."""
    if config.num_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the number of attention "
                         f"heads ({config.num_heads}): every device runs a whole number of "
                         f"query heads; pick a divisor of {config.num_heads}")
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    if ffn is not None and ffn % tp:
        raise ValueError(f"tensor_parallel_size={tp} must divide the MLP width ({ffn}): "
                         "its columns are split over the devices")
    # num_heads is a multiple of num_kv_heads and of tp, so of their lcm:
    # the replicated KV heads always form whole GQA groups.
    assert config.num_heads % math.lcm(config.num_kv_heads, tp) == 0


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


def _repeat_kv_heads(params, num_layers: int, num_kv_heads: int, head_dim: int, repeats: int):
    """k_proj / v_proj columns (and biases) with each KV head repeated
    ``repeats`` times in place: head h becomes heads h*repeats .. h*repeats+repeats-1."""
    params = dict(params)  # the caller's tree stays as it was
    for i in range(num_layers):
        attn = dict(params[f"layers_{i}"]["self_attn"])
        for proj in ("k_proj", "v_proj"):
            p = dict(attn[proj])
            kernel = p["kernel"]  # [hidden, num_kv_heads * head_dim]
            kernel = kernel.reshape(kernel.shape[0], num_kv_heads, head_dim)
            p["kernel"] = jnp.repeat(kernel, repeats, axis=1).reshape(kernel.shape[0], -1)
            if "bias" in p:
                bias = p["bias"].reshape(num_kv_heads, head_dim)
                p["bias"] = jnp.repeat(bias, repeats, axis=0).reshape(-1)
            attn[proj] = p
        layer = dict(params[f"layers_{i}"])
        layer["self_attn"] = attn
        params[f"layers_{i}"] = layer
    return params


def shard_model(model, mesh: Mesh):
    """The tensor-parallel twin of a models.LoadedModel (the original is left
    as it was): params placed with their NamedShardings, KV heads replicated
    where needed, the module told the mesh, the KV pool sharded on axis 2.

    Returns:
      a LoadedModel whose config.num_kv_heads is sharded_num_kv_heads(...)
      and whose init_kv_caches builds [2, num_blocks, that, block_size,
      head_dim] arrays sharded over "tp".
    """
    tp = mesh.shape[TP_AXIS]
    config = model.config
    num_kv_heads = sharded_num_kv_heads(config, tp)
    params = model.params
    if num_kv_heads != config.num_kv_heads:
        params = _repeat_kv_heads(params, config.num_layers, config.num_kv_heads,
                                  config.head_dim, num_kv_heads // config.num_kv_heads)
        config = dataclasses.replace(config, num_kv_heads=num_kv_heads)
    params = _place(params, param_shardings(params, mesh, config.vocab_size))
    module = model.module.clone(config=config, mesh=mesh)
    return dataclasses.replace(model, config=config, params=params, module=module,
                               _jit_apply=None,
                               kv_sharding=NamedSharding(mesh, KV_CACHE_SPEC))


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
