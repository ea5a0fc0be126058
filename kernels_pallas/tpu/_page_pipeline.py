"""What the TPU attention kernels share: the double-buffered page pipeline.

A kernel program walks a range of one sequence's pages (KV blocks) in
*groups* of ``pages_per_group`` pages. Each page is one DMA per K and V that
moves the page of every KV head at once, from the pool in HBM
(``kv_hbm[0 or 1, block_id]``: ``[num_kv_heads, block_size, head_dim]``,
contiguous) into a strided slot of a VMEM buffer laid out head-major
(``[2 slots, num_kv_heads, pages_per_group, block_size, head_dim]``), so the
group reads as ``[num_kv_heads, pages_per_group * block_size, head_dim]``: one
batched matmul per group covers all heads. While group g is computed, the DMAs
of group g+1 are already in flight (double buffering).

Block tables never sit whole in scalar memory (SMEM): a table row can be
``ceil(max_model_len / block_size)`` entries and a batch of them overflows
SMEM (the failure behind vLLM PR #9350 with JAX's TPU kernel). The page range
is cut into *chunks* of ``pages_per_chunk`` pages; the block-table slice of a
chunk is DMA'd from HBM into a double-buffered SMEM scratch
``i32[2, pages_per_chunk]``. The slice of chunk c+1 is started when chunk c
begins and waited for just before the first page DMA of chunk c+1 is issued,
so SMEM holds ``2 * pages_per_chunk`` entries whatever the context length.
A chunk's slice starts at ``min(first page, max_blocks_per_seq -
pages_per_chunk)`` so it never reads past the end of the table row.

Not yet run on a TPU (none here): tests run the kernels in interpret mode and
check that Pallas lowers them to Mosaic for TPU v5e. Merging ``[P, block_size]``
into one row axis is layout-free only when block_size is a multiple of the
sublane tiling (8 rows for f32, 16 for bf16); bf16 with block_size 8 may cost
a relayout or be refused by Mosaic on hardware.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def resolve_interpret(interpret):
    """Maps the facade's ``interpret`` flag to what TPU pallas_call takes."""
    if interpret is True:
        return pltpu.InterpretParams()
    if interpret is False or interpret is None:
        return False
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    raise ValueError("interpret must be True, False or a pltpu.InterpretParams, "
                     f"got {interpret!r}")


