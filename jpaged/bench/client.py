"""The load generator of scripts/bench_serving.py: streamed /v1/completions
calls with Poisson arrivals, timed on the client side.

It runs in a process of its own (``poisson_load`` is what the benchmark
submits to a spawned worker), so the client's Python work does not compete
with the server's for one interpreter lock. Needs httpx2 and numpy only.
"""
from __future__ import annotations

import asyncio
import json
import time


async def _one(client, url: str, body: dict) -> dict:
    """One streamed completion: its token ids and when each chunk came."""
    t0 = time.perf_counter()
    times, ids, error = [], [], None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
        else:
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                new = [t for c in chunk["choices"] for t in c.get("token_ids") or ()]
                if new:
                    times.append(time.perf_counter())
                    ids += new
    return dict(t0=t0, times=times, ids=ids, error=error)


async def _load(url, model, prompts, output_lens, arrivals) -> dict:
    import httpx2
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for ids, num_out, at in zip(prompts, output_lens, arrivals):
            delay = start + float(at) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = dict(model=model, prompt=ids, max_tokens=num_out, temperature=0.0,
                        ignore_eos=True, stream=True, return_token_ids=True)
            tasks.append(asyncio.create_task(_one(client, url + "/v1/completions", body)))
        results = await asyncio.gather(*tasks)
        return dict(results=results, seconds=time.perf_counter() - start)


def poisson_load(url: str, model: str, prompts: list[list[int]], output_lens: list[int],
                 rate: float, seed: int) -> dict:
    """Sends every prompt (greedy, ignore_eos, max_tokens = its output
    length, streamed, token ids returned) at Poisson arrival times of
    `rate` requests/s (inf: all at once).

    Returns: {"results": per request in order {"t0": send time, "times":
    perf_counter of each chunk with tokens, "ids": the token ids, "error":
    None or the message}, "seconds": first send to last answer}.
    """
    from jpaged.bench.workloads import poisson_arrivals
    arrivals = poisson_arrivals(len(prompts), rate, seed)
    return asyncio.run(_load(url, model, prompts, output_lens, arrivals))
