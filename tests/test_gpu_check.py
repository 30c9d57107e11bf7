"""benchmarks/gpu_check.sh --dry-run: the GPU machine's script, run here at tiny sizes on the CPU,
writes what the GPU run returns: a copy of RESULTS.md with a new "## Train step" entry, the CUDA
tests' log, and the walker run's files; the walker run stops on SIGINT with a checkpoint and a
second call resumes it. Nothing here depends on the machine's speed: the dry run's walker is
stopped at its first logged update, not at a time, and its deadline is only a hang guard.

As on the GPU machine, the tree is treated as no git checkout (GIT_DIR points nowhere) and the
commit comes from a COMMIT file."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from test_benchmarks import ENV_SPEED, positive, table

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
EARLIER = "\n## Train step\n\n### an earlier entry\n\n| kept |\n"
LOSSES = ("model_loss", "obs_loss", "reward_loss", "kl", "actor_loss", "value_loss")


def dry_run(tmp_path: Path, out: str, *flags) -> tuple[Path, str]:
    out = tmp_path / out
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               WALKER_DIR=str(tmp_path / "walker-run"), RESULTS_MD=str(tmp_path / "RESULTS.md"),
               COMMIT_FILE=str(tmp_path / "COMMIT"), GIT_DIR=str(tmp_path / "no-git"))
    env.pop("BENCH_COMMIT", None)
    env.pop("BENCH_ARGS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert (out / "gpu_check.log").read_text().strip().splitlines()[-1] == log.strip().splitlines()[-1]
    return out, log


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_gpu_check_dry_run_writes_what_the_gpu_run_returns(tmp_path):
    (tmp_path / "RESULTS.md").write_text(ENV_SPEED + EARLIER)
    (tmp_path / "COMMIT").write_text("abc1234-from-file\n")
    out, log = dry_run(tmp_path, "out")
    assert "not a git checkout here" in log

    # (b) the CUDA tests: collected, and skipped without a GPU (run where there is one).
    pytest_log = (out / "pytest-cuda.log").read_text()
    if not torch.cuda.is_available():
        assert "skipped" in pytest_log and "torch.cuda.is_available() is False" in pytest_log, pytest_log

    # (c) the benchmark: a new entry under "## Train step", after the earlier one; the rest kept.
    text = (out / "RESULTS.md").read_text()
    assert text.startswith(ENV_SPEED + EARLIER.rstrip("\n")), text[:2000]
    assert text.count("## Train step") == 1 and text.count("### ") == 2
    new = text[text.index("### an earlier entry") + 1:]
    new = new[new.index("### "):]
    assert "Commit abc1234-from-file, from the COMMIT file" in new, new[:1000]
    rows = table(new, "preset")
    assert {r["preset"] for r in rows} == {"v1-dmc", "v2-atari", "v2-dmc"}
    eager = [r for r in rows if r["mode"] == "eager"]
    assert len(eager) == 3
    for row in rows:
        if row["mode"] == "eager" or not row["note"].startswith("skipped"):
            for column in ("update ms", "updates/s", "policy step ms", "act ms", "sample ms"):
                assert positive(row[column]), (row, column)
            assert "failed" not in row["note"], row
    e2e = {r["mode"]: r for r in table(new, "mode")}
    assert positive(e2e["eager"]["env frames/s"]), e2e

    # (d) the walker run: stopped by SIGINT with a checkpoint; its files copied, with finite losses.
    walker = out / "walker"
    assert {p.name for p in walker.iterdir()} >= {"walker.log", "metrics.jsonl", "config.yaml", "curves.png"}
    assert len(list(walker.glob("openloop-*.gif"))) == 1
    assert "stopped by SIGINT" in (walker / "walker.log").read_text()
    assert list((tmp_path / "walker-run" / "ckpts").glob("ckpt-*.pt"))
    records = metrics(walker / "metrics.jsonl")
    trained = [r for r in records if "model_loss" in r]
    assert trained
    for record in trained:
        for key in LOSSES:
            assert math.isfinite(record[key]), (key, record)
    assert "walker   ok: stopped by SIGINT" in log

    # What the device tool returns: 8 files at most, no deeper than two folders.
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files

    # A second call (a warm machine, the run directory kept) resumes the run from its checkpoint.
    out2, log2 = dry_run(tmp_path, "out2", "--only", "walker")
    assert "resuming from ckpt-" in log2
    resumed = (out2 / "walker" / "walker.log").read_text()
    assert "resumed " in resumed and "stopped by SIGINT" in resumed
    later = metrics(out2 / "walker" / "metrics.jsonl")
    assert len(later) > len(records) and later[-1]["step"] > records[-1]["step"]
    assert all(math.isfinite(r[key]) for r in later if "model_loss" in r for key in LOSSES)
    assert not (out2 / "RESULTS.md").exists() and not (out2 / "pytest-cuda.log").exists()