def page_tiling(max_blocks_per_seq: int, pages_per_group: int,
                pages_per_chunk: int) -> tuple[int, int]:
    """Validates the tuning knobs; returns (pages_per_group, pages_per_chunk).

    Both are clipped to the table width; pages_per_chunk is rounded down to a
    multiple of pages_per_group (a group never straddles two table slices).
    """
    for name, value in (("pages_per_compute_block", pages_per_group),
                        ("pages_per_chunk", pages_per_chunk)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if max_blocks_per_seq < 1:
        raise ValueError("block_tables must have at least one column")
    group = min(pages_per_group, max_blocks_per_seq)
    chunk = max(group, min(pages_per_chunk, max_blocks_per_seq) // group * group)
    return group, chunk


def scratch_shapes(kv_dtype, num_kv_heads: int, block_size: int, head_dim: int,
                   pages_per_group: int, pages_per_chunk: int) -> list:
    """Scratch operands of the pipeline, in the order ``PagePipeline`` takes."""
    buf = (2, num_kv_heads, pages_per_group, block_size, head_dim)
    return [
        pltpu.VMEM(buf, kv_dtype),                     # K pages, 2 slots
        pltpu.VMEM(buf, kv_dtype),                     # V pages, 2 slots
        pltpu.SMEM((2, pages_per_chunk), jnp.int32),   # block-table slices
        pltpu.SemaphoreType.DMA((2, 2)),               # [K/V, slot]
        pltpu.SemaphoreType.DMA((2,)),                 # [table slot]
    ]


class PagePipeline:
    """Streams pages [page_begin, page_end) of sequence ``seq`` through VMEM.

    Refs (in the kernel):
      kv_hbm:     [2, num_blocks, num_kv_heads, block_size, head_dim] (HBM)
      tables_hbm: i32[num_seqs, max_blocks_per_seq] (HBM)
      k_buf, v_buf, tbl_buf, kv_sems, tbl_sems: from ``scratch_shapes``.
    """

    def __init__(self, kv_hbm, tables_hbm, k_buf, v_buf, tbl_buf, kv_sems,
                 tbl_sems, *, seq, page_begin, page_end, pages_per_chunk):
        self.kv_hbm, self.tables_hbm = kv_hbm, tables_hbm
        self.k_buf, self.v_buf, self.tbl_buf = k_buf, v_buf, tbl_buf
        self.kv_sems, self.tbl_sems = kv_sems, tbl_sems
        self.seq, self.page_begin, self.page_end = seq, page_begin, page_end
        _, _, self.group, self.block_size, _ = k_buf.shape
        self.chunk = pages_per_chunk
        self.max_blocks = tables_hbm.shape[1]
        self.groups_per_chunk = pages_per_chunk // self.group
        num_pages = jnp.maximum(page_end - page_begin, 0)
        self.num_groups = pl.cdiv(num_pages, self.group)
        self.num_chunks = pl.cdiv(num_pages, pages_per_chunk)

    # -- block-table slices ------------------------------------------------
    def _table_start(self, chunk):
        return jnp.minimum(self.page_begin + chunk * self.chunk,
                           self.max_blocks - self.chunk)

    def _table_copy(self, chunk):
        slot = chunk % 2
        src = self.tables_hbm.at[self.seq, pl.ds(self._table_start(chunk), self.chunk)]
        return pltpu.make_async_copy(src, self.tbl_buf.at[slot], self.tbl_sems.at[slot])

    # -- pages -------------------------------------------------------------
    def _page_copies(self, g, j, block_id):
        slot = g % 2
        return [pltpu.make_async_copy(self.kv_hbm.at[kv, block_id],
                                      buf.at[slot, :, j],
                                      self.kv_sems.at[kv, slot])
                for kv, buf in ((0, self.k_buf), (1, self.v_buf))]

    def _start_group(self, g):
        chunk = g // self.groups_per_chunk
        table_start = self._table_start(chunk)
        for j in range(self.group):
            page = self.page_begin + g * self.group + j

            @pl.when(page < self.page_end)
            def _():
                block_id = self.tbl_buf[chunk % 2, page - table_start]
                for copy in self._page_copies(g, j, block_id):
                    copy.start()

    def _wait_group(self, g):
        for j in range(self.group):
            page = self.page_begin + g * self.group + j

            # NOTE: a wait needs only the semaphore and the byte count, so the
            # descriptor names block 0 rather than re-reading the table.
            @pl.when(page < self.page_end)
            def _():
                for copy in self._page_copies(g, j, 0):
                    copy.wait()

    def run(self, body):
        """Calls ``body(k, v, first_page)`` once per group, in order.

        k, v: [num_kv_heads, pages_per_group * block_size, head_dim] in the
        pool dtype; rows of pages past page_end hold stale data (mask them).
        first_page: i32 scalar, the sequence-relative page of row 0.
        """
        num_kv_heads, head_dim = self.k_buf.shape[1], self.k_buf.shape[4]
        rows = self.group * self.block_size

        @pl.when(self.num_groups > 0)
        def _():
            first = self._table_copy(0)
            first.start()
            first.wait()
            self._start_group(0)

            def step(g, carry):
                chunk = g // self.groups_per_chunk

                @pl.when((g % self.groups_per_chunk == 0)
                         & (chunk + 1 < self.num_chunks))
                def _():
                    self._table_copy(chunk + 1).start()

                @pl.when(g + 1 < self.num_groups)
                def _():
                    @pl.when((g + 1) % self.groups_per_chunk == 0)
                    def _():
                        self._table_copy(chunk + 1).wait()
                    self._start_group(g + 1)

                self._wait_group(g)
                slot = g % 2
                k = self.k_buf[slot].reshape(num_kv_heads, rows, head_dim)
                v = self.v_buf[slot].reshape(num_kv_heads, rows, head_dim)
                body(k, v, self.page_begin + g * self.group)
                return carry

            lax.fori_loop(0, self.num_groups, step, 0)


def online_softmax_update(m_ref, l_ref, acc_ref, scores, v):
    """One flash-attention step on f32 state refs.

    m_ref, l_ref: f32[H, R, 1]; acc_ref: f32[H, R, D];
    scores: f32[H, R, T] with masked entries already -inf;
    v: [H, T, D] with rows that may hold garbage already zeroed.
    Rows masked everywhere so far keep m = -inf, l = 0, acc = 0.
    """
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(scores, axis=-1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(scores - m_safe)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
    pv = jnp.einsum("hrt,htd->hrd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
    acc_ref[...] = alpha * acc_ref[...] + pv
    m_ref[...] = m_new


def init_state(m_ref, l_ref, acc_ref):
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def finalize(m_ref, l_ref, acc_ref):
    """Returns (out f32[H, R, D], lse f32[H, R, 1]); empty rows: 0 and -inf."""
    l = l_ref[...]
    has_any = l > 0.0
    out = acc_ref[...] / jnp.where(has_any, l, 1.0)
    lse = jnp.where(has_any, m_ref[...] + jnp.log(jnp.where(has_any, l, 1.0)),
                    -jnp.inf)
    return out, lse


def check_pool(kv_cache, block_tables, context_lens):
    """Shared argument checks; returns (num_blocks, Hkv, block_size, D)."""
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, num_blocks, num_kv_heads, block_size, "
                         f"head_dim], got shape {kv_cache.shape}")
    if block_tables.ndim != 2 or not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError("block_tables must be an integer [num_seqs, max_blocks_per_seq] "
                         f"array, got {block_tables.dtype}{list(block_tables.shape)}")
    if context_lens.shape != (block_tables.shape[0],):
        raise ValueError(f"context_lens must be [num_seqs={block_tables.shape[0]}], "
                         f"got shape {context_lens.shape}")
    return kv_cache.shape[1:]
