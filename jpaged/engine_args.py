"""The model and engine flags the scripts share (generate.py, serve.py,
bench_serving.py), and the model and LLM keyword arguments they give.

Host only: nothing here starts jax until ``load_model`` is called.
"""
from __future__ import annotations

import argparse
import dataclasses

from jpaged import config as config_lib
from jpaged.config import EngineConfig


# The scripts' context limit (generate.py, serve.py and the bench scripts);
# EngineConfig's is the model's own.
SCRIPT_MAX_MODEL_LEN = 2048

# Per field: what the scripts' flag does differently from the bare field
# (a default of their own, a help of their own, the group it sits in).
_FLAG_DEFAULTS = {
    # generate.py caps the batch at the number of prompts; serve.py at EngineConfig's
    "max_num_seqs": None,
    # (0: the model's own)
    "max_model_len": SCRIPT_MAX_MODEL_LEN,
}
_FLAG_HELP = {
    "model": "registered name, HF directory, converted directory or .gguf file",
    "max_model_len": "longest prompt + output; every prefill bucket up to it is "
                     "compiled at start-up (0: the model's own limit)",
    "num_gpu_blocks": "KV pool size in blocks (default: from --gpu-memory-utilization)",
    "tensor_parallel_size": "devices the model and KV pool are split over (heads, MLP "
                            "columns, vocabulary); must divide the MLP width; query heads "
                            "that don't split evenly are padded with zero heads",
    "data_parallel_size": "independent engine replicas, each on its own "
                          "--tensor-parallel-size devices (replica r: devices r*tp to "
                          "(r+1)*tp-1) with its own KV pool of --num-gpu-blocks; each request "
                          "goes to the replica with the fewest unfinished requests; with several "
                          "hosts, the replicas of all of them (each within one host; "
                          "prompt i runs on host i % N)",
}
_CHOICES = {"dtype": config_lib.DTYPES, "attention_backend": config_lib.ATTENTION_BACKENDS,
            "preemption_mode": [m for m in config_lib.PREEMPTION_MODES if m is not None]}
_PARALLEL_GROUP = {"tensor_parallel_size", "data_parallel_size"}


def field_docs() -> dict[str, str]:
    """EngineConfig's field docs, from its docstring's "Attributes:" section
    (one flag help per field, written once, beside the field)."""
    docs, name = {}, None
    lines = EngineConfig.__doc__.split("Attributes:", 1)[1].splitlines()
    for line in lines:
        head = line[6:] if line.startswith("      ") and not line.startswith("       ") else None
        if head and ":" in head and head.split(":", 1)[0].isidentifier():
            name, text = head.split(":", 1)
            docs[name] = text.strip()
        elif name is not None and line.strip():
            docs[name] += " " + line.strip()
    return docs


def _flag_type(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return int if kind.startswith("int") else float if kind.startswith("float") else str


def add_engine_args(parser: argparse.ArgumentParser, *,
                    max_num_seqs_help: str = "most sequences in one step (every batch-size "
                                             "bucket up to it is compiled at start-up)"):
    """Adds the "model and engine" and "parallelism" groups: a flag per
    EngineConfig field (--field-name; a field that is on by default gets
    --no-field-name), its help from the field's doc, its default the
    field's unless _FLAG_DEFAULTS says otherwise; and --random-weights.

    Returns: (model_group, parallel_group), so a script can add its own flags to them.
    """
    defaults = EngineConfig()
    docs = field_docs()
    helps = dict(_FLAG_HELP, max_num_seqs=max_num_seqs_help)
    m = parser.add_argument_group("model and engine")
    t = parser.add_argument_group("parallelism (README, \"Tensor parallelism\" and "
                                  "\"Data parallelism\")")
    for f in dataclasses.fields(EngineConfig):
        group = t if f.name in _PARALLEL_GROUP else m
        flag = "--" + f.name.replace("_", "-")
        default = _FLAG_DEFAULTS.get(f.name, getattr(defaults, f.name))
        # (argparse formats a help with %: a literal one is written %%)
        doc = helps.get(f.name, docs[f.name]).rstrip(".").replace("%", "%%")
        if isinstance(default, bool):
            if default:
                group.add_argument("--no-" + flag[2:], action="store_true",
                                   help=f"turns {f.name} off ({f.name}: {doc})")
            else:
                group.add_argument(flag, action="store_true", help=doc)
            continue
        if default is not None:
            doc += f" (default: {default})"
        group.add_argument(flag, type=_flag_type(f), default=default,
                           choices=_CHOICES.get(f.name), help=doc)
        if f.name == "model":
            m.add_argument("--random-weights", action="store_true",
                           help="use random weights of --model's shape (a models.random_model "
                                "preset or HF config); such a model has no tokenizer, so "
                                "prompts must be token ids")
    return m, t


def check_one_replica(parser: argparse.ArgumentParser, args) -> None:
    """parser.error for --data-parallel-size > 1 in a script that drives one
    engine replica (the server and its benchmark: serving through several
    replicas is not built yet)."""
    if args.data_parallel_size > 1:
        parser.error(f"--data-parallel-size {args.data_parallel_size}: the server runs one "
                     "engine replica; data parallelism is offline only for now (LLM.generate, "
                     "scripts/generate.py, scripts/bench_throughput.py)")


def load_model(args):
    """--model as LLM takes it: a name or path, or random weights of its shape."""
    if not args.random_weights:
        return args.model
    import models
    from models import load_hf_config
    from jpaged.engine import enable_compilation_cache
    enable_compilation_cache()  # the model's init compiles too
    return models.random_model(load_hf_config(args.model),
                               dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                               seed=args.seed, fast_init=True)


def llm_kwargs(args) -> dict:
    """The EngineConfig fields the flags set, --model aside (LLM's first
    argument, load_model's); a flag left at None, and --max-model-len 0,
    keep EngineConfig's default."""
    kwargs = {}
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model":
            continue
        if isinstance(f.default, bool) and f.default:
            kwargs[f.name] = not getattr(args, "no_" + f.name)
            continue
        value = getattr(args, f.name)
        if value is not None and not (f.name == "max_model_len" and value == 0):
            kwargs[f.name] = value
    return kwargs
