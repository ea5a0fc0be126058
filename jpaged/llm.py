"""LLM: the offline batch API (tokenize, generate, detokenize)."""
from __future__ import annotations

import dataclasses
import itertools

from jpaged import inputs
from jpaged.config import EngineConfig
from jpaged.data_parallel import DataParallelEngine
from jpaged.engine import LLMEngine
from jpaged.outputs import RequestOutput
from jpaged.sampling_params import RequestOutputKind, SamplingParams


FINAL_ONLY = RequestOutputKind.FINAL_ONLY


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
        preemption_mode, enable_prefix_caching, seed, tensor_parallel_size,
        data_parallel_size, ...).

    ``engine`` is an LLMEngine, or with data_parallel_size > 1 a
    jpaged.data_parallel.DataParallelEngine (the same request API over its
    replicas); generate() and chat() behave the same either way.
    """

    def __init__(self, model="smollm2-135m", *, use_tqdm_warmup: bool = True, **kwargs):
        loaded = None
        if not isinstance(model, str):
            loaded, model = model, getattr(model, "name", "custom")
        self.config = EngineConfig(model=model, **kwargs)
        engine_cls = LLMEngine if self.config.data_parallel_size == 1 else DataParallelEngine
        self.engine = engine_cls(self.config, model=loaded, progress=use_tqdm_warmup)
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts=None, sampling_params=None, *, prompt_token_ids=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt to completion.

        Args:
          prompts: a string, or a list whose items are each a string, a list
            of token ids, or vLLM's {"prompt": str} / {"prompt_token_ids": [...]}.
          sampling_params: one SamplingParams for all, or one per prompt.
          prompt_token_ids: token-id lists (alternative to `prompts`).
        Returns:
          RequestOutputs in input order. A request the engine cannot serve
          (e.g. a prompt longer than max_model_len) comes back with `error`
          set and no tokens; the others are unaffected.
        Raises:
          ValueError naming the prompt if any request is malformed; nothing
          is queued then. On any exception from the run, KeyboardInterrupt
          included, this call's requests are aborted (their blocks freed)
          before it propagates, so the next call starts clean.

        With data parallelism over several processes (jax.distributed),
        every process must make the same calls with the same prompts (as
        for multi-host tensor parallelism): each checks every request,
        runs request i when i % num_processes is its process index, and
        returns every process's outputs, gathered (a collective: a process
        that raises or stops before it leaves the others waiting there).
        """
        vocab = self.engine.model.config.vocab_size
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("generate() needs prompts or prompt_token_ids (exactly one of them)")
        if prompts is None:
            if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__"):
                raise ValueError("prompt_token_ids must be a list of token-id lists, got "
                                 f"{type(prompt_token_ids).__name__}")
            items = [(None, inputs.token_ids(ids, f"prompt_token_ids[{i}]", vocab))
                     for i, ids in enumerate(prompt_token_ids)]
        else:
            if isinstance(prompts, (str, dict)):
                prompts = [prompts]
            if not isinstance(prompts, (list, tuple)):
                raise ValueError(f"prompts must be a string or a list of prompts, got "
                                 f"{type(prompts).__name__}")
            items = [inputs.split_prompt(p, f"prompt {i}", vocab) for i, p in enumerate(prompts)]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(items)
        elif not isinstance(sampling_params, (list, tuple)):
            raise ValueError("sampling_params must be a SamplingParams or a list of them, got "
                             f"{type(sampling_params).__name__}")
        if len(sampling_params) != len(items):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for "
                             f"{len(items)} prompts")
        # NOTE: generate() hands back finished outputs only, as vLLM's LLM does.
        final = {}
        sampling_params = [sp if getattr(sp, "output_kind", None) in (None, FINAL_ONLY) else
                           final.setdefault(id(sp), dataclasses.replace(sp, output_kind=FINAL_ONLY))
                           for sp in sampling_params]
        ids = self._new_request_ids(len(items))
        # Check every request before queueing any, so a bad one leaves nothing half-run.
        toks = []
        for i, (rid, (text, t), sp) in enumerate(zip(ids, items, sampling_params)):
            try:
                toks.append(self.engine.prepare_request(rid, text, sp, t))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        # NOTE: with several processes each serves its own share (own_indices).
        own = (self.engine.own_indices(len(ids)) if isinstance(self.engine, DataParallelEngine)
               else range(len(ids)))
        own_ids = [ids[i] for i in own]
        try:
            for i in own:
                self.engine.add_request(ids[i], items[i][0], sampling_params[i],
                                        prompt_token_ids=toks[i])
            self.engine.clear_arrivals()  # an offline batch: decode windows at once
            outputs = self._run(own_ids, use_tqdm)
        except BaseException:
            self.engine.abort_request(own_ids)
            raise
        if isinstance(self.engine, DataParallelEngine):
            outputs = self.engine.gather_outputs(outputs, len(ids))
        return outputs

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

    def _new_request_ids(self, num: int) -> list[str]:
        """Fresh ids, none in use by a request added to the engine directly."""
        ids = []
        while len(ids) < num:
            rid = str(next(self._counter))
            if not self.engine.has_request(rid):
                ids.append(rid)
        return ids

    def _run(self, ids, use_tqdm) -> list[RequestOutput]:
        """Steps the engine until this call's requests are done; outputs of
        requests added to the engine by others are kept for their owner."""
        from tqdm import tqdm
        mine = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="requests", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                others = []
                for out in self.engine.step():
                    if out.request_id in mine:
                        if not out.finished:  # a streamed request's progress
                            continue
                        done[out.request_id] = out
                        bar.update(1)
                    else:
                        others.append(out)
                self.engine.keep_outputs(others)
                if len(done) < len(ids) and not self.engine.has_unfinished_seqs():
                    raise RuntimeError("the engine lost requests of this call: "
                                       f"{sorted(mine - done.keys())[:5]}")
        return [done[i] for i in ids]
