"""PNG plot of a benchmark result (<out>.json from e2e_bench.py, peer_bench.py,
layer_bench.py, decode_bench.py or cp_bench.py): throughput against sequence length per
model/pattern (and fla's own layer where layer_bench timed it), and the ratio to the run's
baseline where it has one.

    python benchmarks/plot.py benchmarks/results/e2e_h100.json   # writes e2e_h100.png
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def series(rows):
    """{label: [(T, tokens/s, ratio or None)]} with the label of each kind of result file."""
    out = defaultdict(list)
    for r in rows:
        if r.get("none_ms") is not None:  # cp: each form's tokens/s, its ratio to no CP
            for form in ("none", "default", "three_pass", "fla"):
                if r.get(f"{form}_ms") is not None:
                    out[f"{r['mixer']} CP {form}"].append(
                        (r["T"], r["B"] * r["T"] / r[f"{form}_ms"] * 1e3, r.get(f"{form}_x")))
            continue
        if r.get("tokens_per_s") is None and r.get("layer_ms") is None:
            continue
        if "pattern" in r:  # e2e
            label = "all-N softmax" if r["pattern"] == "N" else f"{r['pattern']} {r['mixer']}"
            ratio = r.get("speedup_vs_N")
        elif "decoding" in r:  # decode: generated tokens/s against the prompt length
            label, ratio = f"{r['mixer']} {r['decoding']}", r.get("speedup_vs_rerun")
        elif "model" in r:  # peer
            label, ratio = r["model"], r.get("speedup_vs_fla")
        else:  # layer: tokens/s of the full layer's fwd + bwd
            label, ratio = r["mixer"], r.get("overhead")
            if r.get("fla_layer_ms") is not None:  # --against-fla: fla's own layer beside it
                out[f"fla's {label} layer"].append(
                    (r["T"], r["B"] * r["T"] / r["fla_layer_ms"] * 1e3, None))
            r = {**r, "tokens_per_s": r["B"] * r["T"] / r["layer_ms"] * 1e3}
        out[label].append((r["T"], r["tokens_per_s"], ratio))
    return {k: sorted(v) for k, v in out.items()}


def plot(path: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        result = json.load(f)
    data = series(result["rows"])
    if not data:
        raise ValueError(f"{path} has no measured rows (tokens_per_s) to plot")
    legend_in = 0.2 * ((len(data) + 1) // 2) + 0.15  # two columns of legend below the panels
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5 + legend_in))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, points) in enumerate(data.items()):
        # one colour per series on both axes: the ratio panel has fewer series than the left one
        style = dict(marker="o", color=colors[i % len(colors)],
                     linestyle="-" if i < len(colors) else "--")
        ts = [p[0] for p in points]
        left.plot(ts, [p[1] for p in points], label=label, **style)
        ratios = [(t, p[2]) for t, p in zip(ts, points) if p[2] is not None]
        if ratios:
            right.plot(*zip(*ratios), **style)
    for ax, ylabel in ((left, "tokens/s"), (right, "ratio to the baseline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    # below both panels, where it hides no point
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    env = result.get("environment", {})
    fig.suptitle(f"{os.path.basename(path)} - {env.get('device', '?')}, torch "
                 f"{env.get('torch', '?')}, fla {env.get('fla', '?')}, {env.get('date', '')}",
                 fontsize=9)
    fig.tight_layout(rect=(0, legend_in / (4.5 + legend_in), 1, 1))
    out = out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a <out>.json written by a benchmark")
    parser.add_argument("--png", default=None, help="output path (default: next to the json)")
    args = parser.parse_args(argv)
    print(plot(args.result, args.png))


if __name__ == "__main__":
    main()
