"""Speed of one Dreamer update, of the policy step and of a short real run.

    python benchmarks/train_step.py --small --device cpu          # about a minute on 2 CPU cores
    python benchmarks/train_step.py --device cuda                 # the official sizes, every mode
    python benchmarks/train_step.py --small --modes eager --no-e2e --no-write
    python benchmarks/train_step.py --small --profile             # + torch.profiler top ops
    python benchmarks/train_step.py --device cuda --time-budget 200   # no new row after 200 s

What is timed is the training code itself, through the real classes: for each preset a real
`DreamerAgent` is built (env included; a stand-in env with the preset's shapes if the backend is not
installed), its replay is filled with synthetic episodes, and then

- update:       `Dreamer.update(batch)` on one time-major batch drawn from that replay: world
                model, actor and critic losses, three backward passes, clipping, three AdamW steps;
- policy step:  `Dreamer.policy_step(obs, state, explore=True)` for one observation on the device;
- act:          `DreamerAgent.act(obs, state, explore=True)`: numpy observation in, numpy action out
                (what the env loop pays per agent step: policy step + transfers);
- sample:       `ReplayBuffer.sample(batch_size)` + the copy to the device that `train_batch` does;
- end to end:   `DreamerAgent.train()` of dreamer_v2.py on atari/Pong with the preset's train ratio
                (one update per `train_every` = 64 frames): env frames/s after the prefill.

Modes are config flags only (the model code is the same): eager (precision 32, the reference), bf16
(precision 16: bf16 autocast, on CUDA and on CPUs with native bf16, also where the scripts' speed
check runs precision 16 as fp32, which the row's note says; skipped on CPUs without native bf16),
compile (compile true), bf16+compile. "vs eager" is the eager update's time over this mode's,
measured in the same run. Each time is the
median of `--repeats` calls after `--warmup` calls (compilation happens in the warm-up and is
reported as "first call"); on CUDA every timing is wrapped in torch.cuda.synchronize().
The modes run one after another in the order given, by default cheapest first (each mode: every
preset, then its end-to-end run), so that `--time-budget` or a SIGINT cuts the compile rows rather
than whole presets: a row not begun in time is listed as skipped, the row a SIGINT lands in as
interrupted, and the table is written all the same. The table lists the rows by preset.

The table is printed and appended under "## Train step" in benchmarks/RESULTS.md (or `--results`),
with the device, torch version, commit, date, load average and the exact command. The commit is
git's; where the tree is not a git checkout (a copy on a GPU machine) it is $BENCH_COMMIT, which
benchmarks/gpu_check.sh sets from the COMMIT file written before the call ($BENCH_COMMIT, when set,
always wins). The "Environment speed" block written by benchmarks/env_speed.py (between its
markers) is left as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402

# name: (script module, env, observations, observation shape, action size, discrete) -- the shapes
# are the envs' own and are only used when the backend is not installed (stand-in env).
PRESETS = {
    "v1-dmc": ("dreamer_v1", "dmc/walker-walk", "pixels", (64, 64, 3), 6, False),
    "v1-dmc-state": ("dreamer_v1", "dmc/walker-walk", "state", (24,), 6, False),
    "v2-atari": ("dreamer_v2", "atari/Pong", "pixels", (64, 64, 1), 6, True),
    "v2-dmc": ("dreamer_v2", "dmc/walker-walk", "pixels", (64, 64, 3), 6, False),
    "v2-dmc-state": ("dreamer_v2", "dmc/walker-walk", "state", (24,), 6, False),
}
MODES = {  # name: config fields
    "eager": dict(precision=32, compile=False),
    "bf16": dict(precision=16, compile=False),
    "compile": dict(precision=32, compile=True),
    "bf16+compile": dict(precision=16, compile=True),
}
# --small: CPU-sized networks and batch (the official sizes otherwise). Horizon stays 15.
SMALL = dict(batch_size=4, train_seq_len=10, deter_size=64, hidden_size=64, num_units=64,
             cnn_depth=8, obs_embed_size=256)                 # 256 = the conv output at depth 8
SMALL_V2 = dict(stoch_size=8, num_categories=8)               # 8 x 8 categoricals instead of 32 x 32
HEADING = "## Train step"
ENV_SPEED_MARKERS = ("<!-- env_speed:begin -->", "<!-- env_speed:end -->")


# ------------------------------------------------------------------------------------------------
# Building an agent through the real class
# ------------------------------------------------------------------------------------------------

class _Space:
    def __init__(self, shape):
        self.shape = tuple(shape)


class StandInEnv:
    """Only what DreamerAgent's constructor reads from an env: observation shape and action space."""

    def __init__(self, key, shape, action_size, discrete):
        self.observation_space = {key: _Space(shape)}
        self.action_size, self.discrete = action_size, discrete

    def close(self):
        pass


