"""Hugging Face transformers baselines for the throughput benchmark.

Two ways transformers serves a batch on the same GPU, same weights shape,
same requests (greedy, fixed output length per request, EOS ignored):

- ``generate`` with static batches: requests in arrival order, batch_size at
  a time, left-padded; each batch runs until its longest output is done, so
  only each request's own output_len tokens count as useful.
- ``generate_batch``-style continuous batching: transformers' own paged
  continuous-batching manager, one ``add_request`` per request with its own
  ``max_new_tokens``.

Runs as its own process (``python -m jpaged.bench.hf_baseline``) so that torch
and JAX never share the GPU's memory, and a failure here cannot take the JAX
benchmark down. Imports torch only inside functions; no JAX at all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from jpaged.bench.workloads import Request, load_workload


def unavailable_reason(device: str = "cuda") -> str | None:
    """None when torch + transformers can run on `device`, else why not."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"torch/transformers not importable ({e}): Hugging Face baselines skipped"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "torch sees no CUDA device: Hugging Face baselines skipped"
    return None


def build_model(hf_config: dict, dtype: str = "bfloat16", device: str = "cuda", seed: int = 0):
    """A randomly initialised transformers model of hf_config's shape, on device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(hf_config)
    model_type = cfg.pop("model_type", None) or ("opt" if "OPT" in cfg["architectures"][0]
                                                  else "llama")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def _sync(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_static(model, requests, batch_size: int, device: str, progress: bool = True) -> dict:
    """`generate` over static batches of batch_size requests (arrival order)."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    def generate(batch):
        width = max(r.prompt_len for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - r.prompt_len:] = torch.tensor(r.prompt_token_ids)
            mask[i, width - r.prompt_len:] = 1
        m = max(r.output_len for r in batch)
        gc = GenerationConfig(max_new_tokens=m, min_new_tokens=m, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=gc)
        return out.shape[1] - width, m * len(batch)

    t0 = time.perf_counter()
    generate([Request(requests[0].prompt_token_ids[:8], 4)])  # CUDA init, kernels
    _sync(device)
    warmup = time.perf_counter() - t0
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    useful = sum(r.output_len for r in requests)
    generated = 0
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="HF generate (static batches)", disable=not progress):
        n, total = generate(batch)
        assert n == max(r.output_len for r in batch), "generate stopped early"
        generated += total
    _sync(device)
    elapsed = time.perf_counter() - t0
    return dict(num_requests=len(requests), batch_size=batch_size, seconds=elapsed,
                output_tokens=useful, generated_tokens_incl_padding=generated,
                output_tokens_per_s=useful / elapsed, requests_per_s=len(requests) / elapsed,
                warmup_seconds=warmup)


def run_continuous(model, requests, device: str, progress: bool = True,
                   max_memory_percent: float | None = None) -> dict:
    """transformers' continuous batching (the manager behind generate_batch)."""
    from tqdm import tqdm
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), do_sample=False,
                          eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig() if max_memory_percent is None else \
        ContinuousBatchingConfig(max_memory_percent=max_memory_percent)
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gc, block=True, timeout=30,
                                                   continuous_batching_config=cb) as manager:
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = [manager.add_request(r.prompt_token_ids, request_id=f"r{i}",
                                   max_new_tokens=r.output_len, eos_token_id=-1)
               for i, r in enumerate(requests)]
        results, bar = {}, tqdm(total=len(ids), desc="HF continuous batching",
                                disable=not progress)
        while len(results) < len(ids):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"request {res.request_id} failed: {res.error}")
                results[res.request_id] = res
                bar.update(1)
        _sync(device)
        elapsed = time.perf_counter() - t0
        bar.close()
    generated = sum(len(r.generated_tokens) for r in results.values())
    return dict(num_requests=len(requests), seconds=elapsed, output_tokens=generated,
                expected_output_tokens=sum(r.output_len for r in requests),
                output_tokens_per_s=generated / elapsed, requests_per_s=len(requests) / elapsed,
                warmup_seconds=warmup)


def run_all(hf_config: dict, requests, *, dtype="bfloat16", device="cuda", batch_size=64,
            seed=0, progress=True, systems=("hf-generate", "hf-generate-batch"),
            out_path: str | None = None) -> dict:
    """Runs the chosen HF systems; each result is its figures, or
    {"skipped": reason} / {"error": message}. out_path: rewritten after
    each system, so a caller that stops this process early keeps what finished."""
    reason = unavailable_reason(device)
    if reason is not None:
        return {s: dict(skipped=reason) for s in systems}
    import torch
    out = {}
    t0 = time.perf_counter()
    model = build_model(hf_config, dtype, device, seed)
    build_seconds = time.perf_counter() - t0
    for system in systems:
        try:
            if system == "hf-generate":
                res = run_static(model, requests, batch_size, device, progress)
            elif system == "hf-generate-batch":
                res = run_continuous(model, requests, device, progress)
            else:
                raise ValueError(f"unknown HF system {system!r}")
            res.update(model_build_seconds=build_seconds, torch=torch.__version__,
                       device_name=(torch.cuda.get_device_name() if device.startswith("cuda")
                                    else device))
            out[system] = res
        except Exception as e:  # recorded, so the other systems' figures survive
            out[system] = dict(error=f"{type(e).__name__}: {e}")
        if out_path is not None:
            _write_json(out, out_path)
    return out


def _write_json(obj, path: str) -> None:
    import os
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jpaged.bench.hf_baseline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, help="workload JSON (jpaged.bench.workloads.save_workload)")
    p.add_argument("--hf-config", required=True, help="JSON file holding the HF config dict")
    p.add_argument("--dtype", default="bfloat16", help="torch dtype of the weights")
    p.add_argument("--device", default="cuda", help="torch device (cpu only for trying it out)")
    p.add_argument("--batch-size", type=int, default=64, help="static batch size of generate")
    p.add_argument("--systems", default="hf-generate,hf-generate-batch",
                   help="comma-separated: hf-generate, hf-generate-batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="result JSON path")
    args = p.parse_args(argv)
    with open(args.hf_config) as f:
        hf_config = json.load(f)
    requests = load_workload(args.workload).requests
    res = run_all(hf_config, requests, dtype=args.dtype, device=args.device,
                  batch_size=args.batch_size, progress=not args.no_progress,
                  systems=tuple(args.systems.split(",")), out_path=args.out)
    _write_json(res, args.out)
    print(json.dumps(res, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()
