"""The guarantees of a run: it survives signals, crashes, damaged files, non-finite values, bad
input and untrusted files, and keeps its disk use bounded. Each numbered guarantee is tried for
real on both scripts.

Every test is parametrised over dreamer_v1 and dreamer_v2 and runs the real code on a real
environment (gymnasium Pendulum-v1 from states, 100-step episodes, tiny networks). Faults are real:
signals sent to real processes (random moments, several seeds, and in-process at a chosen phase),
kill -9, truncated / bit-flipped / empty files on disk, pickles that would run code, a full disk
(the write raises ENOSPC half-way), NaN/Inf losses and gradients, and a table of bad inputs.

    1. interruption ....... test_signal_in_each_phase, test_random_signals_in_subprocesses,
                            test_stop_during_a_training_phase_loses_no_updates,
                            test_resume_at_an_episode_boundary_equals_the_uninterrupted_run,
                            test_signal_at_an_episode_boundary_equals_the_uninterrupted_run
    2. crash safety ....... test_kill_9_at_random_moments, test_kill_9_in_the_middle_of_a_write,
                            test_resume_after_a_kill_sets_aside_what_came_after_the_checkpoint,
                            test_damaged_files_are_skipped_with_a_warning, test_empty_checkpoint_*
                            test_bit_flipped_*, test_torn_metrics_line_does_not_break_resume
    3. non-finite values .. test_nonfinite_updates_never_reach_the_weights, test_nonfinite_run_*,
                            test_nonfinite_forward_pass_*
    4. bad input .......... test_bad_inputs (the table; prints how many were tried),
                            test_known_bad_inputs, test_bad_input_in_a_real_process,
                            test_full_disk_*
    5. untrusted files .... test_malicious_checkpoint_is_refused_without_running, *_npz_*, *_yaml_*
    6. disk bounds ........ test_disk_use_is_bounded,
                            test_resume_removes_temporary_files_of_a_killed_writer

A stopped run: the signal handler says so on stderr at once (`SIGINT: stopping after this step;
writing a checkpoint`); the loop finishes the step, stores the partial episode and writes a final
checkpoint. SIGINT then ends `train()` with KeyboardInterrupt and the CLI exits 130; SIGTERM ends
`train()` normally and the CLI exits 143.

In-process runs skip drawing curves.png (see `quick_curves`); subprocesses run the scripts as
they are. A few minutes on 2 CPU cores (OMP_NUM_THREADS=1), most of it the 12 subprocesses.
"""

import builtins
import copy
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ALGO, EPISODE, VARIANTS, module, one_error_line, read_jsonl, run_main, tiny
from helpers import to_cli as cli

ROOT = Path(__file__).resolve().parents[1]
OTHER = {"dreamer_v1": "dreamer_v2", "dreamer_v2": "dreamer_v1"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Like the subprocesses (OMP_NUM_THREADS=1): reproducible and fair to a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quick_curves():
    """In this process, curves.png is not drawn (matplotlib takes ~1.3 s a figure on a small CPU and
    plotting is no part of these guarantees); the metrics file is still read back as plot_curves
    reads it. The subprocesses run the scripts untouched."""
    with pytest.MonkeyPatch.context() as patch:
        for variant in VARIANTS:
            mod = module(variant)
            patch.setattr(mod, "plot_curves", lambda logdir, *a, _mod=mod, **k: _mod.read_metrics(logdir) and None)
        yield


SET_ASIDE = re.compile(r"warning: \d+ episode\(s\) and \d+ metrics line\(s\) newer than checkpoint "
                       r"step \d+ moved to \S+; the run collects and logs those steps again")


def only_half_written_file_warnings(err: str) -> list[str]:
    """stderr of a resume after a kill: nothing but a warning per half-written temporary file
    removed (naming it), and the line saying what came after the checkpoint was set aside.
    Returns the names of the removed files."""
    prefix = "warning: removing half-written file "
    lines = [line for line in err.splitlines() if line.strip() and not SET_ASIDE.fullmatch(line)]
    assert all(line.startswith(prefix) for line in lines), err
    return [Path(line[len(prefix):]).name for line in lines]


EXIT_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143}   # the CLI's exit status of a run each stops


def stopped_by_signal_stderr(err: str, sig) -> None:
    """stderr of a run stopped by `sig`: the handler's line, said once at the signal, and nothing
    else (no traceback, no warning)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"{sig.name}: stopping after this step; writing a checkpoint"], err


def checkpoints(run) -> list[Path]:
    return sorted((Path(run) / "ckpts").glob("ckpt-*.pt"))


def load_ckpt(variant, path) -> dict:
    return module(variant).load_torch(path)


def episodes_on_disk(run) -> dict[str, int]:
    """File name -> steps of every episode file, read like the replay does (no pickles)."""
    steps = {}
    for path in sorted((Path(run) / "episodes").glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        assert len({len(v) for v in arrays.values()}) == 1, path
        steps[path.name] = len(arrays["reward"]) - 1
    return steps


def metrics(run) -> list[dict]:
    return read_jsonl(Path(run) / "metrics.jsonl")


def assert_consistent_stop(variant, run, out, signame=None) -> int:
    """After a stop by a signal: the final checkpoint is at the step where the run stopped, and
    every env step taken is in an episode file (the partial episode included). Returns that step."""
    if signame:
        assert f"stopped by {signame} at env step" in out, out
    ckpt = load_ckpt(variant, checkpoints(run)[-1])
    c = ckpt["counters"]
    if signame:
        assert f"stopped by {signame} at env step {c['env_steps']};" in out
    assert checkpoints(run)[-1].name == f"ckpt-{c['env_steps']:010d}.pt"
    disk = episodes_on_disk(run)
    assert sum(disk.values()) == c["agent_steps"] == c["env_steps"], (disk, c)
    assert c["episodes"] == sum(1 for n in disk.values() if n == EPISODE), (disk, c)
    return c["env_steps"]


_BASE = {}


def base_fields(variant, **overrides):
    return tiny(variant, **{"total_steps": 400, "eval_every": 100, **overrides})


@pytest.fixture
def base_run(tmp_path_factory):
    """Factory: a finished 400-step run of `variant` with an evaluation every 100 steps (checkpoints
    kept at 200, 300, 400; best/), made once per session in this process; tests copy it before
    changing anything. It is also the uninterrupted run the resumed ones are compared with."""
    def get(variant):
        if variant not in _BASE:
            run = tmp_path_factory.mktemp(f"base-{variant}") / "run"
            assert module(variant).main([str(a) for a in cli(base_fields(variant, logdir=run))]) == 0
            _BASE[variant] = run
        return _BASE[variant]
    return get


@pytest.fixture
def copied_run(base_run, tmp_path):
    def copy(variant, name="run"):
        return Path(shutil.copytree(base_run(variant), tmp_path / name))
    return copy


# =================================================================================================
# 1. Interruption: SIGINT / SIGTERM end the run with a final checkpoint; --resume continues it.
# =================================================================================================

def send_signal_to_self(sig):
    """os.kill(own pid), but only while the script has its own handler installed: without one,
    SIGTERM would end pytest itself (the test then fails instead)."""
    handler = signal.getsignal(sig)
    assert callable(handler) and handler is not signal.default_int_handler, \
        f"no handler of the script for {sig.name} while training"
    os.kill(os.getpid(), sig)


def signal_at(monkeypatch, mod, phase: str, sig, call: int):
    """Send `sig` to this process at the `call`-th entry into `phase`: "collect" (the policy acting
    in the training env), "train" (a gradient update) or "eval" (the policy in the eval env). The
    real signal goes through the script's real handler."""
    method = {"collect": "act", "eval": "act", "train": "train_batch"}[phase]
    original = getattr(mod.DreamerAgent, method)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        explore = kwargs.get("explore", args[-1] if args else None)
        if phase == "train" or (phase == "collect") == bool(explore):
            calls["n"] += 1
            if calls["n"] == call:
                send_signal_to_self(sig)
                assert self.stop == sig.name        # the handler ran at once
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mod.DreamerAgent, method, wrapper)
    return calls


