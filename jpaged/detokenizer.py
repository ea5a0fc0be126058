"""Incremental detokenization and stop strings, one token at a time.

Decoding each new token alone is wrong twice over: byte-level BPE splits a
multi-byte UTF-8 character over several tokens (alone, each decodes to
U+FFFD), and some decoders change a token's text by what precedes it
(leading spaces). So each sequence keeps a short window of token strings:

    tokens[prefix_offset:read_offset]  already turned into text; decoded again
                                       only as context
    tokens[read_offset:]               not yet turned into text

After a new token, decode the window with and without the unread part; the
text that grew is new, unless it ends in U+FFFD (a character still
incomplete), in which case the tokens wait for the next one. Tokens before
prefix_offset are dropped, so the state stays a few tokens long.

Stop strings are searched in the output text where the new characters could
complete one; the text is cut before the stop string (or after it with
include_stop_str). Deltas hold back the last len(longest stop) - 1
characters until they can no longer start a stop string, so the deltas of a
sequence always add up to its final text (call `flush` when it finishes for
another reason).

The engine glue: `state = detok.new_state(prompt_ids, skip_special_tokens)`
per sequence (`state.fork()` for beams / parallel samples), then per sampled
token `delta, hit = detok.step(state, token_id, stop, include_stop_str)`.
Do not pass the EOS / stop-token id itself (vLLM leaves it out of the text),
and pass check_stop=False until min_tokens are generated.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

# Prompt tokens kept as decoding context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclasses.dataclass
class DetokenizerState:
    """Detokenization state of one sequence.

    tokens:        token strings from prefix_offset on (older ones dropped)
    prefix_offset: start of the decoding context in tokens (0 after trimming)
    read_offset:   tokens before it are already text
    output_text:   the output text so far (cut at a stop string)
    num_emitted:   characters of output_text already returned as deltas
    stop_reason:   the stop string that ended the text, or None
    """

    tokens: list[str]
    prefix_offset: int
    read_offset: int
    skip_special_tokens: bool = True
    output_text: str = ""
    num_emitted: int = 0
    stop_reason: Optional[str] = None

    def fork(self) -> DetokenizerState:
        """An independent copy (for a forked beam or parallel sample)."""
        return dataclasses.replace(self, tokens=list(self.tokens))


class Detokenizer:
    """Incremental detokenizer for a Hugging Face fast tokenizer.

    Args:
      tokenizer: a transformers fast tokenizer (anything with
        `backend_tokenizer`) or a `tokenizers.Tokenizer`.
    """

    def __init__(self, tokenizer: Any):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not (hasattr(backend, "id_to_token") and hasattr(backend, "decoder")):
            raise ValueError(
                f"Detokenizer needs a Hugging Face fast tokenizer or a tokenizers.Tokenizer, "
                f"got {type(tokenizer).__name__}")
        self._backend = backend
        self._decoder = backend.decoder
        if hasattr(tokenizer, "all_special_ids"):
            special = set(tokenizer.all_special_ids)
        else:
            special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self.special_ids = frozenset(int(i) for i in special)

    # -- helpers ------------------------------------------------------------

    def _to_tokens(self, token_ids: Sequence[int], skip_special_tokens: bool) -> list[str]:
        out = []
        for i in token_ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            # An id beyond the tokenizer's vocabulary (a model whose logits are
            # padded wider) has no text.
            tok = self._backend.id_to_token(i)
            out.append("" if tok is None else tok)
        return out

    def _tokens_to_text(self, tokens: list[str]) -> str:
        if not tokens:
            return ""
        if self._decoder is None:
            return " ".join(tokens)
        return self._decoder.decode(tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Whole-sequence decode through the same path as `step`."""
        return self._tokens_to_text(self._to_tokens(token_ids, skip_special_tokens))

    # -- per sequence -------------------------------------------------------

    def new_state(self, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> DetokenizerState:
        """The state of a sequence that has generated nothing yet: the last few
        prompt tokens serve as context, none of them is output text."""
        context = self._to_tokens(prompt_token_ids, skip_special_tokens)[-_PROMPT_CONTEXT_TOKENS:]
        return DetokenizerState(tokens=context, prefix_offset=0, read_offset=len(context),
                                skip_special_tokens=skip_special_tokens)

    def step(self, state: DetokenizerState, token_id: int, stop: Sequence[str] = (),
             include_stop_str: bool = False, check_stop: bool = True) -> tuple[str, Optional[str]]:
        """Add one generated token to `state`.

        Args:
          state: the sequence's DetokenizerState (updated in place).
          token_id: the new token.
          stop: stop strings; the first (leftmost) one found in the text ends it.
          include_stop_str: keep the stop string in the text.
          check_stop: False while fewer than min_tokens are generated: stop
            strings are then not searched, but pass the same `stop` anyway so
            the held-back text stays consistent.
        Returns:
          (delta, stop_str): the new text that can be shown now, and the stop
          string that was hit (the text is then final) or None.
        """
        if state.stop_reason is not None:
            raise ValueError("this sequence already hit a stop string; do not add tokens to it")
        prev_len = len(state.output_text)
        new_tokens = self._to_tokens([token_id], state.skip_special_tokens)
        if new_tokens:
            state.tokens.extend(new_tokens)
            self._read_new_text(state, final=False)
        return self._emit(state, stop, include_stop_str, check_stop, prev_len)

    def flush(self, state: DetokenizerState) -> str:
        """At the end of a sequence not stopped by a stop string: turn any
        incomplete trailing bytes into text (as U+FFFD, like a full decode)
        and return every character not returned yet."""
        if state.stop_reason is None:
            self._read_new_text(state, final=True)
        delta = state.output_text[state.num_emitted:]
        state.num_emitted = len(state.output_text)
        return delta

    def _read_new_text(self, state: DetokenizerState, final: bool) -> None:
        if state.read_offset >= len(state.tokens):
            return
        prefix_text = self._tokens_to_text(state.tokens[state.prefix_offset:state.read_offset])
        full_text = self._tokens_to_text(state.tokens[state.prefix_offset:])
        if len(full_text) <= len(prefix_text):
            if not final:
                return
        elif full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return  # the last character is still incomplete: wait for more bytes
        state.output_text += full_text[len(prefix_text):]
        # The read tokens become the next context; older ones are not needed.
        del state.tokens[:state.read_offset]
        state.prefix_offset, state.read_offset = 0, len(state.tokens)

    def _emit(self, state, stop, include_stop_str, check_stop, prev_len):
        text = state.output_text
        hit = None
        if check_stop:
            # A new stop string must end in the characters added by this step.
            best = None
            for s in stop:
                if not s:
                    continue
                i = text.find(s, max(0, prev_len - len(s) + 1))
                if i != -1 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, hit = best
                state.output_text = text = text[:i + len(hit)] if include_stop_str else text[:i]
                state.stop_reason = hit
        if hit is None and stop:
            hold = max(len(s) for s in stop) - 1
            upto = max(state.num_emitted, len(text) - hold)
        else:
            upto = len(text)
        # NOTE: upto < num_emitted only if `stop` changed mid-sequence; the
        # deltas then no longer add up to the text.
        delta = text[state.num_emitted:upto]
        state.num_emitted = upto
        return delta, hit
