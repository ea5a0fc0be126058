"""LLM: the offline batch API (tokenize, generate, detokenize)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence as Seq

from jpaged.config import EngineConfig
from jpaged.engine import LLMEngine
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import SamplingParams


class LLM:
    """Generates completions for a batch of prompts with continuous batching.

    Example:
        llm = LLM(model="smollm2-135m")
        outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))

    Args:
      model: "smollm2-135m", a Hugging Face model directory, a converted
        checkpoint directory, or a .gguf file; or an already loaded
        ``models.LoadedModel`` (e.g. from ``models.random_model``).
      **kwargs: any EngineConfig field (dtype, block_size, max_num_seqs,
        max_model_len, num_gpu_blocks, gpu_memory_utilization, swap_space,
        preemption_mode, enable_prefix_caching, seed, ...).
    """

    def __init__(self, model="smollm2-135m", *, use_tqdm_warmup: bool = True, **kwargs):
        loaded = None
        if not isinstance(model, str):
            loaded, model = model, getattr(model, "name", "custom")
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.config, model=loaded, progress=use_tqdm_warmup)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts=None, sampling_params=None, *, prompt_token_ids=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion.

        Args:
          prompts: a string, a list of strings, or a list of token-id lists.
          sampling_params: one SamplingParams for all, or one per prompt.
          prompt_token_ids: token-id lists (alternative to `prompts`).
        Returns:
          RequestOutputs in input order. A request the engine cannot serve
          (e.g. a prompt longer than max_model_len) comes back with `error`
          set and no outputs; the others are unaffected.
        """
        if prompts is None and prompt_token_ids is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None:
            items = [(None, list(ids)) for ids in prompt_token_ids]
        else:
            items = [(None, list(p)) if not isinstance(p, str) else (p, None) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(items)
        if len(sampling_params) != len(items):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for "
                             f"{len(items)} prompts")
        ids = [str(next(self._counter)) for _ in items]
        # Check every request before queueing any, so a bad one leaves nothing half-run.
        toks = [self.engine.prepare_request(rid, text, sp, t)
                for rid, (text, t), sp in zip(ids, items, sampling_params)]
        for rid, (text, _), t, sp in zip(ids, items, toks, sampling_params):
            self.engine.add_request(rid, text, sp, prompt_token_ids=t)
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (a list of
        {"role", "content"} dicts) or a list of them, then generates."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.apply_chat_template(c, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
                   for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids, use_tqdm) -> list[RequestOutput]:
        from tqdm import tqdm
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="requests", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                done[out.request_id] = out
                bar.update(1)
        bar.close()
        return [done[i] for i in ids]
