"""Redraw every results figure from the recorded metrics: python results/plot.py

For each run directory under results/ that has a metrics.jsonl, draws curve.png: evaluation
return (mean over evaluation episodes, no exploration noise) and training return against env
steps, with the reference lines listed in the run's run.json ("references": {label: value}).
"""

import json
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass                                   # a torn last line after a crash
    return records


def draw(run: Path) -> Path:
    records = read_jsonl(run / "metrics.jsonl")
    info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, style in (("train_return", dict(alpha=0.5)), ("eval_return", dict(marker="o"))):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "), **style)
    for label, value in info.get("references", {}).items():
        ax.axhline(value, color="gray", linestyle="--", linewidth=1)
        ax.annotate(label, (0, value), xycoords=("axes fraction", "data"), textcoords="offset points",
                    xytext=(3, 3), fontsize=7)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title("\n".join(textwrap.wrap(info.get("title", run.name), 60)), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = run / "curve.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    runs = [Path(a) for a in (argv or [])] or sorted(p.parent for p in ROOT.glob("*/metrics.jsonl"))
    for run in runs:
        print(draw(run))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
