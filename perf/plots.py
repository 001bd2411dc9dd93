"""PNG plots of a serving benchmark's results (`perf/bench_serving.py --out DIR` writes
them with its `serving.json`; this re-plots a saved one):

    python perf/plots.py perf/results/serving/serving.json

`throughput.png`: output tokens/s against concurrency, one line per API.
`latency.png`: TTFT and inter-token latency percentiles (p50, p90, p99) against
concurrency, one line per API and percentile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here or in CI
import matplotlib.pyplot as plt

PERCENTILES = ("p50", "p90", "p99")
STYLES = {"p50": "-", "p90": "--", "p99": ":"}


def plot_serving(results: dict, out: Path) -> list[Path]:
    """`results`: {"title": str, "runs": [{"api", "concurrency", "tok_s", "ttft_ms":
    {p50, p90, p99}, "itl_ms": {...}}]}. Writes the two PNGs into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    apis = sorted({r["api"] for r in runs})
    levels = sorted({r["concurrency"] for r in runs})

    def series(api: str) -> list[dict]:
        return sorted((r for r in runs if r["api"] == api), key=lambda r: r["concurrency"])

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for api in apis:
        rs = series(api)
        ax.plot([r["concurrency"] for r in rs], [r["tok_s"] for r in rs], "o-", label=api)
    _axes(ax, "output tokens/s", results.get("title", ""), levels)
    throughput = out / "throughput.png"
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in (
        (axes[0], "ttft_ms", "time to first token (ms)"),
        (axes[1], "itl_ms", "inter-token latency (ms)"),
    ):
        for k, api in enumerate(apis):
            rs = series(api)
            for p in PERCENTILES:
                ax.plot(
                    [r["concurrency"] for r in rs],
                    [r[key][p] for r in rs],
                    STYLES[p],
                    marker="o",
                    color=f"C{k}",
                    label=f"{api} {p}",
                )
        ax.set_yscale("log")
        _axes(ax, name, results.get("title", ""), levels)
    latency = out / "latency.png"
    fig.tight_layout()
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    return [throughput, latency]


def _axes(ax: plt.Axes, ylabel: str, title: str, levels: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.minorticks_off()
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("results", type=Path, help="a serving.json")
    ap.add_argument("--out", type=Path, default=None, help="default: the JSON's folder")
    args = ap.parse_args()
    results = json.loads(args.results.read_text())
    for path in plot_serving(results, args.out or args.results.parent):
        print(path)


if __name__ == "__main__":
    main()