def assert_resumed(variant, run, stop, end, out, metrics_before, episodes_before):
    """After --resume: it started where the run stopped, reached `end`, kept every old metrics
    line and episode file byte for byte, and stored every env step."""
    assert f"resumed {run} at env step {stop} from " in out, out
    assert assert_consistent_stop(variant, run, out) == end
    text = (run / "metrics.jsonl").read_text()
    assert text.startswith(metrics_before) and len(text) > len(metrics_before)
    assert all(r["step"] >= stop for r in map(json.loads, text[len(metrics_before):].splitlines()))
    for name, data in episodes_before.items():
        assert (run / "episodes" / name).read_bytes() == data


def saved_files(run):
    metrics_text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    return metrics_text, {p.name: p.read_bytes() for p in (run / "episodes").glob("*.npz")}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("phase, sig, call", [
    pytest.param("collect", signal.SIGINT, 30, id="collect-SIGINT"),  # policy step 30: env step 130
    pytest.param("train", signal.SIGTERM, 4, id="train-SIGTERM"),     # 2nd update of the phase at 151
    pytest.param("eval", signal.SIGTERM, 40, id="eval-SIGTERM"),      # 40 steps into the eval at 150
])
def test_signal_in_each_phase(variant, phase, sig, call, tmp_path, capsys, monkeypatch):
    """A real signal at a chosen moment of each phase. The run stops at once with a final
    checkpoint at the step it reached, the partial episode stored, and exits 130 (SIGINT) or 143
    (SIGTERM); --resume goes on to the end."""
    mod, run = module(variant), tmp_path / "run"
    calls = signal_at(monkeypatch, mod, phase, sig, call)
    rc, out, err = run_main(variant, cli(tiny(variant, logdir=run, eval_every=150)), capsys)
    assert rc == EXIT_CODE[sig], (rc, err)
    stopped_by_signal_stderr(err, sig)
    assert calls["n"] >= call, "the signal was never sent"
    stop = assert_consistent_stop(variant, run, out, sig.name)
    assert 100 < stop < 300 and stop % EPISODE, stop         # mid-episode: a partial episode
    updates = load_ckpt(variant, checkpoints(run)[-1])["counters"]["updates"]
    if phase == "train":                  # prompt: no update after the signal
        assert updates == call
    before = saved_files(run)
    monkeypatch.undo()
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert_resumed(variant, run, stop, 300, out, *before)
    assert load_ckpt(variant, checkpoints(run)[-1])["counters"]["updates"] > updates


def launch(variant, args, cwd: Path, name: str):
    """`python dreamer_vX.py ARGS` as a real process (the script untouched)."""
    out, err = open(cwd / f"{name}.out", "w"), open(cwd / f"{name}.err", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{variant}.py"), *map(str, args)],
                            cwd=cwd, stdout=out, stderr=err, env=ENV)
    proc.files = (cwd / f"{name}.out", cwd / f"{name}.err")
    return proc


def finish(proc, timeout=150):
    proc.wait(timeout=timeout)
    return proc.returncode, proc.files[0].read_text(), proc.files[1].read_text()


def kill_when_ready(procs, ready, delays, sigs):
    """Send sigs[i] to procs[i] delays[i] seconds after ready(i) first holds (polled every 10 ms)."""
    since = [None] * len(procs)
    pending = set(range(len(procs)))
    deadline = time.time() + 120
    while pending and time.time() < deadline:
        for i in list(pending):
            assert procs[i].poll() is None, f"run {i} ended before it was killed: {finish(procs[i])}"
            if since[i] is None and ready(i):
                since[i] = time.time()
            if since[i] is not None and time.time() - since[i] >= delays[i]:
                procs[i].send_signal(sigs[i])
                pending.discard(i)
        time.sleep(0.01)
    assert not pending, "runs never became ready"


@pytest.mark.parametrize("variant", VARIANTS)
def test_random_signals_in_subprocesses(variant, tmp_path, capsys):
    """Three real processes of the script, stopped by SIGINT or SIGTERM at random moments (seeded:
    prefill, training, evaluation, writing files), then continued with --resume."""
    seeds = [0, 1, 2]
    rngs = [random.Random(1000 * VARIANTS.index(variant) + s) for s in seeds]
    runs = [tmp_path / f"run{s}" for s in seeds]
    sigs = [(signal.SIGINT, signal.SIGTERM)[s % 2] for s in seeds]
    procs = [launch(variant, cli(tiny(variant, logdir=run, seed=s, total_steps=10**5,
                                      eval_every=200)), tmp_path, f"run{s}")
             for s, run in zip(seeds, runs)]
    # Ready: training has started (config.yaml is the run's first file, written by train() just
    # before it installs its handlers; nothing is written before train()).
    kill_when_ready(procs, lambda i: (runs[i] / "config.yaml").exists(),
                    [rng.uniform(0.2, 2.0) for rng in rngs], sigs)
    for seed, proc, run, sig in zip(seeds, procs, runs, sigs):
        rc, out, err = finish(proc)
        assert rc == EXIT_CODE[sig], (rc, err)
        stopped_by_signal_stderr(err, sig)
        stop = assert_consistent_stop(variant, run, out, sig.name)
        before = saved_files(run)
        rc, out, err = run_main(variant, ["--resume", run, "--total_steps", stop + 120], capsys)
        assert rc == 0 and "warning" not in err, err
        assert_resumed(variant, run, stop, stop + 120, out, *before)
        assert module(variant).DreamerConfig.from_yaml(run / "config.yaml").seed == seed