@contextlib.contextmanager
def stand_in_env(module, preset):
    _, _, obs, shape, actions, discrete = PRESETS[preset]
    original = module.make_env
    key = "image" if obs == "pixels" else "state"
    module.make_env = lambda cfg, seed: StandInEnv(key, shape, actions, discrete)
    try:
        yield
    finally:
        module.make_env = original


def config_fields(preset: str, mode: str, small: bool, device: str, logdir: str, **extra) -> dict:
    script, env, obs = PRESETS[preset][:3]
    values = dict(env=env, obs=obs, device=device, logdir=logdir, seed=0, video=False, **MODES[mode])
    if small:
        values.update(SMALL, **(SMALL_V2 if script == "dreamer_v2" else {}))
    values.update(extra)
    return values


def build_agent(preset: str, mode: str, small: bool, device: str, logdir: str, **extra):
    """(agent, note): a real DreamerAgent for `preset` in `mode`; the real env when installed."""
    module = importlib.import_module(PRESETS[preset][0])
    cfg = module.DreamerConfig(**config_fields(preset, mode, small, device, logdir, **extra))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            agent, note = module.DreamerAgent(cfg), ""
    except common.EnvError as err:
        with stand_in_env(module, preset):
            agent = module.DreamerAgent(cfg)
        note = f"stand-in env ({str(err).split(':')[0]})"
    return agent, "; ".join(n for n in (note, force_bf16(agent, mode)) if n)


def fill_replay(agent, episodes: int = 4, length: int | None = None) -> None:
    """Synthetic episodes in the replay's own format (uint8 images, float32 actions)."""
    d, rng = agent.dreamer, np.random.default_rng(0)
    length = length or max(agent.cfg.train_seq_len * 2, 100)
    for _ in range(episodes):
        n = length + 1
        if d.discrete:
            action = np.eye(d.action_size, dtype=np.float32)[rng.integers(0, d.action_size, n)]
        else:
            action = rng.uniform(-1, 1, (n, d.action_size)).astype(np.float32)
        obs = rng.integers(0, 256, (n, *d.obs_shape), dtype=np.uint8) if d.world_model.obs_key == "image" \
            else rng.normal(size=(n, *d.obs_shape)).astype(np.float32)
        episode = {d.world_model.obs_key: obs, "action": action, "reward": rng.normal(size=n).astype(np.float32),
                   "discount": np.ones(n, np.float32), "is_first": np.arange(n) == 0}
        episode["action"][0] = 0
        agent.replay.add(episode)


def to_device(agent, batch: dict) -> dict:
    """The conversion `DreamerAgent.train_batch` does: (B, T, ...) numpy -> time-major tensors."""
    return {k: torch.as_tensor(v, device=agent.device).transpose(0, 1)
            for k, v in batch.items() if k in ("image", "state", "action", "reward", "discount")}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def time_calls(fn, device, warmup: int, repeats: int, limit_s: float = math.inf, compiles=False):
    """(median s, first call s, note, last result): `warmup` untimed calls, then `repeats` timed
    ones. A call slower than `limit_s` stops the timing: the median is then that one call (noted).
    With `compiles` the first call (compilation) is exempt from the limit."""
    first = out = None
    for i in range(warmup):
        seconds, out = timed(fn, device)
        first = seconds if first is None else first
        if seconds > limit_s and not (compiles and i == 0):
            return seconds, first, f"one call took {seconds:.0f} s > {limit_s:.0f} s: not repeated", out
    times = []
    for _ in range(repeats):
        seconds, out = timed(fn, device)
        first = seconds if first is None else first
        times.append(seconds)
        if seconds > limit_s:
            break
    note = f"only {len(times)} of {repeats} calls (> {limit_s:.0f} s)" if len(times) < repeats else ""
    return statistics.median(times), first, note, out


