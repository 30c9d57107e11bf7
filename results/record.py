"""Record a finished run under results/: python results/record.py RUN_DIR NAME --title ... --command ...

Copies what a reader needs from the run directory (config.yaml, metrics.jsonl, the last open-loop
GIF of a pixel run; never checkpoints or replay), writes run.json (the command, commit, device,
torch version, env steps, wall time, the evaluations, reference lines, the official scores to draw
beside it, a note) and draws curve.png with results/plot.py.

The wall time is read from the metrics' wall-clock `time` stamps: the sum of the gaps between
consecutive lines, leaving out gaps longer than --max-gap seconds (the run was stopped there and
resumed later). Each stop can so leave out up to one logging interval of real work; run.json says
how many stops were found.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]

import plot  # noqa: E402  (results/plot.py)
import torch  # noqa: E402
import yaml  # noqa: E402

import dreamer_v2  # noqa: E402  (read_metrics is the same in both scripts)


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def active_seconds(times: list[float], max_gap: float) -> tuple[float, int]:
    """(the summed gaps between consecutive stamps of at most max_gap, the number of longer gaps)."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    return sum(g for g in gaps if g <= max_gap), sum(g > max_gap for g in gaps)


def record(run: Path, out: Path, args) -> Path:
    records = dreamer_v2.read_metrics(run)
    if not records:
        fail(f"{run} has no metrics.jsonl lines; allowed: a run directory")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(run / name, out / name)
    gifs = sorted((run / "videos").glob("openloop-*.gif"))
    if gifs:
        shutil.copyfile(gifs[-1], out / gifs[-1].name)
    seconds, stops = active_seconds([r["time"] for r in records if "time" in r], args.max_gap)
    config = yaml.safe_load((run / "config.yaml").read_text())
    info = dict(
        title=args.title, command=args.command, commit=args.commit, device=args.device,
        torch=args.torch or torch.__version__, env_steps=max(r["step"] for r in records),
        total_steps=config.get("total_steps"), wall_time_s=round(seconds), stops_found=stops,
        evaluations={str(r["step"]): round(r["eval_return"], 1) for r in records if "eval_return" in r},
        references={label: float(value) for label, value in (r.rsplit("=", 1) for r in args.reference)} or None,
        official=args.official, note=args.note)
    (out / "run.json").write_text(json.dumps({k: v for k, v in info.items() if v is not None}, indent=1) + "\n")
    return plot.draw(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run directory")
    parser.add_argument("name", help="the folder to write, under results/ (or an absolute path)")
    parser.add_argument("--title", required=True)
    parser.add_argument("--command", required=True, help="the command that ran, as typed")
    parser.add_argument("--commit", required=True, help="the commit of the code that ran")
    parser.add_argument("--device", required=True, help="e.g. 'CPU: AMD EPYC, 2 cores, 1 thread'")
    parser.add_argument("--torch", help="the torch version that ran, where not this machine's (a GPU run)")
    parser.add_argument("--official", choices=sorted(json.loads((ROOT / "official" / "dmc-scores.json")
                                                                .read_text())), help="official scores to draw")
    parser.add_argument("--reference", action="append", default=[], metavar="LABEL=RETURN",
                        help="a dashed reference line (random actions, ...); repeatable")
    parser.add_argument("--note")
    parser.add_argument("--max-gap", type=float, default=1800.0,
                        help="seconds between metrics lines above which the run counts as stopped")
    args = parser.parse_args(argv)
    print(record(args.run, ROOT / args.name, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
