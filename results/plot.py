"""Redraw every results figure from the recorded metrics: python results/plot.py [RUN ...]

For each run directory under results/ that has a run.json, draws curve.png: the evaluation return
(mean over evaluation episodes, the actor's mode) and the training return against env steps, the
prefill shaded, drawn by the scripts' own `plot_returns`. run.json may add
- "references": {label: return}: dashed lines (random actions, zero actions, ...);
- "official": a key of official/dmc-scores.json: the official code's stored evaluation returns for
  the same task (5 seeds, from pixels), their mean as a line and their range as a band;
- "compare": {label: subfolder}: several runs of the same recipe in one figure (e.g. fp32, bf16).
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import matplotlib  # noqa: E402
import yaml  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import dreamer_v2  # noqa: E402  (plot_returns and read_metrics are the same in both scripts)


def official(ax, key: str, until: float) -> None:
    """The official runs' evaluation returns up to the first point past `until` env steps."""
    scores = json.loads((ROOT / "official" / "dmc-scores.json").read_text())[key]
    seeds = scores["seeds"]
    n = next((i + 1 for i, x in enumerate(seeds[0]["xs"]) if x >= until), len(seeds[0]["xs"]))
    xs = seeds[0]["xs"][:n]
    columns = list(zip(*(s["ys"][:n] for s in seeds)))
    mean = [sum(c) / len(c) for c in columns]
    ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color="green", alpha=0.12)
    ax.plot(xs, mean, color="green", linestyle=":", marker="s", markersize=3,
            label=f"official {scores['method']} from pixels ({len(seeds)} seeds)")


def draw(run: Path) -> Path:
    info = json.loads((run / "run.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 3.6))
    last = 0
    for i, (label, sub) in enumerate((info.get("compare") or {"": "."}).items()):
        config, records = yaml.safe_load((run / sub / "config.yaml").read_text()), dreamer_v2.read_metrics(run / sub)
        dreamer_v2.plot_returns(ax, records, config["seed_steps"] if i == 0 else 0,
                                info.get("references") if i == 0 else None, label)
        last = max([last] + [r["step"] for r in records])
    if info.get("official"):
        official(ax, info["official"], last)
    ax.set_title("\n".join(textwrap.wrap(info.get("title", run.name), 70)), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = run / "curve.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN",
                        help="run directories with a run.json (default: every one under results/)")
    args = parser.parse_args(argv or [])
    runs = args.runs or sorted(p.parent for p in ROOT.glob("*/run.json"))
    missing = [str(run) for run in runs if not (run / "run.json").is_file()]
    if missing:
        parser.error(f"RUN must be a directory with a run.json; not one: {', '.join(missing)}")
    for run in runs:
        print(draw(run))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
