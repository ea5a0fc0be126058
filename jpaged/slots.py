"""The host side of the persistent batch: slot ids and the per-step diff.

Every running sequence holds a slot, a row of the device-resident
``SlotState`` (jpaged.device_batch). Between steps the host sends only what
changed, packed into one int32 buffer (``SlotDiff.pack``):

- whole rows, for slots that a sequence starts to use (admitted, swapped
  in, forked, or resent after a failure): token, position, sampling
  settings, stop rules, block-table row, where its penalty counts come
  from (another slot, or zeros), and for beam search its group, rank,
  width and cumulative logprob;
- block-table entries (slot, column, block), for tables that grew or whose
  last block a copy-on-write replaced;
- slots to switch off (a sequence that stopped on the host, was preempted,
  aborted or freed).

The buffer has one of a few fixed layouts (``SlotDiffLayout``: row, entry
and switch-off capacities), so its apply step compiles once per layout.
Host core: numpy only, never imports jax.
"""
from __future__ import annotations

import dataclasses

import numpy as np

MAX_STOP = 16  # stop token ids a slot checks on the device (the rest: on the host)
DIFF_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "cum_logprob")


class ROW:
    """Column of each field in a packed row (floats are stored as their bits)."""
    slot, token, position, active, num_generated, max_len, min_tokens = range(7)
    ignore_eos, top_k, seed, counts_from = range(7, 11)
    beam_group, beam_rank, beam_width = range(11, 14)
    (temperature, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty,
     cum_logprob) = range(14, 21)
    stop = 21
    table = stop + MAX_STOP


@dataclasses.dataclass(frozen=True)
class SlotDiffLayout:
    """Capacities of one packed diff: rows, block entries, switch-offs."""
    num_slots: int
    max_blocks: int
    num_rows: int
    num_entries: int
    num_off: int

    @property
    def width(self) -> int:
        return ROW.table + self.max_blocks

    @property
    def size(self) -> int:
        return self.num_rows * self.width + 3 * self.num_entries + self.num_off

    def fits(self, num_rows: int, num_entries: int, num_off: int) -> bool:
        return (num_rows <= self.num_rows and num_entries <= self.num_entries
                and num_off <= self.num_off)

    def split(self, buf):
        """(rows [R, width], entries [E, 3], off [D]) views of a packed buffer
        (numpy or jax)."""
        a = self.num_rows * self.width
        b = a + 3 * self.num_entries
        return (buf[:a].reshape(self.num_rows, self.width),
                buf[a:b].reshape(self.num_entries, 3), buf[b:b + self.num_off])


def diff_layouts(num_slots: int, max_blocks: int, max_window: int,
                 block_size: int) -> tuple[SlotDiffLayout, ...]:
    """A small layout (a decode step: block entries for every slot, a few
    rows) and a large one (every slot refilled)."""
    # a window of K tokens needs ceil(K / block_size) + 1 new blocks at most
    # per sequence, plus one copy-on-write replacement
    entries = num_slots * (-(-max_window // block_size) + 2)
    small = SlotDiffLayout(num_slots, max_blocks, min(num_slots, 8), entries, min(num_slots, 32))
    large = SlotDiffLayout(num_slots, max_blocks, num_slots, entries + num_slots, num_slots)
    return (small, large) if small != large else (large,)


class SlotAllocator:
    """Free slot ids [0, num_slots), lowest first."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free slot: more running sequences than max_num_seqs")
        return self._free.pop()

    def free(self, slot: int) -> None:
        self._free.append(slot)

    def reset(self) -> None:
        self.__init__(self.num_slots)


def sampling_row(sp, *, greedy: bool, seed: int, max_len: int) -> np.ndarray:
    """The settings part of a slot row (every column but slot, token,
    position, active, num_generated, counts_from and the table)."""
    row = np.zeros(ROW.table, np.int32)
    row[ROW.max_len] = max_len
    row[ROW.min_tokens] = sp.min_tokens
    row[ROW.ignore_eos] = sp.ignore_eos
    row[ROW.top_k] = 0 if greedy or sp.top_k < 0 else sp.top_k
    row[ROW.seed] = np.uint32(seed % (1 << 32)).view(np.int32)
    row[ROW.beam_group] = -1
    floats = np.array([0.0 if greedy else sp.temperature, sp.top_p, sp.min_p,
                       sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, 0.0],
                      np.float32)
    row[ROW.temperature:ROW.temperature + len(DIFF_FLOAT_FIELDS)] = floats.view(np.int32)
    stop = list(sp.stop_token_ids)[:MAX_STOP]
    row[ROW.stop:ROW.stop + MAX_STOP] = -1
    row[ROW.stop:ROW.stop + len(stop)] = stop
    return row


class SlotDiff:
    """Changes to the persistent batch collected during one step."""

    def __init__(self, layouts: tuple[SlotDiffLayout, ...]):
        self.layouts = layouts
        self.num_slots = layouts[0].num_slots
        self.max_blocks = layouts[0].max_blocks
        self.clear()

    def clear(self) -> None:
        self._rows: list[np.ndarray] = []
        self._entries: list[tuple[int, int, int]] = []
        self._off: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._rows or self._entries or self._off)

    def fill(self, slot: int, settings: np.ndarray, *, token: int, position: int,
             num_generated: int, table: list[int], counts_from: int = -1,
             active: bool = True, beam: tuple[int, int, int] | None = None,
             cum_logprob: float = 0.0) -> None:
        """A whole row for `slot` (settings from `sampling_row`); `beam`:
        (group id, rank, width) of a beam-search sequence, whose device-side
        cumulative logprob starts at `cum_logprob` (a float32)."""
        if len(table) > self.max_blocks:
            raise ValueError(f"a block table of {len(table)} blocks does not fit "
                             f"max_blocks_per_seq={self.max_blocks}")
        row = np.zeros(ROW.table + self.max_blocks, np.int32)
        row[:ROW.table] = settings
        row[ROW.slot], row[ROW.token], row[ROW.position] = slot, token, position
        row[ROW.active], row[ROW.num_generated], row[ROW.counts_from] = \
            active, num_generated, counts_from
        row[ROW.table:ROW.table + len(table)] = table
        if beam is not None:
            row[ROW.beam_group], row[ROW.beam_rank], row[ROW.beam_width] = beam
            row[ROW.cum_logprob] = np.float32(cum_logprob).view(np.int32)
        self._rows.append(row)

    def set_block(self, slot: int, column: int, block: int) -> None:
        self._entries.append((slot, column, block))

    def switch_off(self, slot: int) -> None:
        self._off.append(slot)

    def pack(self) -> tuple[SlotDiffLayout, np.ndarray]:
        """The smallest layout that holds the diff, and the packed buffer
        (padding names slot num_slots: dropped on the device)."""
        counts = (len(self._rows), len(self._entries), len(self._off))
        layout = next((lay for lay in self.layouts if lay.fits(*counts)), None)
        if layout is None:
            raise RuntimeError(f"a step's slot diff {counts} exceeds the largest layout")
        buf = np.empty(layout.size, np.int32)
        rows, entries, off = layout.split(buf)
        rows.fill(0)
        rows[:, ROW.slot] = self.num_slots
        if self._rows:
            rows[:len(self._rows)] = self._rows
        entries.fill(self.num_slots)
        if self._entries:
            entries[:len(self._entries)] = self._entries
        off.fill(self.num_slots)
        off[:len(self._off)] = self._off
        self.clear()
        return layout, buf