def final_state(variant, run) -> dict:
    """The newest checkpoint (config.logdir aside) and every episode file's arrays."""
    ckpt = load_ckpt(variant, checkpoints(run)[-1])
    del ckpt["config"]["logdir"]
    ckpt["episodes"] = {}
    for path in sorted((Path(run) / "episodes").glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            ckpt["episodes"][path.name] = {k: data[k] for k in data.files}
    return ckpt


def assert_same(a, b, where="state"):
    """Bitwise equality of nested checkpoint contents (tensors, arrays, numbers, strings)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), \
            f"{where}: max difference {(a.double() - b.double()).abs().max().item():.3g}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def metric_series(run) -> dict[str, list]:
    """Each metric's values in the order they were written (the step a value is filed under and
    the wall-clock fields aside): a resumed run must log every value once, none lost."""
    series = {}
    for record in metrics(run):
        for key, value in record.items():
            if key not in ("step", "fps", "time"):
                series.setdefault(key, []).append(value)
    return series


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_at_an_episode_boundary_equals_the_uninterrupted_run(variant, base_run, tmp_path,
                                                                   capsys):
    """On CPU with a fixed seed: k = 200 env steps (two whole episodes), then --resume to 2k = 400,
    reaches bitwise the weights, Adam moments, counters, RNG states (torch, numpy, python), best
    evaluation and replay of the uninterrupted 400-step base run. Evaluation (it draws from the
    torch RNG), the slow critic (V2) and the training schedule all cross the boundary."""
    run = tmp_path / "run"
    rc, _, err = run_main(variant, cli(base_fields(variant, logdir=run, total_steps=200)), capsys)
    assert rc == 0, err
    rc, out, err = run_main(variant, ["--resume", run, "--total_steps", 400], capsys)
    assert rc == 0 and f"resumed {run} at env step 200" in out, err
    resumed, uninterrupted = final_state(variant, run), final_state(variant, base_run(variant))
    assert resumed["counters"]["env_steps"] == 400 and resumed["counters"]["updates"] >= 10
    assert_same(resumed, uninterrupted)
    assert_same(load_ckpt(variant, run / "ckpts" / "best" / "model.pt")["model"],
                load_ckpt(variant, base_run(variant) / "ckpts" / "best" / "model.pt")["model"])
    assert metric_series(run) == metric_series(base_run(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_signal_at_an_episode_boundary_equals_the_uninterrupted_run(variant, base_run, tmp_path,
                                                                   capsys, monkeypatch):
    """The same with a real SIGTERM: it arrives while the checkpoint at env step 200 (the last step
    of episode 2) is written; the run stops there and `--resume RUN_DIR` (nothing else) reaches
    bitwise the state and the metric values of the uninterrupted base run."""
    mod, run = module(variant), tmp_path / "run"
    original = mod.save_checkpoint

    def save_checkpoint(agent):
        if agent.step == 200 and not agent.stop:
            send_signal_to_self(signal.SIGTERM)
        return original(agent)

    monkeypatch.setattr(mod, "save_checkpoint", save_checkpoint)
    rc, out, err = run_main(variant, cli(base_fields(variant, logdir=run)), capsys)
    assert rc == EXIT_CODE[signal.SIGTERM] and "stopped by SIGTERM at env step 200;" in out, (rc, err)
    stopped_by_signal_stderr(err, signal.SIGTERM)
    monkeypatch.undo()
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0, err
    assert_same(final_state(variant, run), final_state(variant, base_run(variant)))
    assert metric_series(run) == metric_series(base_run(variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stop_during_a_training_phase_loses_no_updates(variant, base_run, tmp_path, capsys,
                                                       monkeypatch):
    mod, run = module(variant), tmp_path / "run"
    signal_at(monkeypatch, mod, "train", signal.SIGINT, 3)  # first update of the phase at step 151
    rc, out, err = run_main(variant, cli(base_fields(variant, logdir=run)), capsys)
    assert rc == EXIT_CODE[signal.SIGINT] and "stopped by SIGINT" in out, (rc, err)
    stopped_by_signal_stderr(err, signal.SIGINT)
    monkeypatch.undo()
    assert run_main(variant, ["--resume", run], capsys)[0] == 0
    updates = load_ckpt(variant, checkpoints(run)[-1])["counters"]["updates"]
    assert updates == load_ckpt(variant, checkpoints(base_run(variant))[-1])["counters"]["updates"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_stop_during_an_evaluation_loses_no_evaluation(variant, base_run, tmp_path, capsys,
                                                       monkeypatch):
    """A real SIGTERM 40 steps into the evaluation at env step 200 (the end of episode 2): no
    return of the cut-short evaluation is logged (no mean of fewer episodes), the checkpoint owes
    it, and --resume runs it first with the same random numbers. The run then reaches bitwise the
    state and the evaluation returns of the uninterrupted base run (only the open-loop report,
    which reads replay, differs: episode 2 is stored by then)."""
    mod, run = module(variant), tmp_path / "run"
    original, calls = mod.DreamerAgent.act, {"n": 0}

    def act(self, obs, state, explore):
        if not explore and self.step == 200:
            calls["n"] += 1
            if calls["n"] == 40:
                send_signal_to_self(signal.SIGTERM)
        return original(self, obs, state, explore)

    monkeypatch.setattr(mod.DreamerAgent, "act", act)
    rc, out, err = run_main(variant, cli(base_fields(variant, logdir=run)), capsys)
    assert rc == EXIT_CODE[signal.SIGTERM] and "stopped by SIGTERM at env step 200;" in out, (rc, err)
    assert calls["n"] == 40
    assert sum("eval_return" in r for r in metrics(run)) == 1          # the one at 100 only
    assert load_ckpt(variant, checkpoints(run)[-1])["counters"]["eval_owed"] is True
    monkeypatch.undo()
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0, err
    assert_same(final_state(variant, run), final_state(variant, base_run(variant)))
    resumed, uninterrupted = metric_series(run), metric_series(base_run(variant))
    assert len(resumed["eval_return"]) == 4 and resumed["eval_return"] == uninterrupted["eval_return"]
    assert {k: v for k, v in resumed.items() if not k.startswith("openloop")} == \
        {k: v for k, v in uninterrupted.items() if not k.startswith("openloop")}


# =================================================================================================
# 2. Crash safety: kill -9 at any moment leaves the last complete checkpoint and every completed
#    episode readable; damaged files are skipped on resume with a warning naming them.
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_kill_9_at_random_moments(variant, tmp_path, capsys):
    """Three real processes writing a checkpoint every 10 env steps are killed with SIGKILL at
    random moments (seeded). Every ckpt-*.pt and .npz left behind loads; every episode the newest
    checkpoint counts is on disk; --resume continues from that checkpoint, warning only of the
    temporary file a cut-short write left (named)."""
    mod, seeds = module(variant), [0, 1, 2]
    rngs = [random.Random(77 + 1000 * VARIANTS.index(variant) + s) for s in seeds]
    runs = [tmp_path / f"run{s}" for s in seeds]
    procs = [launch(variant, cli(tiny(variant, logdir=run, seed=s, total_steps=10**5,
                                      checkpoint_interval=10, keep_checkpoints=2)),
                    tmp_path, f"kill{s}")
             for s, run in zip(seeds, runs)]
    kill_when_ready(procs, lambda i: bool(checkpoints(runs[i])),
                    [rng.uniform(0.0, 1.5) for rng in rngs], [signal.SIGKILL] * 3)
    for proc, run in zip(procs, runs):
        rc, out, err = finish(proc)
        assert rc == -signal.SIGKILL and "Traceback" not in err, err
        ckpts = checkpoints(run)
        for path in ckpts:
            load_ckpt(variant, path)                          # no half-written checkpoint, ever
        disk = episodes_on_disk(run)                          # no half-written episode, ever
        assert list(disk) == [f"{i:06d}-{EPISODE}.npz" for i in range(len(disk))]
        c = load_ckpt(variant, ckpts[-1])["counters"]
        assert len(disk) >= c["episodes"]                     # every counted episode is there
        rc, out, err = run_main(variant, ["--resume", run, "--total_steps",
                                          c["env_steps"] + 60], capsys)
        assert rc == 0
        only_half_written_file_warnings(err)          # a write the kill cut short, if any
        assert f"resumed {run} at env step {c['env_steps']} from {ckpts[-1]}" in out
        assert load_ckpt(variant, checkpoints(run)[-1])["counters"]["env_steps"] == c["env_steps"] + 60
        replay = mod.ReplayBuffer(run / "episodes", 10**9, 10, np.random.default_rng())
        assert replay.num_steps == sum(episodes_on_disk(run).values())


class HalfWrite:
    """A file whose write stores half of the data, then calls `after_half` (the fault)."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[: len(data) // 2])
        self.after_half()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


