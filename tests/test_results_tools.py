"""The tools under results/: record.py (a real tiny run recorded as a reader finds it, the wall
time from the metrics' stamps against hand-computed cases), plot.py (through record.py) and
imagination_check.py (the simulator set to stored states gives back the stored rewards)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import module, read_jsonl, run_main, tiny, to_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "results"))

import record  # noqa: E402  (results/record.py)


@pytest.mark.parametrize("times, expected", [
    ([0.0, 10.0, 20.0, 5000.0, 5010.0], (30.0, 1)),       # one stop: the 4980 s gap left out
    ([0.0, 1800.0, 3600.0], (3600.0, 0)),                  # a gap of exactly max_gap counts
    ([100.0], (0.0, 0)),                                   # one line: no interval yet
    ([0.0, 5.0, 4000.0, 4005.0, 9000.0, 9001.0], (11.0, 2)),
])
def test_active_seconds_leave_out_the_stopped_gaps(times, expected):
    assert record.active_seconds(times, max_gap=1800.0) == expected


def test_a_real_run_is_recorded_without_checkpoints_or_replay(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "recorded"
    rc, _, err = run_main("dreamer_v2", to_cli(tiny("dreamer_v2", logdir=run, eval_every=100)), capsys)
    assert rc == 0, err
    proc = subprocess.run(
        [sys.executable, str(ROOT / "results" / "record.py"), str(run), str(out), "--title", "tiny V2",
         "--command", "python dreamer_v2.py ...", "--commit", "abc1234", "--device", "CPU: test",
         "--official", "v2-cartpole-balance", "--reference", "random actions=-1254",
         "--torch", "2.11.0+cu130"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "curve.png", "metrics.jsonl", "run.json"]
    assert (out / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    info = json.loads((out / "run.json").read_text())
    assert info["env_steps"] == info["total_steps"] == 300 and info["stops_found"] == 0
    assert list(info["evaluations"]) == ["100", "200", "300"]               # every eval_every steps
    evals = [r["eval_return"] for r in read_jsonl(run / "metrics.jsonl") if "eval_return" in r]
    assert list(info["evaluations"].values()) == [round(x, 1) for x in evals]
    assert info["references"] == {"random actions": -1254.0}
    assert info["official"] == "v2-cartpole-balance" and info["commit"] == "abc1234"
    assert info["torch"] == "2.11.0+cu130"               # the version that ran, not this machine's
    stamps = [r["time"] for r in read_jsonl(run / "metrics.jsonl")]
    assert info["wall_time_s"] == round(stamps[-1] - stamps[0])            # no stop in a tiny run
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert module("dreamer_v2").DreamerConfig.from_yaml(out / "config.yaml").total_steps == 300


def test_a_directory_without_metrics_is_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "results" / "record.py"), str(tmp_path), str(tmp_path / "out"),
         "--title", "t", "--command", "c", "--commit", "x", "--device", "d"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no metrics.jsonl lines; allowed: a run directory"]
    assert not (tmp_path / "out").exists()


def test_plot_names_a_run_without_run_json_and_draws_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    proc = subprocess.run([sys.executable, str(ROOT / "results" / "plot.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"plot.py: error: RUN must be a directory with a run.json; not one: {tmp_path}")
    assert not (tmp_path / "curve.png").exists()
    proc = subprocess.run([sys.executable, str(ROOT / "results" / "plot.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "run directories with a run.json" in proc.stdout


def test_imagination_check_sets_the_simulator_to_a_stored_state(tmp_path, capsys):
    """The true returns come from a fresh dm_control cartpole set to a stored state: replaying the
    stored actions from there must give back the stored rewards (the physics is deterministic), and
    the whole check runs on a real tiny run and prints its table."""
    import imagination_check as ic
    from dm_control import suite
    run = tmp_path / "run"
    fields = tiny("dreamer_v2", env="dmc/cartpole-balance", time_limit=200, logdir=run, total_steps=400)
    rc, _, err = run_main("dreamer_v2", to_cli(fields), capsys)
    assert rc == 0, err
    v2 = module("dreamer_v2")
    episode = v2.load_episode(sorted((run / "episodes").glob("*.npz"))[0])
    env = suite.load("cartpole", "balance", task_kwargs={"random": 0, "time_limit": float("inf")})
    for t in (0, 17, 60):
        steps = iter(episode["action"][t + 1: t + 11, 0])
        real = ic.true_return(env, episode["state"][t], lambda obs: next(steps), 10, repeat=2)
        assert real == pytest.approx(float(episode["reward"][t + 1: t + 11].sum()), abs=1e-4), t
    assert ic.main([str(run), "--starts", "3", "--horizon", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| actions (5 agent steps) | imagined return | true return |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| -1", "| 0", "| +1", "| actor"]


def test_imagination_check_of_another_task_is_one_error_line(tmp_path):
    (tmp_path / "config.yaml").write_text("env: gym/Pendulum-v1\nobs: state\n")
    proc = subprocess.run([sys.executable, str(ROOT / "results" / "imagination_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} is a run of gym/Pendulum-v1 from state; allowed: a dmc/cartpole-* run "
        f"with --obs state"]


def _tiny_run(variant, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main(variant, to_cli(tiny(variant, logdir=run)), capsys)
    assert rc == 0, err
    return run


@pytest.mark.parametrize("variant", ["dreamer_v1", "dreamer_v2"])
@pytest.mark.parametrize("raw_mean", [3.0, 0.5])
def test_actor_check_of_a_set_actor_matches_its_distribution_by_hand(variant, raw_mean, tmp_path, capsys):
    """The actor's output layer set to a constant (zero kernel, bias (mean, std)): every state gets
    the same distribution, whose statistics are computed here by hand (the truncated normal's mean
    |a| by numerical integration)."""
    import actor_check
    import numpy as np
    import torch
    mod, run = module(variant), _tiny_run(variant, tmp_path, capsys)
    model = mod.Dreamer.from_pretrained(run)
    out = model.actor_critic.actor.net.net[-1]
    raw_std = -1.0 if variant == "dreamer_v2" else -10.0
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.tensor([raw_mean, raw_std]))
    episodes = [mod.load_episode(p) for p in sorted((run / "episodes").glob("*.npz"))]
    stats = actor_check.actor_stats(model, episodes)
    assert stats["states"] == sum(len(ep["reward"]) for ep in episodes) == 303     # 3 x (100 + 1)
    if variant == "dreamer_v2":     # truncated normal on [-1, 1], mean tanh(x), std 2 sig(s/2) + 0.1
        x, std = raw_mean, 2 / (1 + np.exp(-raw_std / 2)) + 0.1
        grid = np.linspace(-1, 1, 200_001)
        density = np.exp(-0.5 * ((grid - np.tanh(x)) / std) ** 2)
        expected_abs = (np.abs(grid) * density).sum() / density.sum()
    else:                           # tanh(u), u ~ N(5 tanh(x / 5), softplus(s + softplus^-1(5)) + 1e-4)
        x = 5 * np.tanh(raw_mean / 5)
        std = np.log1p(np.exp(raw_std + np.log(np.exp(5.0) - 1))) + 1e-4
        expected_abs = abs(np.tanh(x))                                           # std ~ 0.007
    assert stats["median_abs_x"] == pytest.approx(x, rel=1e-5)
    assert stats["slope_at_median"] == pytest.approx(1 - np.tanh(x) ** 2, rel=1e-4)
    assert stats["std"] == pytest.approx(std, rel=1e-4)
    assert stats["mode_at_bound"] == (1.0 if abs(np.tanh(x)) > 0.95 else 0.0)
    assert stats["sampled_abs"] == pytest.approx(expected_abs, abs=0.03)


def test_actor_check_prints_a_table_and_refuses_a_directory_without_a_run(tmp_path, capsys):
    run = _tiny_run("dreamer_v2", tmp_path, capsys)
    script = str(ROOT / "results" / "actor_check.py")
    proc = subprocess.run([sys.executable, script, str(run), "--weights", str(run / "ckpts")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("| weights | states |")
    assert lines[2].startswith(f"| {run / 'ckpts'} | 303 | ")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: '{tmp_path}' is not a run directory (no config.yaml); allowed: a directory written by a run"]


@pytest.mark.parametrize("variant", ["dreamer_v1", "dreamer_v2"])
def test_labels_of_two_close_reference_lines_do_not_overlap(variant):
    """Two reference lines 35 apart on an axis to 720 under a title of three lines (as random and
    constant actions in the cartpole-swingup figure): no label's drawn box crosses a reference line
    or the other label, and each stays beside its own line (within 12 pixels of it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [{"step": s, "train_return": r} for s, r in [(0, 20.0), (50_000, 150.0), (100_000, 720.0)]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    refs = {"constant action +1 (75, measured)": 74.8, "uniform random actions (40, measured)": 40.0}
    module(variant).plot_returns(ax, records, 0, refs)
    ax.set_title("a title\nof three\nlines", fontsize=9)          # as results/plot.py draws them
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    assert sorted(boxes) == sorted(refs)
    upper, lower = boxes["constant action +1 (75, measured)"], boxes["uniform random actions (40, measured)"]
    assert not upper.overlaps(lower), (upper, lower)
    lines_y = {name: ax.transData.transform((0, value))[1] for name, value in refs.items()}
    for name, box in boxes.items():
        assert not any(box.y0 <= y <= box.y1 for y in lines_y.values()), name
        assert min(abs(box.y0 - lines_y[name]), abs(box.y1 - lines_y[name])) < 12, name
    plt.close(fig)
