"""Disk use per preset: the size of one checkpoint (weights, Adam state, counters) and of the replay
(compressed .npz episodes) per 100k env steps, measured with the real classes and environments.

    python benchmarks/disk_use.py            # prints a markdown table

A checkpoint is written after one real update, so that the optimisers' state is in it. The replay
size is measured on `--agent-steps` random-action steps of the real environment and scaled to 100k
env steps (images compress differently once a policy acts; the order of magnitude holds).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRESETS = [("dreamer_v2", "atari/Pong", "pixels"), ("dreamer_v2", "dmc/walker-walk", "pixels"),
           ("dreamer_v2", "dmc/walker-walk", "state"), ("dreamer_v1", "dmc/walker-walk", "pixels"),
           ("dreamer_v1", "dmc/walker-walk", "state")]


def measure(script: str, env: str, obs: str, agent_steps: int) -> dict:
    mod = importlib.import_module(script)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = mod.DreamerConfig(env=env, obs=obs, device="cpu", precision=32, video=False,
                                logdir=str(Path(tmp) / "run"), train_seq_len=10, batch_size=2,
                                seed_steps=10, time_limit=agent_steps * (4 if "atari" in env else 2))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            agent = mod.DreamerAgent(cfg)
            mod.open_run(agent)
            agent.step = cfg.seed_steps
            agent.run_episode()                                 # random actions: one episode
            agent.train_batch()                                 # fills the Adam state
            ckpt = mod.save_checkpoint(agent)
            agent.dreamer.save(agent.logdir / "ckpts" / "best" / "model.pt")
        episodes = list((agent.logdir / "episodes").glob("*.npz"))
        steps = sum(int(p.stem.split("-")[1]) for p in episodes)
        replay = sum(p.stat().st_size for p in episodes)
        row = dict(script=script, env=env, obs=obs, params=agent.dreamer.parameter_count(),
                   ckpt_mb=ckpt.stat().st_size / 1e6,
                   best_mb=(agent.logdir / "ckpts" / "best" / "model.pt").stat().st_size / 1e6,
                   replay_mb_per_100k=replay / steps * 100_000 / cfg.action_repeat / 1e6,
                   keep=cfg.keep_checkpoints)
        agent.close()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-steps", type=int, default=500, help="random steps measured per preset")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| script | env | obs | parameters | checkpoint MB | kept (latest + best) MB | replay MB per 100k env steps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for script, env, obs in PRESETS:
        r = measure(script, env, obs, args.agent_steps)
        kept = r["ckpt_mb"] * r["keep"] + r["best_mb"]               # best/ holds the weights only
        print(f"| {script}.py | {env} | {obs} | {r['params']:,} | {r['ckpt_mb']:.0f} | about {kept:.0f} | "
              f"{r['replay_mb_per_100k']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
