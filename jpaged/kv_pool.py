"""KVPool: the paged KV cache on the device, its host swap pool, and the
moves between them.

The device pool is one array per layer in the layout of
``kernels_pallas`` ([2, num_blocks, num_kv_heads, block_size, head_dim]);
every jitted call that writes it takes it donated and hands back the new
arrays (``KVPool.arrays``). The host swap pool is one numpy array for all
layers, allocated on the first swap-out. Block moves of one step run as one
launch each: copy-on-write copies, and swaps as gathered chunks (one
device<->host transfer per chunk of up to MAX_SWAP_CHUNK blocks, through
page-locked memory where the platform has it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import copy_blocks

MAX_SWAP_CHUNK = 256  # blocks moved per device<->host transfer at most


def pow2_buckets(lo: int, hi: int) -> list[int]:
    """lo, 2 lo, 4 lo, ... and hi itself."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return sorted(set(out))


def bucket(buckets: list[int], n: int) -> int:
    """The smallest bucket >= n."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class KVPool:
    """Device KV blocks (block 0: the null block) and host swap blocks."""

    def __init__(self, model, num_blocks: int, block_size: int, num_cpu_blocks: int,
                 max_copies: int, dtype, device, mesh=None, backend: str = "auto"):
        """model: a LoadedModel placed where the pool goes (its kv_sharding);
        device: the pool's device, or with a mesh the first of its devices
        that this process drives (host<->device staging)."""
        self.model = model
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.max_copies = max_copies
        self.dtype = dtype
        self.mesh = mesh
        self.backend = backend
        self.num_slots = num_blocks * block_size  # a slot id past the pool: dropped
        self.arrays = model.init_kv_caches(num_blocks, block_size, dtype=dtype)
        self.cpu_cache = None
        # Device<->host transfers go through page-locked memory where the
        # platform offers it (on an H100: ~52 GB/s against ~7 GB/s pageable).
        self._device = device
        self.pinned_host = any(m.kind == "pinned_host"
                               for m in self._device.addressable_memories())
        self.swap_buckets = (pow2_buckets(1, min(MAX_SWAP_CHUNK, num_cpu_blocks))
                             if num_cpu_blocks else [])
        self._copy_fn = jax.jit(self._copy, donate_argnums=(0,))
        self._gather_fn = jax.jit(self._gather)
        self._scatter_fn = jax.jit(self._scatter, donate_argnums=(0,))
        if mesh is not None:
            from jpaged import parallel
            # NOTE: the steps keep the pool's sharding by themselves (the
            # attention shard_map returns it); these pin it so no call recompiles.
            pool = parallel.kv_cache_shardings(mesh, len(self.arrays))
            self._copy_fn = jax.jit(parallel.per_shard(self._copy, mesh, len(pool), 2),
                                    donate_argnums=(0,), out_shardings=pool)
            self._scatter_fn = jax.jit(self._scatter, donate_argnums=(0,), out_shardings=pool)
            if not pool[0].is_fully_addressable:  # several hosts: each needs every swapped block
                self._gather_fn = jax.jit(self._gather,
                                          out_shardings=parallel.replicated(mesh))

    # ------------------------------------------------------------ jitted bodies
    def _copy(self, arrays, src, dst):
        return tuple(copy_blocks(c, src, dst, backend=self.backend) for c in arrays)

    @staticmethod
    def _gather(arrays, block_ids):
        return jnp.stack([c[:, block_ids] for c in arrays])

    @staticmethod
    def _scatter(arrays, data, block_ids):
        return tuple(c.at[:, block_ids].set(data[i], mode="drop") for i, c in enumerate(arrays))

    def warm_up(self) -> int:
        """Compiles the copy and every swap chunk size; returns the count."""
        self.copy_blocks([])
        for b in self.swap_buckets:
            data = self._gather_fn(self.arrays, np.zeros(b, np.int32))
            self.arrays = self._scatter_fn(self.arrays, data,
                                           np.full(b, self.num_blocks, np.int32))
        return 1 + len(self.swap_buckets)

    # ------------------------------------------------------------ failures
    def is_valid(self) -> bool:
        """Whether the pool's buffers are intact: a jitted call that consumed
        the donated pool and then failed (or was interrupted before its
        result was kept) leaves them deleted or holding an error."""
        try:
            return not any(c.is_deleted() for c in self.arrays) and \
                jax.block_until_ready(self.arrays) is not None
        except Exception:  # an error the device raised into the buffers
            return False

    def reset(self) -> None:
        """A fresh, zeroed pool of the same shape (every block's K/V lost)."""
        for c in self.arrays:  # free the old buffers first: two pools may not fit
            if not c.is_deleted():
                c.delete()
        self.arrays = self.model.init_kv_caches(self.num_blocks, self.block_size,
                                                dtype=self.dtype)

    # ------------------------------------------------------------ block moves
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write copies of one step, all layers, one launch."""
        n = self.max_copies
        assert len(pairs) <= n, "more copies than sequences in a step"
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)  # dst 0: padding, skipped
        for i, (s, d) in enumerate(pairs):
            src[i], dst[i] = s, d
        self.arrays = self._copy_fn(self.arrays, src, dst)

    def _ensure_cpu_cache(self):
        if self.cpu_cache is None:
            c = self.arrays[0]
            self.cpu_cache = np.zeros((len(self.arrays), 2, self.num_cpu_blocks)
                                      + c.shape[2:], dtype=c.dtype)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Moves (gpu block -> cpu block) pairs to the host pool, gathering
        the blocks on the device so each chunk is one transfer."""
        self._ensure_cpu_cache()
        for lo in range(0, len(pairs), MAX_SWAP_CHUNK):
            chunk = pairs[lo:lo + MAX_SWAP_CHUNK]
            b = bucket(self.swap_buckets, len(chunk))
            gpu = np.zeros(b, np.int32)
            gpu[:len(chunk)] = [g for g, _ in chunk]
            data = self._gather_fn(self.arrays, gpu)
            if self.pinned_host:
                data = jax.device_put(data, data.sharding.with_memory_kind("pinned_host"))
            self.cpu_cache[:, :, [c for _, c in chunk]] = np.asarray(data)[:, :, :len(chunk)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Moves (cpu block -> gpu block) pairs back, one transfer a chunk."""
        self._ensure_cpu_cache()
        for lo in range(0, len(pairs), MAX_SWAP_CHUNK):
            chunk = pairs[lo:lo + MAX_SWAP_CHUNK]
            b = bucket(self.swap_buckets, len(chunk))
            data = np.zeros((self.cpu_cache.shape[0], 2, b) + self.cpu_cache.shape[3:],
                            self.cpu_cache.dtype)
            data[:, :, :len(chunk)] = self.cpu_cache[:, :, [c for c, _ in chunk]]
            gpu = np.full(b, self.num_blocks, np.int32)  # padding: dropped
            gpu[:len(chunk)] = [g for _, g in chunk]
            self.arrays = self._scatter_fn(self.arrays, self._to_device(data), gpu)

    def _to_device(self, data: np.ndarray):
        if self.mesh is not None:  # jit spreads host data over the mesh (every host's too)
            return data
        if not self.pinned_host:
            return jax.device_put(data, self._device)
        staged = jax.device_put(data, jax.sharding.SingleDeviceSharding(
            self._device, memory_kind="pinned_host"))
        return jax.device_put(staged, jax.sharding.SingleDeviceSharding(self._device))