class HangingWrite(HalfWrite):
    """Half of the data written, the test told (touches `ready`), then a hang until killed."""

    def __init__(self, file, ready):
        super().__init__(file)
        self.ready = ready

    def after_half(self):
        self.file.flush()
        Path(self.ready).touch()
        time.sleep(120)


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_after_a_kill_sets_aside_what_came_after_the_checkpoint(variant, copied_run, base_run,
                                                                      capsys):
    """What kill -9 leaves between two checkpoints, made exactly: the finished 400-step base run with
    its checkpoints at 300 and 400 deleted, so the newest is at env step 200 while episodes and
    metrics lines up to 400 are on disk. --resume moves the episodes and lines after step 200 to
    discarded/ (none replayed twice, none logged twice) and reaches bitwise the state and metric
    values of the uninterrupted run, the episode that ends at the checkpoint's step kept."""
    run = copied_run(variant)
    for path in checkpoints(run)[1:]:
        path.unlink()
    before, late = episodes_on_disk(run), [r["step"] for r in metrics(run) if r["step"] > 200]
    rc, out, err = run_main(variant, ["--resume", run, "--total_steps", 400], capsys)
    assert rc == 0 and f"resumed {run} at env step 200" in out, err
    aside = run / "discarded" / "after-step-200"
    assert err.strip() == (f"warning: 2 episode(s) and {len(late)} metrics line(s) newer than "
                           f"checkpoint step 200 moved to {aside}; the run collects and logs those "
                           f"steps again"), err
    assert sorted(p.name for p in (aside / "episodes").iterdir()) == list(before)[2:]
    assert [r["step"] for r in read_jsonl(aside / "metrics.jsonl")] == late and 400 in late
    assert_same(final_state(variant, run), final_state(variant, base_run(variant)))
    assert metric_series(run) == metric_series(base_run(variant))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", ["ckpt-", ".npz"])