def bench_preset(preset: str, mode: str, args) -> dict:
    """One table row: update, policy step, act and sample times for `preset` in `mode`."""
    row = dict(preset=preset, mode=mode)
    if "bf16" in mode and not bf16_native(args.device):
        row["note"] = "skipped: no native bf16 here (precision 16 runs as fp32, the eager row)"
        return row
    if MODES[mode]["compile"]:
        torch._dynamo.reset()                 # no compiled code or guards from earlier rows
    with tempfile.TemporaryDirectory(prefix="bench-") as logdir:
        agent, note = build_agent(preset, mode, args.small, args.device, logdir)
        try:
            cfg, d = agent.cfg, agent.dreamer
            row.update(batch=f"{cfg.batch_size}x{cfg.train_seq_len}", params=d.parameter_count())
            fill_replay(agent, length=max(2 * cfg.train_seq_len, 100 if args.small else 500))
            batch = to_device(agent, agent.replay.sample(cfg.batch_size))
            warmup = max(args.warmup, 2) if cfg.compile else args.warmup   # compile: a recompile may follow
            row["update"], row["first"], limit_note, metrics = time_calls(
                lambda: agent.dreamer.update(batch), args.device, warmup, args.repeats, args.max_update_seconds,
                cfg.compile)
            if not metrics.get("finite", 1.0) or not all(map(math.isfinite, metrics.values())):
                note = (note + "; " if note else "") + "non-finite loss in the update"
            # The policy step: one observation, the latent state carried over like in the env loop.
            obs_np = {d.world_model.obs_key: np.random.default_rng(1).integers(0, 256, (1, *d.obs_shape)).astype(
                np.uint8 if d.world_model.obs_key == "image" else np.float32)}
            obs = torch.as_tensor(obs_np[d.world_model.obs_key], device=agent.device)
            state = [None]

            def policy_step():
                action, state[0] = d.policy_step(obs, state[0], True)
                return action

            calls = max(args.repeats, 20)
            row["policy"] = time_calls(policy_step, args.device, max(args.warmup, 3), calls)[0]
            act_state = [None]

            def act():
                action, act_state[0] = agent.act({d.world_model.obs_key: obs_np[d.world_model.obs_key][0]}, act_state[0], True)
                return action

            row["act"] = time_calls(act, args.device, max(args.warmup, 3), calls)[0]
            row["sample"] = time_calls(lambda: to_device(agent, agent.replay.sample(cfg.batch_size)),
                                       args.device, 1, max(args.repeats, 5))[0]
            row["note"] = "; ".join(n for n in (note, limit_note) if n)
            if args.profile:
                row["profile"] = profile_update(agent, batch, args)
        finally:
            agent.close()
    return row


