r"""Batch generation from the command line.

Examples:
  python scripts/generate.py --prompt "The capital of France is" --max-tokens 16
  python scripts/generate.py --prompts-file prompts.txt --output out.jsonl
  python scripts/generate.py --prompts-file prompts.jsonl --output out.jsonl
  cat prompts.jsonl | python scripts/generate.py --stdin --input-format jsonl --temperature 0.8 --n 2
  python scripts/generate.py --prompt "Hello" --tensor-parallel-size 2   # 2 devices

Several hosts (run on every host, process ids 0 .. N-1; README, "Tensor parallelism"):
  python scripts/generate.py --prompt "Hello" --tensor-parallel-size 16 \
      --coordinator-address host0:1234 --num-processes 2 --process-id 0
With --data-parallel-size instead (README, "Data parallelism"), each host runs
the prompts i with i % N == its process id on its own replicas; process 0
writes its records as they finish and the others' once every host is done
(its closing summary counts its own replicas' steps and blocks).

Input: a text file (or --stdin) holds one prompt per non-blank line, taken
verbatim; a .jsonl file (or --input-format jsonl) one {"prompt": "..."} or
{"prompt_token_ids": [...]} object per non-blank line.

Output: one JSON record per prompt, written when its request finishes (so in
finishing order): {"index": position among all prompts, "source": file,
"<stdin>", "--prompt" or "random", "line": line number in that file (or null),
"request_id", "prompt", "error", "outputs": [{"text", "token_ids",
"cumulative_logprob", "finish_reason"}]}. A bad line (broken JSON, no prompt,
ids outside the vocabulary, a prompt too long, ...) gets a record with
"error" set and no generated tokens; the other lines still run. Ctrl-C keeps the
records written so far (exit status 130).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from jpaged.config import EngineConfig
from jpaged.engine_args import add_engine_args, llm_kwargs, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("prompts (any mix; at least one)")
    src.add_argument("--prompt", action="append", default=[],
                     help="a prompt (repeat the flag for several)")
    src.add_argument("--prompts-file", help="a file of prompts, one per line (see --input-format)")
    src.add_argument("--stdin", action="store_true",
                     help="read prompts from standard input, one per line (see --input-format)")
    src.add_argument("--input-format", choices=["auto", "text", "jsonl"], default="auto",
                     help="how --prompts-file and --stdin lines are read: text (each non-blank "
                          "line is one prompt, verbatim) or jsonl (each non-blank line is "
                          "{\"prompt\": \"...\"} or {\"prompt_token_ids\": [...]}); auto: "
                          "jsonl for a .jsonl file, text otherwise and for --stdin")
    src.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the model's chat template")
    m, t = add_engine_args(p, max_num_seqs_help=(
        "most sequences in one step (default: the number of sequences asked for, rounded "
        f"up to a power of two, at most EngineConfig's {EngineConfig.max_num_seqs}; every "
        "batch-size bucket up to it is compiled at start-up)"))
    m.add_argument("--num-random-prompts", type=int, default=0,
                   help="with --random-weights: generate this many random token prompts")
    m.add_argument("--random-prompt-len", type=int, default=128,
                   help="length of each random prompt")
    t.add_argument("--coordinator-address", default=None,
                   help="multi-host: host:port of process 0, for jax.distributed.initialize "
                        "(or JAX_COORDINATOR_ADDRESS); a single host needs none of these")
    t.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes, one per host (or JAX_NUM_PROCESSES)")
    t.add_argument("--process-id", type=int, default=None,
                   help="multi-host: this process's id in [0, num_processes) "
                        "(or JAX_PROCESS_ID); only process 0 writes the output")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64, help="most new tokens per output")
    s.add_argument("--min-tokens", type=int, default=0, help="fewest new tokens before stopping")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    s.add_argument("--top-k", type=int, default=-1, help="keep the k best tokens (-1 off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * best")
    s.add_argument("--n", type=int, default=1, help="outputs per prompt")
    s.add_argument("--best-of", type=int, default=None, help="candidates per prompt (>= n)")
    s.add_argument("--beam-width", type=int, default=0,
                   help="beam search with this width (sets use_beam_search, best_of)")
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam search length penalty")
    s.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style presence penalty")
    s.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style frequency penalty")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style repetition penalty")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--stop-token-id", type=int, action="append", default=None,
                   help="stop token id (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    s.add_argument("--logprobs", type=int, default=None, help="top logprobs per output token")
    s.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    o = p.add_argument_group("output")
    o.add_argument("--output", help="write the JSONL records here, each as soon as its request "
                   "finishes (default: standard output); opened before the model loads")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


@dataclasses.dataclass
class Input:
    """One prompt as read: text or token ids, or the error that makes it unusable."""
    source: str  # a file name, "<stdin>", "--prompt" or "random"
    line: int | None = None  # 1-based line number in `source` (file and stdin only)
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    error: str | None = None
    index: int = -1

    @property
    def where(self) -> str:
        return (f"{self.source} line {self.line}" if self.line is not None
                else f"{self.source} (input {self.index})")


def parse_jsonl(line: str) -> tuple[str | None, list[int] | None]:
    """The prompt of one JSONL line; ValueError saying what is wrong with it."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError('expected a JSON object {"prompt": "..."} or {"prompt_token_ids": '
                         f"[...]}}, got {line.strip()[:80]}")
    prompt, ids = rec.get("prompt"), rec.get("prompt_token_ids")
    if prompt is None and ids is None:
        raise ValueError('needs "prompt" (a string) or "prompt_token_ids" (a list of ints); '
                         f"got the keys {sorted(rec)}")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f'"prompt" must be a string, got {json.dumps(prompt)[:80]}')
    if ids is not None and not (isinstance(ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError(f'"prompt_token_ids" must be a list of ints, got {json.dumps(ids)[:80]}')
    return prompt, ids


def read_lines(f, source: str, fmt: str) -> list[Input]:
    """Inputs of a text or JSONL stream (bytes or str lines), blank lines skipped."""
    inputs = []
    for lineno, raw in enumerate(f, 1):
        x = Input(source, lineno)
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            line = line.rstrip("\r\n")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            if fmt == "text":
                x.prompt = line
            else:
                x.prompt, x.prompt_token_ids = parse_jsonl(line)
        except UnicodeDecodeError as e:
            x.error = f"{x.where}: not UTF-8 text ({e.reason} at byte {e.start})"
        except ValueError as e:
            x.error = f"{x.where}: {e}"
        inputs.append(x)
    return inputs


def read_inputs(args) -> list[Input]:
    inputs = [Input("--prompt", prompt=p) for p in args.prompt]
    if args.prompts_file:
        fmt = args.input_format
        if fmt == "auto":
            fmt = "jsonl" if args.prompts_file.endswith(".jsonl") else "text"
        try:
            with open(args.prompts_file, "rb") as f:
                inputs += read_lines(f, args.prompts_file, fmt)
        except OSError as e:
            sys.exit(f"--prompts-file {args.prompts_file}: {e.strerror}")
    if args.stdin:
        inputs += read_lines(getattr(sys.stdin, "buffer", sys.stdin), "<stdin>",
                             "jsonl" if args.input_format == "jsonl" else "text")
    if args.random_weights and args.num_random_prompts:
        import numpy as np
        from models import load_hf_config  # a preset name or an HF config .json
        vocab = load_hf_config(args.model)["vocab_size"]
        rng = np.random.default_rng(args.seed)
        inputs += [Input("random", prompt_token_ids=rng.integers(0, vocab, args.random_prompt_len).tolist())
                   for _ in range(args.num_random_prompts)]
    for i, x in enumerate(inputs):
        x.index = i
    return inputs


def open_output(path):
    """The output stream, opened before any work so a bad path costs nothing."""
    if path is None:
        return sys.stdout
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as e:
        sys.exit(f"--output {path}: cannot write there ({e.strerror}); give a file "
                 "in an existing, writable directory")


def load_llm(args, max_num_seqs: int, freeze: bool = False):
    """The warmed-up LLM; freeze: jpaged.engine.freeze_heap() then (from
    the command line)."""
    from jpaged import LLM
    llm = LLM(load_model(args), **dict(llm_kwargs(args), max_num_seqs=max_num_seqs),
              use_tqdm_warmup=not args.no_progress)
    if freeze:
        from jpaged.engine import freeze_heap
        freeze_heap()
    return llm


def sampling_params(args):
    from jpaged.sampling_params import SamplingParams  # host only: jax is not started yet
    beam = args.beam_width > 0
    try:
        return SamplingParams(
            n=args.n, best_of=args.beam_width if beam else args.best_of,
            temperature=0.0 if beam else args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p, seed=args.sampling_seed, use_beam_search=beam,
            length_penalty=args.length_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
            stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
            max_tokens=args.max_tokens, min_tokens=args.min_tokens, logprobs=args.logprobs)
    except ValueError as e:
        sys.exit(f"sampling flags: {e}")


def record(x: Input, out=None) -> dict:
    """The output line of input `x`: its RequestOutput `out`, or `x.error`."""
    return {"index": x.index, "source": x.source, "line": x.line, "request_id": str(x.index),
            "prompt": out.prompt if out is not None else x.prompt,
            "error": out.error if out is not None else x.error,
            "outputs": [] if out is None else [
                {"text": c.text, "token_ids": c.token_ids,
                 "cumulative_logprob": c.cumulative_logprob,
                 "finish_reason": c.finish_reason} for c in out.outputs]}


def main(argv=None):
    args = parse_args(argv)
    sp = sampling_params(args)
    distributed = bool(args.coordinator_address or args.num_processes is not None
                       or args.process_id is not None
                       or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    is_writer = True
    if distributed:  # before anything starts jax's backend
        from jpaged.parallel import initialize_distributed
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        import jax
        is_writer = jax.process_index() == 0  # (data parallelism: it gathers the others')
    sink = open_output(args.output) if is_writer else None
    from tqdm import tqdm
    inputs = read_inputs(args)
    if not inputs:
        sys.exit("no prompts: give --prompt, --prompts-file or --stdin")
    num_written = num_rejected = num_generated = 0
    bar = tqdm(total=len(inputs), desc="requests", disable=args.no_progress or not is_writer)

    def write(rec):
        nonlocal num_written, num_rejected, num_generated
        num_written += 1
        num_rejected += rec["error"] is not None
        num_generated += sum(len(c["token_ids"]) for c in rec["outputs"])
        bar.update(1)
        if sink is not None:
            sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
            sink.flush()

    kept = []  # this process's records (data parallelism over processes: for the gather)

    def finish(rec):
        kept.append(rec)
        write(rec)

    max_num_seqs = args.max_num_seqs
    if max_num_seqs is None:
        wanted = len(inputs) * max(args.n, args.best_of or 1, args.beam_width)
        max_num_seqs = min(EngineConfig.max_num_seqs, 1 << max(0, wanted - 1).bit_length())
    eng, pending = None, set()
    try:
        t0 = time.perf_counter()
        llm = load_llm(args, max_num_seqs, freeze=argv is None)
        eng = llm.engine
        t_ready = time.perf_counter()
        from jpaged.data_parallel import DataParallelEngine, replicas  # (jax has started)
        # data parallelism over several processes: each runs its own share of the inputs
        split = isinstance(eng, DataParallelEngine) and eng.num_processes > 1
        own = eng.own_indices(len(inputs)) if split else range(len(inputs))
        runners = [e.runner for e in replicas(eng)]  # (one, or one per data-parallel replica)
        tok = llm.get_tokenizer()
        if args.chat and (tok is None or not getattr(tok, "chat_template", None)):
            sys.exit("--chat: this model has no chat template")
        by_id = {str(x.index): x for x in inputs}
        for x in (inputs[i] for i in own):  # all queued before the first step: they share it
            if x.error is None:
                prompt = x.prompt
                if args.chat and x.prompt_token_ids is None:
                    prompt = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                     tokenize=False, add_generation_prompt=True)
                try:
                    eng.add_request(str(x.index), prompt, sp, prompt_token_ids=x.prompt_token_ids)
                    pending.add(str(x.index))
                except ValueError as e:
                    x.error = f"{x.where}: {e}"
            if x.error is not None:
                finish(record(x))
        eng.clear_arrivals()  # an offline batch: decode windows at once
        while eng.has_unfinished_requests():
            for out in eng.step():
                pending.discard(out.request_id)
                finish(record(by_id[out.request_id], out))
        if split:  # a collective: every process gets here with its share's records
            for rec in eng.gather_outputs(sorted(kept, key=lambda r: r["index"]), len(inputs)):
                if rec["index"] not in own:
                    write(rec)
        t_done = time.perf_counter()
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {num_written} of {len(inputs)} results written to "
              f"{args.output or 'standard output'}", file=sys.stderr)
        for rid in pending:
            eng.abort_request(rid)
        sys.exit(130)
    finally:
        bar.close()
        if sink not in (None, sys.stdout):
            sink.close()
    if not is_writer:
        return
    st = eng.stats.snapshot()  # (data parallelism: the replicas' counters added up)
    elapsed = t_done - t_ready
    pool = sum(r.num_gpu_blocks - 1 for r in runners)
    steps = max(1, st["num_steps"])
    print(f"\nrequests: {num_written} ({num_rejected} rejected) | "
          f"generated tokens: {num_generated} | {num_generated / max(elapsed, 1e-9):.1f} tokens/s "
          f"over {elapsed:.2f} s | "
          f"start-up {t_ready - t0:.1f} s (warm-up "
          f"{st['warmup_seconds']:.1f} s, {st['compiles_at_warmup']} compiles, "
          f"{st['compiles_after_warmup']} after) | "
          f"{st['num_steps']} steps ({st['num_steps_ahead']} dispatched ahead): host "
          f"{1e3 * st['host_seconds'] / steps:.2f} ms/step, waiting for the device "
          f"{1e3 * st['device_seconds'] / steps:.2f} ms/step | peak KV usage "
          f"{st['peak_blocks_used']}/{pool} blocks "
          f"({100 * st['peak_blocks_used'] / max(pool, 1):.1f}%) | preemptions "
          f"{eng.stats.num_preemptions}", file=sys.stderr)


if __name__ == "__main__":
    main()