def test_kill_9_in_the_middle_of_a_write(variant, target, tmp_path, capsys):
    """The deterministic worst case of the test above: a forked process of the real main() is
    killed with SIGKILL half-way through writing its second checkpoint or its second episode file
    (both at env step 200, the end of episode 2: the episode is stored first). Whatever the writer
    does, no ckpt-*.pt or .npz on disk may be half a file, and --resume must go on from the
    checkpoint at 100, warning only that it removes the half-written temporary file (named) and
    sets aside the episode the checkpoint does not count."""
    mod, run, ready = module(variant), tmp_path / "run", tmp_path / "ready"
    pid = os.fork()
    if pid == 0:                                          # the child: never returns to pytest
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            writes = {"n": 0}

            def open_(path, mode="r", *args, **kwargs):
                file = builtins.open(path, mode, *args, **kwargs)
                if target in Path(path).name and "w" in mode:
                    writes["n"] += 1
                    if writes["n"] == 2:
                        return HangingWrite(file, ready)
                return file

            mod.open = open_                              # the script's own files only
            mod.main([str(a) for a in cli(tiny(variant, logdir=run))])
        finally:
            os._exit(0)
    deadline = time.time() + 90
    while not ready.exists() and time.time() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
        time.sleep(0.01)
    assert ready.exists(), "the child never reached the write"
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    for path in checkpoints(run):
        load_ckpt(variant, path)                          # raises on half a file
    disk = episodes_on_disk(run)                          # raises on half a file
    newest = load_ckpt(variant, checkpoints(run)[-1])["counters"]
    assert newest["env_steps"] == 100 and newest["episodes"] == 1     # episode 2 is not counted
    assert list(disk) == ["000000-100.npz"] + (["000001-100.npz"] if target == "ckpt-" else [])
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0
    removed = only_half_written_file_warnings(err)
    assert len(removed) == 1 and removed[0].startswith(".") and target in removed[0], removed
    assert f"at env step {newest['env_steps']} from" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_damaged_files_are_skipped_with_a_warning(variant, copied_run, capsys):
    """The newest checkpoint cut short (a half-written file) and two episode files damaged (cut in
    half, bytes flipped: zip CRC): resume warns naming each file and continues from the previous
    checkpoint with the good episodes, the one after that checkpoint set aside."""
    run = copied_run(variant)
    ckpts = checkpoints(run)
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[: ckpts[-1].stat().st_size // 2])
    files = sorted((run / "episodes").glob("*.npz"))
    files[0].write_bytes(files[0].read_bytes()[:100])
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2: len(data) // 2 + 32] = bytes(b ^ 0xFF for b in data[len(data) // 2:][:32])
    files[1].write_bytes(bytes(data))
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0 and "Traceback" not in err, err
    assert f"warning: skipping damaged checkpoint {ckpts[-1]}" in err
    for path in files[:2]:
        assert f"warning: skipping damaged episode file {path}" in err
    assert f"resumed {run} at env step 300 from {ckpts[-2]}" in out
    assert SET_ASIDE.fullmatch(err.splitlines()[-1]) and "1 episode(s)" in err    # the one after 300
    assert len([line for line in err.splitlines() if line.startswith("warning")]) == 4, err
    # All checkpoints damaged: a one-line error, exit code 2.
    for path in checkpoints(run):
        path.write_bytes(path.read_bytes()[:1000])
    rc, _, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 2 and "no usable checkpoint" in err.splitlines()[-1]


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty_checkpoint_is_skipped_with_a_warning(variant, copied_run, capsys):
    run = copied_run(variant)
    newest = checkpoints(run)[-1]
    newest.write_bytes(b"")                              # a copy or a disk that gave up at 0 bytes
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0 and f"warning: skipping damaged checkpoint {newest}" in err, err


@pytest.mark.parametrize("variant", VARIANTS)
def test_bit_flipped_checkpoint_is_skipped_with_a_warning(variant, copied_run, capsys):
    run = copied_run(variant)
    newest = checkpoints(run)[-1]
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    newest.write_bytes(bytes(data))
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0 and f"warning: skipping damaged checkpoint {newest}" in err, err


@pytest.mark.parametrize("variant", VARIANTS)
def test_torn_metrics_line_does_not_break_resume(variant, copied_run, capsys):
    run = copied_run(variant)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 400, "model_lo')
    rc, out, err = run_main(variant, ["--resume", run, "--total_steps", 500], capsys)
    assert rc == 0, err
    assert max(r["step"] for r in module(variant).read_metrics(run)) == 500


# =================================================================================================
# 3. Non-finite values never reach the weights: skipped, counted, logged; a run of them stops.
# =================================================================================================

class NaNGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN backward: a non-finite gradient alone."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def snapshot(agent) -> dict:
    """A copy of the weights each optimiser steps: the world model, the actor, the critic."""
    d = agent.dreamer
    groups = dict(model=[d.world_model], actor=[d.actor_critic.actor], value=[d.actor_critic.value])
    return {name: [p.detach().clone() for m in mods for p in m.parameters()]
            for name, mods in groups.items()}


def changed(before, after) -> dict:
    return {name: not all(torch.equal(x, y) for x, y in zip(before[name], after[name]))
            for name in before}


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_updates_never_reach_the_weights(variant, tmp_path, monkeypatch):
    """A NaN world-model loss, a NaN actor gradient (finite loss) and an Inf critic loss, one at a
    time: only that optimiser's step is skipped (its weights and Adam state untouched), the others
    step; each is counted, and a finite update resets the count in a row."""
    mod = module(variant)
    agent = mod.DreamerAgent(mod.DreamerConfig(**tiny(variant, logdir=str(tmp_path / "run"))))
    mod.open_run(agent)                                    # what train() does first
    agent.run_episode()                                    # one prefill episode in the replay
    assert agent.replay.can_sample() and agent.updates == 0
    WM, AC = mod.WorldModel, mod.ActorCritic
    world_model_loss, actor_critic_loss = WM.loss, AC.loss
    faults = {                                             # optimiser hit -> patch of a class
        "model": (WM, "loss", lambda self, batch: (
            lambda loss, post, m: (loss * float("nan"), post, m))(*world_model_loss(self, batch))),
        "actor": (AC, "loss", lambda self, traj: (
            lambda actor, value, m: (NaNGradient.apply(actor), value, m))(*actor_critic_loss(self, traj))),
        "value": (AC, "loss", lambda self, traj: (
            lambda actor, value, m: (actor, value + float("inf"), m))(*actor_critic_loss(self, traj))),
    }
    count = 0
    for hit, patch in faults.items():
        optimizer = agent.dreamer.optimizers[hit].opt
        before, adam = snapshot(agent), copy.deepcopy(optimizer.state_dict())
        monkeypatch.setattr(*patch)
        metrics = agent.train_batch()
        monkeypatch.undo()
        count += 1
        after = snapshot(agent)
        assert changed(before, after) == {k: k != hit for k in before}, hit  # only `hit` skipped
        assert all(torch.isfinite(p).all() for ps in after.values() for p in ps)
        assert_same(optimizer.state_dict(), adam, f"{hit} optimiser")       # Adam untouched
        assert agent.nonfinite == count == metrics["nonfinite_updates"]
        assert agent.nonfinite_in_row == 1
        agent.train_batch()                                 # a finite update resets the run
        assert agent.nonfinite_in_row == 0
    # max_nonfinite_updates in a row stop training with the documented advice.
    agent.cfg.max_nonfinite_updates = 3
    monkeypatch.setattr(*faults["model"])
    before = snapshot(agent)
    agent.train_batch(), agent.train_batch()
    with pytest.raises(mod.NonFiniteError) as raised:
        agent.train_batch()
    message = str(raised.value)
    assert "3 consecutive updates" in message and "lower learning rate" in message \
        and "--model_learning_rate" in message and "--grad_clip" in message
    assert all(torch.equal(x, y) for x, y in zip(snapshot(agent)["model"], before["model"]))
    agent.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_run_is_logged_then_stopped(variant, tmp_path, capsys, monkeypatch):
    """Through the CLI: every other world-model loss NaN is counted and logged and the run goes on
    (max_nonfinite_updates 2 never reached); every loss NaN stops the run after 3 with one
    `error:` line naming the fixes, exit code 1, and a checkpoint whose world model never moved."""
    mod = module(variant)
    world_model_loss, calls = mod.WorldModel.loss, {"n": 0}

    def every_other(self, batch):
        loss, post, m = world_model_loss(self, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] % 2 else loss), post, m

    monkeypatch.setattr(mod.WorldModel, "loss", every_other)
    run = tmp_path / "half"
    rc, _, err = run_main(variant, cli(tiny(variant, logdir=run, max_nonfinite_updates=2)), capsys)
    assert rc == 0, err
    c = load_ckpt(variant, checkpoints(run)[-1])["counters"]
    assert c["nonfinite_updates"] == (c["updates"] + 1) // 2 > 0
    logged = [r["nonfinite_updates"] for r in metrics(run) if "nonfinite_updates" in r]
    assert logged and 0 < max(logged) <= c["nonfinite_updates"]

    monkeypatch.setattr(mod.WorldModel, "loss", lambda self, batch: (
        lambda loss, post, m: (loss * float("nan"), post, m))(*world_model_loss(self, batch)))
    run = tmp_path / "all"
    rc, _, err = run_main(variant, cli(tiny(variant, logdir=run, max_nonfinite_updates=3,
                                            pretrain_steps=5, checkpoint_interval=50)), capsys)
    assert rc == 1, err
    line = one_error_line(err)
    assert "3 consecutive updates" in line and "lower learning rate" in line and "--grad_clip" in line
    first, last = (load_ckpt(variant, p) for p in (checkpoints(run)[0], checkpoints(run)[-1]))
    assert last["counters"]["nonfinite_updates"] == 3 and last["counters"]["updates"] == 3
    wm = [k for k in first["model"] if k.startswith("world_model.")]
    assert {k.split(".")[1] for k in wm} >= {"encoder", "rssm", "decoder", "reward"}, wm
    assert all(torch.equal(first["model"][k], last["model"][k]) for k in wm)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_nonfinite_forward_pass_is_skipped_and_stops_the_run(variant, tmp_path, capsys):
    run = tmp_path / "run"
    huge = dict(model_learning_rate=1e30, actor_learning_rate=1e30, value_learning_rate=1e30)
    rc, _, err = run_main(variant, cli(tiny(variant, logdir=run, max_nonfinite_updates=3,
                                            pretrain_steps=6, **huge)), capsys)
    assert rc == 1, err
    assert "consecutive updates" in one_error_line(err)
    last = load_ckpt(variant, checkpoints(run)[-1])
    assert last["counters"]["nonfinite_updates"] == 3
    assert all(torch.isfinite(v).all() for v in last["model"].values())


# =================================================================================================
# 4. Bad input: one `error:` line naming the field, the value and what is allowed; exit code 2;
#    no traceback.
# =================================================================================================

