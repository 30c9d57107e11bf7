"""Steps per second of each environment backend (common.make_env) with random actions.

    python benchmarks/env_speed.py              # all installed backends, writes benchmarks/RESULTS.md
    python benchmarks/env_speed.py --seconds 1 --only dmc atari --no-write

Each row times `env.step` (action repeat and time limit included, resets counted in) for about
`--seconds` after a warm-up, at 64x64 pixels and, where the backend has it, state observations.
"agent steps/s" counts `env.step` calls; "env steps/s" counts frames (x action repeat), the unit of
the papers' plots. The table goes between the markers of the "Environment speed" section of
benchmarks/RESULTS.md (other sections are left alone).
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import EnvError, make_env  # noqa: E402

CASES = [  # (backend/task, obs, options)
    ("dmc/walker-walk", "pixels", {}),
    ("dmc/walker-walk", "pixels", {"fast_render": True}),
    ("dmc/walker-walk", "state", {}),
    ("dmc/cartpole-swingup", "pixels", {}),
    ("dmc/quadruped-walk", "pixels", {}),
    ("atari/Pong", "pixels", {}),
    ("atari/Pong", "pixels", {"grayscale": False}),
    ("gym/Pendulum-v1", "pixels", {}),
    ("gym/Pendulum-v1", "state", {}),
    ("gym/CartPole-v1", "pixels", {}),
    ("gym/CartPole-v1", "state", {}),
    ("mujoco/Hopper-v5", "pixels", {}),
    ("mujoco/Hopper-v5", "pixels", {"fast_render": True}),
    ("mujoco/Hopper-v5", "state", {}),
    ("mujoco/Humanoid-v5", "pixels", {}),
    ("procgen/coinrun", "pixels", {}),
    ("brax/ant", "state", {}),
]
BEGIN, END = "<!-- env_speed:begin -->", "<!-- env_speed:end -->"


def measure(name, obs, options, seconds):
    """(agent steps/s, env steps/s, action repeat) of random play, or raise EnvError if not installed."""
    with make_env(name, obs=obs, seed=0, **options) as env:
        env.reset()
        for _ in range(5):  # warm-up: GL context, jit compilation
            if any(env.step(env.action_space.sample())[2:4]):
                env.reset()
        steps, frames, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            before = env.episode_steps
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps, frames = steps + 1, frames + env.episode_steps - before
            if terminated or truncated:
                env.reset()
        elapsed = time.perf_counter() - start
        return steps / elapsed, frames / elapsed, env.action_repeat


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def table(rows, command):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip() or "uncommitted"
    except OSError:
        commit = "unknown"
    lines = [
        f"Machine: {machine()}; MUJOCO_GL={os.environ.get('MUJOCO_GL')}; no GPU used.",
        f"Date: {datetime.date.today().isoformat()}; commit {commit}; command: `{command}`",
        "",
        "Random actions, 64x64 images; one agent step = `action repeat` env steps (frames).",
        "procgen and brax rows need the optional installs of requirements-optional.txt (else: not installed).",
        "",
        "| env | obs | options | action repeat | agent steps/s | env steps/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, obs, options, result in rows:
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        if isinstance(result, str):
            lines.append(f"| {name} | {obs} | {opts} | | not installed: {result} | |")
        else:
            agent, frames, repeat = result
            lines.append(f"| {name} | {obs} | {opts} | {repeat} | {agent:,.0f} | {frames:,.0f} |")
    return "\n".join(lines)


def write(text, path):
    section = f"## Environment speed\n\n{BEGIN}\n{text}\n{END}\n"
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{text}\n{END}", old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(new)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row")
    parser.add_argument("--only", nargs="*", help="backends to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = parser.parse_args()
    rows = []
    for name, obs, options in CASES:
        if args.only and name.split("/")[0] not in args.only:
            continue
        try:
            result = measure(name, obs, options, args.seconds)
            print(f"{name:24s} {obs:6s} {options!s:24s} {result[0]:9.0f} agent steps/s {result[1]:9.0f} env steps/s", flush=True)
        except EnvError as err:
            result = str(err).split(":", 1)[0]
            print(f"{name:24s} {obs:6s} skipped: {err}", flush=True)
        rows.append((name, obs, options, result))
    text = table(rows, "python " + " ".join(["benchmarks/env_speed.py"] + sys.argv[1:]))
    print(text)
    if not args.no_write:
        write(text, args.results)
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
