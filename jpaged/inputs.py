"""Checks of what a user hands the engine: request ids, prompts, token ids.

Every check raises ValueError naming the request (or the prompt's position
in a ``generate`` call) and what is wrong with it; nothing is coerced
silently (a ``bytes`` prompt is not a list of token ids, ``True`` or ``3.0``
is not a token id). Host core: stdlib only, never imports jax (numpy
integer arrays are accepted without importing numpy).
"""
from __future__ import annotations

import operator

INT32_MAX = (1 << 31) - 1


def check_request_id(request_id) -> str:
    """A request id is a non-empty str (vLLM's type; ids are dict keys and
    appear in outputs and errors)."""
    if not isinstance(request_id, str) or not request_id:
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r} "
                         f"({type(request_id).__name__})")
    return request_id


def token_ids(value, what: str, vocab_size: int | None = None) -> list[int]:
    """`value` as a list of Python ints, or ValueError naming `what`.

    Accepts a list or tuple of ints or a 1-D integer array (numpy and the
    like: anything with ``__index__`` elements that is not bool). With
    `vocab_size`, every id must lie in ``[0, vocab_size)``; without, in int32.
    """
    if isinstance(value, (str, bytes, bytearray, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{what} must be a list of token ids (ints), got "
                         f"{type(value).__name__} {_short(value)}")
    if getattr(value, "ndim", 1) != 1:
        raise ValueError(f"{what} must be a flat list of token ids, got an array of "
                         f"shape {getattr(value, 'shape', None)}")
    out = []
    for i, t in enumerate(value):
        if type(t).__name__ in ("bool", "bool_") or not hasattr(t, "__index__"):
            raise ValueError(f"{what}: token ids must be ints, got {type(t).__name__} "
                             f"{_short(t)} at position {i}")
        out.append(operator.index(t))
    high = INT32_MAX + 1 if vocab_size is None else vocab_size
    bad = [t for t in out if not 0 <= t < high]
    if bad:
        where = "the vocabulary" if vocab_size is not None else "int32"
        raise ValueError(f"{what}: token ids {bad[:5]} are outside {where} [0, {high})")
    return out


def split_prompt(prompt, what: str,
                 vocab_size: int | None = None) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of one prompt of ``LLM.generate``: a str, a list of
    token ids, or vLLM's dict forms {"prompt": str} / {"prompt_token_ids": [...]}."""
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, dict):
        keys = set(prompt) - {"multi_modal_data", "mm_processor_kwargs"}
        if keys == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"], None
        if keys == {"prompt_token_ids"}:
            return None, token_ids(prompt["prompt_token_ids"], what, vocab_size)
        raise ValueError(f"{what}: a dict prompt must be {{'prompt': str}} or "
                         f"{{'prompt_token_ids': [int, ...]}}, got keys {sorted(prompt)}")
    if prompt is None or isinstance(prompt, (bytes, bytearray)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"{what} must be a string, a list of token ids or a dict with "
                         f"'prompt' or 'prompt_token_ids', got {type(prompt).__name__} "
                         f"{_short(prompt)}")
    return None, token_ids(prompt, what, vocab_size)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
