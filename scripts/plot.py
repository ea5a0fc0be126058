"""Draws PNG figures from the bench JSON files (matplotlib, no display needed).

- throughput-*.json (bench_throughput): output tokens/s and KV waste at peak per system.
- latency-*.json (bench_latency): normalized latency (s/token) vs request rate,
  one line per system, the paper's Figure 12 style, with the bound dashed.
- sharing-*.json (bench_sharing): % KV blocks saved and throughput gain for
  parallel sampling and beam search; prefix caching speed-up.
Each PNG is written next to its JSON (or into --out-dir) with the same stem.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*",
                   help="result JSON files (default: throughput-/latency-/sharing-*.json "
                        "in --results-dir)")
    p.add_argument("--results-dir", default="benchmarks/results",
                   help="where to look for JSON files when none are named")
    p.add_argument("--out-dir", default=None, help="PNG folder (default: next to each JSON)")
    p.add_argument("--latency-bound", type=float, default=None,
                   help="normalized-latency bound to draw (default: the one in the JSON)")
    p.add_argument("--max-latency", type=float, default=None,
                   help="upper y limit of the latency plot in s/token (default: automatic)")
    return p.parse_args(argv)


def kind_of(data: dict) -> str | None:
    if "parallel_sampling" in data or "shared_prefix" in data:
        return "sharing"
    systems = data.get("systems")
    if isinstance(systems, dict) and systems:
        first = next(iter(systems.values()))
        return "latency" if isinstance(first, dict) and "points" in first else "throughput"
    return None


def _title(data, what):
    return f"{what}\n{data.get('model', '?')} ({data.get('dtype', '?')}, random weights) " \
           f"on {data.get('device', '?')}, commit {str(data.get('commit'))[:10]}"


def plot_throughput(data, path, plt):
    names = [n for n, r in data["systems"].items() if r.get("output_tokens_per_s")]
    if not names:
        raise ValueError("no system in the JSON has a throughput figure")
    labels = [n.replace("hf-generate-batch", "HF cont.").replace("hf-generate", "HF static")
              for n in names]
    tps = [data["systems"][n]["output_tokens_per_s"] for n in names]
    waste = [data["systems"][n].get("kv_waste_pct_at_peak") for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(labels, tps, color="tab:blue")
    a.set_ylabel("output tokens/s")
    a.tick_params(axis="x", rotation=30)
    for i, v in enumerate(tps):
        a.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    kv = [(lab, w) for lab, w in zip(labels, waste) if w is not None]
    b.bar([k for k, _ in kv], [w for _, w in kv], color="tab:red")
    b.set_ylabel("KV waste at peak (% of pool)")
    b.tick_params(axis="x", rotation=30)
    fig.suptitle(_title(data, "Throughput, same requests"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latency(data, path, plt, bound=None, ymax=None):
    bound = bound if bound is not None else data.get("latency_bound")
    fig, ax = plt.subplots(figsize=(6, 4))
    top = 0.0
    for name, s in data["systems"].items():
        pts = [p for p in s["points"] if not p.get("truncated")
               and math.isfinite(p.get("mean_normalized_latency", math.nan))]
        if not pts:
            continue
        x = [p["rate"] for p in pts]
        y = [p["mean_normalized_latency"] for p in pts]
        top = max(top, max(y))
        sustained = s.get("sustained_rate")
        label = s.get("label", name) + (f" (max {sustained:g}/s)" if sustained else "")
        ax.plot(x, y, marker="o", label=label)
    if bound:
        ax.axhline(bound, color="gray", linestyle="--", linewidth=1, label=f"bound {bound:g} s/token")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("normalized latency (s/token)")
    if ymax is not None:
        ax.set_ylim(0, ymax)
    elif bound:
        ax.set_ylim(0, min(top * 1.05, 4 * bound) if top else 4 * bound)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(_title(data, "Normalized latency vs request rate"), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sharing(data, path, plt):
    """One panel per experiment the file holds (parallel, beams, prefix)."""
    panels = [k for k in ("parallel_sampling", "beam_search", "shared_prefix") if data.get(k)]
    if not panels:
        raise ValueError(f"{path}: the sharing result holds no experiment")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 0.4, 4), squeeze=False)
    what = {"parallel_sampling": "parallel sampling n", "beam_search": "beam width"}
    for ax, key in zip(axes[0], panels):
        entries = data[key]
        xs = list(entries)
        gain = [entries[k]["throughput_gain"] for k in xs]
        if key == "shared_prefix":
            ax.bar(xs, gain, color="tab:purple")
            ax.set_ylabel("speed-up with prefix caching (x)")
            ax.set_xlabel("shared prefix")
            continue
        ax.bar(xs, [entries[k]["blocks_saved_pct"] for k in xs], color="tab:green")
        ax.set_xlabel(what[key])
        ax.set_ylabel("KV blocks saved by sharing (%)")
        twin = ax.twinx()
        twin.plot(xs, gain, color="black", marker="o")
        twin.set_ylabel("throughput gain over unshared (x)")
    fig.suptitle(_title(data, "KV sharing"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = [pathlib.Path(f) for f in args.files]
    if not files:
        d = pathlib.Path(args.results_dir)
        files = sorted(f for pat in ("throughput-*.json", "latency-*.json", "sharing-*.json")
                       for f in d.glob(pat))
        if not files:
            raise FileNotFoundError(f"no throughput-/latency-/sharing-*.json in {d}")
    written = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no result file {f}")
        data = json.loads(f.read_text())
        kind = kind_of(data)
        if kind is None:
            raise ValueError(f"{f} is not a bench_throughput / bench_latency / bench_sharing result")
        out_dir = pathlib.Path(args.out_dir) if args.out_dir else f.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / (f.stem + ".png")
        if kind == "throughput":
            plot_throughput(data, path, plt)
        elif kind == "latency":
            plot_latency(data, path, plt, args.latency_bound, args.max_latency)
        else:
            plot_sharing(data, path, plt)
        written.append(str(path))
        print(f"{f} -> {path}")
    return written


if __name__ == "__main__":
    main()