def bad_inputs(variant, tmp_path: Path, base: Path, other_base: Path) -> list:
    """(label, argv, words the error line must contain). Files are made under tmp_path."""
    name, other = f"{variant}.py", OTHER[variant]
    logdir = ["--logdir", tmp_path / "new"]
    ok = cli({k: v for k, v in tiny(variant).items()}) + logdir   # a good command line

    def yaml_file(label, content):
        path = tmp_path / f"{label}.yaml"
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        return path

    foreign = Path(shutil.copytree(base, tmp_path / "foreign-ckpt"))   # own run, other's ckpt
    shutil.copy(checkpoints(other_base)[-1], foreign / "ckpts" / "ckpt-0000009999.pt")
    empty_dir, no_ckpt = tmp_path / "empty", Path(shutil.copytree(base, tmp_path / "no-ckpt"))
    empty_dir.mkdir()
    shutil.rmtree(no_ckpt / "ckpts")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    existing = Path(shutil.copytree(base, tmp_path / "existing"))
    cases = [
        # environments
        ("unknown backend", ["--env", "gymm/Pendulum-v1"], ["gymm", "did you mean 'gym'", "backends:"]),
        ("unknown backend 2", ["--env", "foo/bar"], ["'foo'", "backends:", "dmc"]),
        ("unknown gym id", ["--env", "gym/Pendulm-v1"], ["Pendulm-v1", "Pendulum-v1"]),
        ("no backend", ["--env", "Pendulum"], ["'env'", "'Pendulum'", "backend/task"]),
        ("bad obs", ["--obs", "depth"], ["'obs'", "'depth'", "'pixels' or 'state'"]),
        # unknown or misspelt keys (YAML), types, ranges
        ("misspelt yaml key", ["--config", yaml_file("k1", {"batch_sise": 3})],
         ["'batch_sise'", "did you mean 'batch_size'"]),
        ("misspelt yaml key 2", ["--config", yaml_file("k2", {"imagine_horizn": 3})],
         ["'imagine_horizn'", "did you mean 'imagine_horizon'"]),
        ("unknown yaml key", ["--config", yaml_file("k3", {"zzz_qqq": 1})], ["'zzz_qqq'", "--help"]),
        ("yaml not a mapping", ["--config", yaml_file("k4", "- 1\n- 2\n")], ["mapping", "list"]),
        ("missing yaml", ["--config", tmp_path / "nope.yaml"], ["nope.yaml", "does not exist"]),
        ("int as text", ["--batch_size", "three"], ["'batch_size'", "'three'", "int"]),
        ("int as fraction", ["--batch_size", "2.5"], ["'batch_size'", "2.5", "int"]),
        ("float as text", ["--discount", "high"], ["'discount'", "'high'", "float"]),
        ("bool as text", ["--video", "maybe"], ["'video'", "'maybe'", "bool"]),
        ("list in yaml", ["--config", yaml_file("t1", {"discount": [0.9]})], ["'discount'", "float"]),
        ("bool for int in yaml", ["--config", yaml_file("t2", {"batch_size": True})],
         ["'batch_size'", "True", "int"]),
        ("negative lr", ["--model_learning_rate", "-0.0001"], ["'model_learning_rate'", "-0.0001", "> 0"]),
        ("negative lr =", ["--actor_learning_rate=-1e-4"], ["'actor_learning_rate'", "-0.0001", "> 0"]),
        ("zero lr", ["--value_learning_rate", "0"], ["'value_learning_rate'", "0", "> 0"]),
        ("zero batch", ["--batch_size", "0"], ["'batch_size'", "0", "> 0"]),
        ("horizon 0", ["--imagine_horizon", "0"], ["'imagine_horizon'", "0", "> 0"]),
        ("negative horizon", ["--imagine_horizon", "-3"], ["'imagine_horizon'", "-3", "> 0"]),
        ("discount > 1", ["--discount", "1.5"], ["'discount'", "1.5", "0 < discount <= 1"]),
        ("lambda < 0", ["--td_lambda", "-0.5"], ["'td_lambda'", "-0.5", "0 <= td_lambda <= 1"]),
        ("zero seq", ["--train_seq_len", "0"], ["'train_seq_len'", "0", "> 0"]),
        ("negative seed", ["--seed", "-1"], ["'seed'", "-1", ">= 0"]),
        ("zero keep", ["--keep_checkpoints", "0"], ["'keep_checkpoints'", "0", "> 0"]),
        ("zero nonfinite", ["--max_nonfinite_updates", "0"], ["'max_nonfinite_updates'", "> 0"]),
        ("negative clip", ["--grad_clip", "-1"], ["'grad_clip'", "-1", "> 0"]),
        ("negative time limit", ["--time_limit", "-5"], ["'time_limit'", "-5", ">= 0"]),
        ("zero repeat", ["--action_repeat", "0"], ["'action_repeat'", "0", "> 0"]),
        ("image size", ["--image_size", "32"],                # not a field: images are 64 x 64
         ["'--image_size'", "unknown config field 'image_size'", "--help"]),
        ("activation", ["--act", "gelu"], ["'act'", "'gelu'", "elu"]),
        ("precision", ["--precision", "8"], ["'precision'", "8", "16 or 32"]),
        ("actor_grad", ["--actor_grad", "magic"], ["'actor_grad'", "'magic'", "'reinforce'"]),
        ("prefill < sequence", ["--seed_steps", "5"], ["'seed_steps'", "5", "train_seq_len"]),
        # the other variant
        ("algo on the CLI", ["--algo", ALGO[other]], ["'algo'", repr(ALGO[other]), f"{other}.py"]),
        ("algo in yaml", ["--config", yaml_file("a1", {"algo": ALGO[other]})],
         ["'algo'", repr(ALGO[other]), f"{other}.py"]),
        ("other variant's checkpoint", ["--resume", foreign],
         ["ckpt-0000009999.pt", repr(ALGO[other]), repr(ALGO[variant])]),
        # a run's env and network sizes are fixed: one line naming the field and both values
        ("resume with other sizes", ["--resume", existing, "--num_units", "64"],
         ["--resume", "'num_units'", "64", "32", "existing", "cannot change", "allowed"]),
        ("resume on another env", ["--resume", existing, "--env", "gym/CartPole-v1"],
         ["--resume", "'env'", "'gym/CartPole-v1'", "'gym/Pendulum-v1'", "cannot change", "allowed"]),
        # run directories
        ("resume a ckpts dir", ["--resume", existing / "ckpts"],
         ["--resume", "ckpts", f"did you mean --resume {existing}?", "allowed"]),
        ("resume missing dir", ["--resume", tmp_path / "missing"], ["--resume", "missing", "allowed"]),
        ("resume empty dir", ["--resume", empty_dir], ["--resume", "empty", "allowed"]),
        ("resume without ckpts", ["--resume", no_ckpt], ["no-ckpt", "no usable checkpoint"]),
        ("logdir under a file", [*ok, "--logdir", a_file / "run"], ["--logdir", "a-file", "not writable"]),
        ("logdir in /proc", [*ok, "--logdir", "/proc/dreamer-run"], ["--logdir", "/proc/dreamer-run"]),
        ("logdir holds a run", [*ok, "--logdir", existing], ["--logdir", "already holds a run", "--resume"]),
        ("eval_only missing", ["--eval_only", tmp_path / "missing.pt"], ["missing.pt", "does not exist"]),
        ("eval_only empty dir", ["--eval_only", empty_dir], ["empty", "holds no checkpoint", "allowed"]),
    ]
    if not torch.cuda.is_available():
        cases.append(("cuda without CUDA", ["--device", "cuda"], ["'device'", "'cuda'", "'cpu'"]))
    if os.geteuid() != 0:                                 # root writes through permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(("read-only logdir", [*ok, "--logdir", locked / "run"], ["--logdir", "not writable"]))
    if variant == "dreamer_v2":
        cases += [
            ("kl_alpha > 1", ["--kl_alpha", "1.5"], ["'kl_alpha'", "1.5", "0 <= kl_alpha <= 1"]),
            ("kl_alpha < 0", ["--kl_alpha", "-0.2"], ["'kl_alpha'", "-0.2", "0 <= kl_alpha <= 1"]),
            ("kl_alpha in yaml", ["--config", yaml_file("v2", {"kl_alpha": 2})], ["'kl_alpha'", "2.0"]),
            ("zero categories", ["--num_categories", "0"], ["'num_categories'", "0", "> 0"]),
            ("reward head", ["--reward_head", "gauss"], ["'reward_head'", "'gauss'", "'twohot'"]),
            ("unimix", ["--unimix", "0.01"], ["'--unimix'", "unknown config field 'unimix'", "--help"]),
        ]
    else:
        cases += [
            ("V2 key in V1 yaml", ["--config", yaml_file("v1", {"kl_alpha": 0.8})], ["'kl_alpha'", "--help"]),
            ("min_std 0", ["--min_std", "0"], ["'min_std'", "0", "> 0"]),
        ]
    full = []
    for label, args, words in cases:
        if args[:1] in (["--resume"], ["--eval_only"]) or "--logdir" in args:
            full.append((label, args, words))
        else:                                    # a good command line with one thing wrong
            full.append((label, [*ok, *args], words))
    return full, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_inputs(variant, base_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases, name = bad_inputs(variant, tmp_path, base_run(variant), base_run(OTHER[variant]))
    failures = []
    for label, args, words in cases:
        rc, out, err = run_main(variant, args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        problems = []
        if rc != 2:
            problems.append(f"exit code {rc}")
        if "Traceback" in err:
            problems.append("traceback")
        if len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{len(lines)} stderr lines")
        missing = [w for w in words if not lines or w not in lines[-1]]
        if missing:
            problems.append(f"missing {missing}")
        if problems:
            failures.append(f"{label}: {', '.join(problems)}: {err.strip()[-400:]}")
    with capsys.disabled():
        print(f"\n[bad inputs] {name}: {len(cases)} bad inputs tried (+ {len(KNOWN_BAD_INPUTS)} "
              f"more in test_known_bad_inputs), {len(cases) - len(failures)} gave a one-line error")
    assert not failures, "\n".join(failures)


def cross_variant_config(variant, tmp_path, base_run):
    return ["--config", base_run(OTHER[variant]) / "config.yaml", "--logdir", tmp_path / "new"]


KNOWN_BAD_INPUTS = [
    pytest.param(lambda v, t, b: [*cli(tiny(v)), "--batch_sze", "3", "--logdir", t / "new"],
                 ["--batch_sze", "did you mean", "batch_size"], id="misspelt-cli-flag"),
    pytest.param(lambda v, t, b: [*cli(tiny(v)), "--model_learning_rate", "-1e-4", "--logdir", t / "n"],
                 ["'model_learning_rate'", "-0.0001", "> 0"], id="negative-lr-exponent"),
    pytest.param(cross_variant_config, ["'algo'", "Dreamerv", "dreamer_v"], id="other-variant-config"),
    pytest.param(lambda v, t, b: ["--resume", b(OTHER[v]), "--logdir", t / "n"],
                 ["'algo'", "Dreamerv", "dreamer_v"], id="resume-other-variant-run"),
    pytest.param(lambda v, t, b: ["--eval_only", b(OTHER[v]) / "ckpts", "--logdir", t / "n"],
                 ["Dreamerv", "allowed"], id="eval-other-variant-checkpoint"),
    pytest.param(lambda v, t, b: ["--eval_only", b(v) / "ckpts", "--logdir", t / "n", "--num_units", 64],
                 ["does not fit", "size mismatch"], id="eval-only-other-sizes"),
    pytest.param(lambda v, t, b: ["--eval_only", b(v) / "ckpts", "--logdir", t / "n", "--env",
                                  "gym/CartPole-v1"],
                 ["does not fit", "size mismatch"], id="eval-only-other-env"),
    pytest.param(lambda v, t, b: ["--config", t / "broken.yaml", "--logdir", t / "n"],
                 ["broken.yaml", "not valid YAML"], id="yaml-syntax-error"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("make_args, words", KNOWN_BAD_INPUTS)
def test_known_bad_inputs(variant, make_args, words, base_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.yaml").write_text("env: gym/Pendulum-v1\nbatch_size: [1,\n")
    rc, out, err = run_main(variant, make_args(variant, tmp_path, base_run), capsys)
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    line = one_error_line(err)
    assert all(w in line for w in words), line


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_input_in_a_real_process(variant, tmp_path):
    """The table above runs main() in-process; here the interpreter itself: exit status 2, one
    line on stderr, nothing else."""
    proc = subprocess.run([sys.executable, str(ROOT / f"{variant}.py"), *map(str, cli(tiny(
        variant, logdir=tmp_path / "run", imagine_horizon=0)))],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == \
        "error: config field 'imagine_horizon' has value 0; allowed: > 0"
    assert not (tmp_path / "run").exists()                # nothing created for a refused run


class DiskFull(HalfWrite):
    """Half of the data written, then a failure as a full disk gives."""

    def after_half(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_disk_while_saving(variant, tmp_path, capsys, monkeypatch):
    """The second checkpoint's write fails half-way with ENOSPC (the script's module-level `open`
    is wrapped, so only its own files are affected)."""
    mod, run, writes = module(variant), tmp_path / "run", {"n": 0}

    def full_disk_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        if Path(path).name.startswith(".ckpt-") and "w" in mode:
            writes["n"] += 1
            if writes["n"] == 2:
                return DiskFull(file)
        return file

    monkeypatch.setattr(mod, "open", full_disk_open, raising=False)
    rc, out, err = run_main(variant, cli(tiny(variant, logdir=run)), capsys)
    monkeypatch.undo()
    # The previous checkpoint survives, loads, and no temporary file is left.
    assert [p.name for p in checkpoints(run)] == ["ckpt-0000000100.pt"]
    assert load_ckpt(variant, checkpoints(run)[0])["counters"]["env_steps"] == 100
    assert sorted(p.name for p in (run / "ckpts").iterdir()) == ["ckpt-0000000100.pt"]
    # The guarantee: exit code 2 and one line naming the file and the cause.
    assert rc == 2, err[-1500:]
    line = one_error_line(err)
    assert "No space left on device" in line and "ckpt-0000000200.pt" in line
    assert run_main(variant, ["--resume", run], capsys)[0] == 0      # and the run goes on


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", ["episode", "metrics"])
def test_full_disk_while_writing_an_episode_or_the_metrics(variant, target, tmp_path, capsys,
                                                          monkeypatch):
    """The second episode file's write, or the second metrics line's append, fails half-way
    with ENOSPC: one error line naming the file, and the run resumes from its last checkpoint."""
    mod, run = module(variant), tmp_path / "run"
    name = {"episode": "000001-100.npz", "metrics": "metrics.jsonl"}[target]
    writes = {"n": 0}

    def full_disk_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        hit = Path(path).name.startswith(f".{name}.tmp") if target == "episode" else \
            (Path(path).name == name and "a" in mode)
        if hit:
            writes["n"] += 1
            if writes["n"] == (1 if target == "episode" else 2):
                return DiskFull(file)
        return file

    monkeypatch.setattr(mod, "open", full_disk_open, raising=False)
    rc, out, err = run_main(variant, cli(tiny(variant, logdir=run)), capsys)
    monkeypatch.undo()
    assert rc == 2, err[-1500:]
    line = one_error_line(err)
    assert "No space left on device" in line and name in line
    assert not [p for p in run.rglob(".*.tmp*")]                   # no temporary file left
    assert run_main(variant, ["--resume", run], capsys)[0] == 0      # the run goes on
    assert mod.read_metrics(run)[-1]["step"] == 300
    # No episode is lost: the checkpoint at an episode's last step is written after the episode,
    # so the resumed run starts before the one that met the full disk and collects it again.
    assert list(episodes_on_disk(run)) == [f"{i:06d}-100.npz" for i in range(3)]
    assert load_ckpt(variant, checkpoints(run)[-1])["counters"]["env_steps"] == 300


# =================================================================================================
# 5. Untrusted files: nothing that loads a checkpoint, an episode or a config runs code.
# =================================================================================================

class Payload:
    """Unpickling this runs code: it writes the marker file (what an attacker's pickle would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("variant", VARIANTS)
def test_malicious_checkpoint_is_refused_without_running(variant, copied_run, tmp_path, capsys,
                                                         monkeypatch):
    mod, run, marker = module(variant), copied_run(variant), tmp_path / "pwned"
    evil = run / "ckpts" / "ckpt-0000009999.pt"                 # the newest checkpoint
    torch.save({"algo": ALGO[variant], "model": Payload(marker), "counters": {}}, evil)
    torch.load(evil, weights_only=False)                         # the payload is real:
    assert marker.exists()                                       # an unsafe load runs it
    marker.unlink()
    rc, out, err = run_main(variant, ["--resume", run], capsys)   # resume skips it...
    assert rc == 0 and f"warning: skipping damaged checkpoint {evil}" in err, err
    assert f"resumed {run} at env step 400" in out
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_main(variant, ["--eval_only", evil, "--logdir", tmp_path / "ev"], capsys)
    assert rc == 2 and str(evil) in one_error_line(err)           # ...eval_only refuses it
    with pytest.raises(mod.CheckpointError):
        mod.Dreamer.from_pretrained(evil)
    with pytest.raises(mod.CheckpointError):
        mod.DreamerAgent.from_pretrained(evil)
    assert not marker.exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_malicious_npz_is_refused_without_running(variant, copied_run, tmp_path, capsys):
    run, marker = copied_run(variant), tmp_path / "pwned"
    evil = run / "episodes" / "000099-10.npz"
    steps = 11
    np.savez(evil, state=np.zeros((steps, 3), np.float32), action=np.zeros((steps, 1), np.float32),
             reward=np.array([Payload(marker)] * steps, dtype=object),
             discount=np.ones(steps, np.float32), is_first=np.zeros(steps, bool))
    with np.load(evil, allow_pickle=True) as data:               # the payload is real
        data["reward"]
    assert marker.exists()
    marker.unlink()
    rc, out, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0 and f"warning: skipping damaged episode file {evil}" in err, err
    assert not marker.exists()
    assert "000099-10.npz" not in module(variant).ReplayBuffer(
        run / "episodes", 10**9, 10, np.random.default_rng()).episodes


@pytest.mark.parametrize("variant", VARIANTS)
def test_malicious_yaml_is_refused_without_running(variant, copied_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = f'env: !!python/object/apply:builtins.exec ["open({str(marker)!r}, \'w\')"]\n'
    yaml.unsafe_load(payload)                                     # the payload is real
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / "evil.yaml"
    evil.write_text(payload)
    rc, _, err = run_main(variant, ["--config", evil, "--logdir", tmp_path / "new"], capsys)
    assert rc == 2 and "Traceback" not in err and "not valid YAML" in err
    run = copied_run(variant)                                     # a run's own config.yaml
    (run / "config.yaml").write_text(payload)
    rc, _, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 2 and "not valid YAML" in err
    assert not marker.exists()


# =================================================================================================
# 6. Disk use is bounded: replay capacity deletes the oldest episode files; checkpoints keep the
#    latest `keep_checkpoints` plus the best evaluation.
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_disk_use_is_bounded(variant, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main(variant, cli(tiny(variant, logdir=run, total_steps=600,
                                            replay_capacity=250, keep_checkpoints=2,
                                            checkpoint_interval=50, eval_every=100)), capsys)
    assert rc == 0, err
    # Replay: 6 episodes of 100 steps were collected; 250 steps of capacity keep the newest 2.
    assert episodes_on_disk(run) == {"000004-100.npz": 100, "000005-100.npz": 100}
    assert not [p for p in (run / "episodes").iterdir() if p.suffix != ".npz"]   # no temp files
    # Checkpoints: the latest 2 of 12, plus best/ (its weights and config), nothing else.
    assert sorted(str(p.relative_to(run / "ckpts")) for p in (run / "ckpts").rglob("*")) == \
        ["best", "best/config.yaml", "best/model.pt", "ckpt-0000000550.pt", "ckpt-0000000600.pt"]
    last = load_ckpt(variant, checkpoints(run)[-1])
    evals = [r["eval_return"] for r in metrics(run) if "eval_return" in r]
    assert last["counters"]["evals"] == 6 and last["counters"]["best_eval"] == pytest.approx(max(evals))
    best = module(variant).Dreamer.from_pretrained(run / "ckpts" / "best")
    assert isinstance(best, module(variant).Dreamer)
    assert load_ckpt(variant, run / "ckpts" / "best" / "model.pt")["algo"] == ALGO[variant]
    assert yaml.safe_load((run / "ckpts" / "best" / "config.yaml").read_text())["algo"] == ALGO[variant]
    # Resuming with a smaller capacity trims the replay on disk at once.
    rc, _, err = run_main(variant, ["--resume", run, "--replay_capacity", 150], capsys)
    assert rc == 0, err
    assert episodes_on_disk(run) == {"000005-100.npz": 100}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_removes_temporary_files_of_a_killed_writer(variant, copied_run, capsys):
    run = copied_run(variant)
    stale = [run / "ckpts" / ".ckpt-0000000500.pt.tmp999999",
             run / "episodes" / ".000003-100.npz.tmp999999"]
    for path in stale:
        path.write_bytes(b"half of a file")
    rc, _, err = run_main(variant, ["--resume", run], capsys)
    assert rc == 0
    assert not [p for p in stale if p.exists()]
    for path in stale:                                    # each removal is said, naming the file
        assert f"warning: removing half-written file {path}" in err


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_optimizer_skips_a_nonfinite_step_on_the_device(variant):
    """The fused Adam (used on CUDA, available on CPU too) skips a NaN/Inf step inside its kernel,
    without reading the flag on the host: weights and Adam state stay exactly as they were, and the
    next finite step is taken as usual."""
    import copy as copy_module
    mod = module(variant)
    cfg = mod.DreamerConfig(env="gym/Pendulum-v1", obs="state")
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = mod.Optimizer([net], 1e-3, cfg, torch.device("cpu"), fused=True)
    x = torch.randn(5, 4)
    assert bool(opt.step(net(x).square().mean()))                    # a first step fills the state
    weights, state = copy_module.deepcopy(net.state_dict()), copy_module.deepcopy(opt.opt.state_dict())
    finite = opt.step(net(x).square().mean() * float("nan"))
    assert finite.dtype == torch.bool and not bool(finite)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    after = opt.opt.state_dict()["state"]
    for index, entry in state["state"].items():
        assert all(torch.equal(entry[k], after[index][k]) for k in entry), index
    assert bool(opt.step(net(x).square().mean()))
    assert not torch.equal(weights["weight"], net.weight.detach())