def profile_update(agent, batch, args, top: int = 25) -> str:
    """torch.profiler of one update (after the warm-up): top ops by self time, op count, and how
    much of the wall time the ops account for (the rest is Python and dispatch overhead)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if agent.device.type == "cuda" else [])
    sync(agent.device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        agent.dreamer.update(batch)
        sync(agent.device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if agent.device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in events if e.key.startswith("aten::")]
    calls = sum(e.count for e in ops)
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = [f"profiled update: wall {wall * 1e3:.1f} ms (profiler on), {calls:,} aten op calls "
             f"({wall / max(calls, 1) * 1e6:.1f} us per op), self CPU time of all profiled events "
             f"{self_total * 1e3:.1f} ms",
             events.table(sort_by=sort, row_limit=top, max_name_column_width=40)]
    return "\n".join(lines)


def run_e2e(mode: str, args) -> dict:
    """A short real run of dreamer_v2.py on atari/Pong with the preset's train ratio: env frames/s
    from the end of update 1 + warm-up to the end of the last timed update (acting, env steps,
    replay sampling, updates, logging; no evaluation or checkpoint inside the window)."""
    row = dict(mode=mode)
    if "bf16" in mode and not bf16_native(args.device):
        row["note"] = "skipped: no native bf16 here"
        return row
    if MODES[mode]["compile"]:
        torch._dynamo.reset()
    updates, warm = args.e2e_updates, args.e2e_warmup
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as logdir:
        module = importlib.import_module("dreamer_v2")
        fields = config_fields("v2-atari", mode, args.small, args.device, logdir,
                               seed_steps=args.e2e_prefill, eval_every=10**9,
                               checkpoint_interval=10**9, keep_checkpoints=1)
        fields["total_steps"] = args.e2e_prefill + 10**6       # ended below, after the timed updates
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                agent = module.DreamerAgent(module.DreamerConfig(**fields))
        except common.EnvError as err:
            row["note"] = f"skipped: {str(err).split(':')[0]}"
            return row
        forced = force_bf16(agent, mode)
        marks, train_batch = [], agent.train_batch

        def counted_train_batch():
            metrics = train_batch()
            sync(agent.device)
            marks.append((time.perf_counter(), agent.step))
            if len(marks) == 1 + warm + updates:
                agent.cfg.total_steps = agent.step   # the loop ends here
            return metrics

        agent.train_batch = counted_train_batch
        try:
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                agent.train()
            row["total_s"] = time.perf_counter() - start
        finally:
            agent.close()
        cfg = agent.cfg
        row.update(train_every=cfg.train_every, batch=f"{cfg.batch_size}x{cfg.train_seq_len}")
        if len(marks) < 1 + warm + updates:
            row["note"] = f"only {len(marks)} updates ran"
            return row
        (t0, s0), (t1, s1) = marks[warm], marks[-1]
        cycles = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks[warm:], marks[warm + 1:])]
        row.update(prefill_frames=marks[0][1], frames=s1 - s0, updates=updates,
                   fps=(s1 - s0) / (t1 - t0), cycle_fps=statistics.median(cycles),
                   slowest_fps=min(cycles), first_update=marks[0][0] - start, note=forced)
    return row


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


def commit() -> str:
    """git's short commit, with the benchmarked files that have uncommitted changes; $BENCH_COMMIT
    instead when it is set (a tree copied without its .git); "unknown" when neither is there."""
    if os.environ.get("BENCH_COMMIT", "").strip():
        return os.environ["BENCH_COMMIT"].strip()

    def git(*cmd):  # rstrip only: a porcelain line starts with its status, " M" included
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--", "dreamer_v1.py", "dreamer_v2.py", "common.py",
                    "benchmarks/train_step.py")
    except OSError:
        return "unknown"
    return head + (" (+ uncommitted changes: " + ", ".join(
        line[3:] for line in dirty.splitlines()) + ")" if dirty else "")


def bf16_native(device) -> bool:
    """Whether `device` computes bf16 natively (the scripts' own check)."""
    return importlib.import_module("dreamer_v2").bf16_is_native(torch.device(device))[0]


def force_bf16(agent, mode: str) -> str:
    """A bf16 mode measures bf16 wherever it is native, also where the scripts' own speed check
    has made precision 16 run as fp32 (bf16 not faster there); the row's note says so."""
    if "bf16" not in mode or agent.cfg.precision == 16:
        return ""
    agent.cfg.precision = 16
    return "bf16 forced: the scripts run precision 16 as fp32 here (bf16 not faster than fp32)"


def ms(seconds) -> str:
    """Milliseconds with 3 significant digits at least: a fast step (0.042 ms) is never 0.0."""
    if seconds is None:
        return ""
    value = seconds * 1e3
    return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"


def sec(seconds) -> str:
    return "" if seconds is None else f"{seconds:,.1f}"


def allocator(args) -> str:
    """Make the allocator setting a run from the command line makes, unless --malloc-defaults, and
    say which one the timings ran with."""
    if args.malloc_defaults:
        return "glibc's defaults (--malloc-defaults)"
    if importlib.import_module("dreamer_v2").keep_freed_memory():
        return "freed memory kept in the process, as the scripts' command line does (keep_freed_memory)"
    return "the system's own (not glibc, or MALLOC_* / GLIBC_TUNABLES set)"


def report(rows, e2e_rows, args, command, load_before, revision) -> str:
    load_after = os.getloadavg()
    lines = [
        f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {'small' if args.small else 'official'} sizes · "
        f"{torch.device(args.device).type}",
        "",
        f"Device: {device_name(args.device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}. Allocator: {args.allocator}.",
        f"Commit {revision} (read at the start); command: `{command}`.",
        f"Load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} (other jobs share the machine when it exceeds the core count).",
        f"Median of {args.repeats} calls after {args.warmup} warm-up calls (compile: at least 2); "
        f"first call = the first warm-up call (compilation included; inductor's on-disk cache "
        f"shortens it on reruns). Policy step / act: median of {max(args.repeats, 20)} calls, batch 1.",
        "",
        "| preset | mode | batch | update ms | vs eager | updates/s | first call s | policy step ms | act ms | sample ms | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    eager = {r["preset"]: r.get("update") for r in rows if r["mode"] == "eager"}
    for r in rows:
        upd, base = r.get("update"), eager.get(r["preset"])
        speedup = f"{base / upd:.2f}x" if upd and base else ""
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r.get('batch', '')} | {ms(upd)} | {speedup} | "
            f"{'' if upd is None else f'{1 / upd:,.2f}'} | "
            f"{sec(r.get('first'))} | {ms(r.get('policy'))} | "
            f"{ms(r.get('act'))} | {ms(r.get('sample'))} | {r.get('note', '')} |")
    if e2e_rows:
        lines += [
            "",
            f"End to end: `dreamer_v2.py` on atari/Pong, `DreamerAgent.train()`, prefill "
            f"{args.e2e_prefill:,} frames, then one update per train_every frames; frames/s over "
            f"{args.e2e_updates} updates after {args.e2e_warmup} warm-up updates.",
            "",
            "Per cycle = the train_every frames between two updates (acting, env, one update): "
            "median and slowest cycle, to tell a steady rate from a one-off stall (a recompile).",
            "",
            "| mode | batch | train_every | first update at frame | frames timed | env frames/s | "
            "per cycle: median | slowest | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in e2e_rows:
            rate = lambda key: "" if r.get(key) is None else f"{r[key]:,.1f}"  # noqa: E731
            lines.append(f"| {r['mode']} | {r.get('batch', '')} | {r.get('train_every', '')} | "
                         f"{r.get('prefill_frames', '')} | {r.get('frames', '')} | {rate('fps')} | "
                         f"{rate('cycle_fps')} | {rate('slowest_fps')} | {r.get('note', '')} |")
    return "\n".join(lines)


def write(text: str, path) -> None:
    """Append `text` at the end of the "## Train step" section (created at the end of the file);
    everything else, the env_speed markers' block included, is kept byte for byte."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.rstrip("\n").split("\n")
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        new_lines = lines[:end] + ["", text] + ([""] + lines[end:] if end < len(lines) else [])
    else:
        new_lines = lines + ["", HEADING, "", text]
    new = "\n".join(new_lines) + "\n"
    for marker in ENV_SPEED_MARKERS:        # the env_speed block must survive unchanged
        assert old.count(marker) == new.count(marker)
    path.write_text(new)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized networks and batch (see SMALL)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per update median")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--malloc-defaults", action="store_true",
                        help="leave glibc's allocator as it is (the scripts' command line keeps freed memory)")
    parser.add_argument("--max-update-seconds", type=float, default=60.0,
                        help="an update slower than this is timed once and not repeated")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end run")
    parser.add_argument("--e2e-prefill", type=int, default=5000, help="prefill frames of the real run")
    parser.add_argument("--e2e-updates", type=int, default=10, help="timed updates of the real run")
    parser.add_argument("--e2e-warmup", type=int, default=2, help="untimed updates after the first")
    parser.add_argument("--time-budget", type=float, default=math.inf, metavar="SECONDS",
                        help="start no row after this many seconds; the rows left are listed as skipped")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler top ops of one update")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


class Budget:
    """--time-budget and SIGINT: a row not begun within the budget, or after an interrupt, is
    listed as skipped, the row a SIGINT lands in as interrupted; a failing row is a result too."""

    def __init__(self, seconds: float):
        self.seconds, self.end, self.reason = seconds, time.monotonic() + seconds, ""

    def run(self, fn, row: dict) -> dict:
        if not self.reason and time.monotonic() > self.end:
            self.reason = f"skipped: --time-budget {self.seconds:g} s spent"
        if self.reason:
            return dict(row, note=self.reason)
        try:
            return fn()
        except KeyboardInterrupt:
            self.reason = "skipped: interrupted (SIGINT) before this row"
            return dict(row, note="interrupted (SIGINT)")
        except Exception as err:  # noqa: BLE001 - a failing mode is a result, not a crash
            first = str(err).splitlines()[0][:200] if str(err).strip() else ""
            return dict(row, note=f"failed: {type(err).__name__}: {first}")


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join(["benchmarks/train_step.py", *(sys.argv[1:] if argv is None else argv)])
    load_before, revision = os.getloadavg(), commit()
    args.allocator = allocator(args)
    budget, rows, e2e_rows = Budget(args.time_budget), [], []
    for mode in args.modes:                       # mode by mode: a budget cuts the last modes
        for preset in args.presets:
            row = budget.run(lambda: bench_preset(preset, mode, args), dict(preset=preset, mode=mode))
            rows.append(row)
            print(f"{preset:9s} {mode:13s} update {ms(row.get('update')):>10s} ms  first "
                  f"{sec(row.get('first')):>6s} s  policy "
                  f"{ms(row.get('policy')):>7s} ms  act {ms(row.get('act')):>7s} ms  sample "
                  f"{ms(row.get('sample')):>7s} ms  {row.get('note', '')}", flush=True)
            if row.get("profile"):
                print(row["profile"], flush=True)
        if not args.no_e2e:
            row = budget.run(lambda: run_e2e(mode, args), dict(mode=mode))
            e2e_rows.append(row)
            print(f"end to end {mode:13s} {row.get('fps', float('nan')):9.1f} env frames/s  {row.get('note', '')}",
                  flush=True)
    rows.sort(key=lambda r: (args.presets.index(r["preset"]), args.modes.index(r["mode"])))
    text = report(rows, e2e_rows, args, command, load_before, revision)
    print()
    print(text)
    if not args.no_write:
        write(text, args.results)
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
