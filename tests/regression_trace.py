"""A regression trace of the training code: every loss of the first 20 updates and a digest of
the final weights, for a tiny configuration on a real environment (dm_control cartpole-balance),
fixed seed, CPU, one thread: fp32 for V1 and V2 from states and pixels, and bf16 autocast
(`precision 16`, the CPU runs' setting) for both from states. Each trace reports the precision its
run chose (its config.yaml): where precision 16 runs as fp32 (bf16 not native, or not faster),
the bf16 cases are skipped, and `--write` refuses to record them.

This is the one kind of test here that compares the code with its own earlier output: it does not
say the numbers are right (the math tests do that), it says that a change meant to keep behaviour
(a refactor, a speed-up) kept it. `tests/data/trace.json` was written by the code before such
changes; `tests/test_trace.py` checks that today's code gives the same numbers.

    python tests/regression_trace.py dreamer_v2 state 32     # print one trace as JSON
    python tests/regression_trace.py --write                 # rewrite tests/data/trace.json (all six)

The trace uses only what a user has: the config fields, the CLI entry point `main()`, the run
directory's metrics.jsonl and its last checkpoint, loaded weights-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "trace.json"
CASES = [(v, o, p) for v in ("dreamer_v1", "dreamer_v2") for o, p in
         (("state", 32), ("pixels", 32), ("state", 16))]
LOSSES = ("model_loss", "obs_loss", "reward_loss", "kl", "actor_loss", "value_loss")
UPDATES = 20


def fields(variant: str, obs: str, precision: int) -> dict:
    """One update per agent step after a 100-step prefill, one metrics line per update."""
    f = dict(env="dmc/cartpole-balance", obs=obs, device="cpu", seed=3, precision=precision,
             fast_render=True, num_units=32, deter_size=32, hidden_size=32, stoch_size=8,
             cnn_depth=8, obs_embed_size=256, batch_size=3, train_seq_len=10, imagine_horizon=5,
             time_limit=50, seed_steps=100, pretrain_steps=1, train_every=2, train_steps=1,
             total_steps=100 + 2 * UPDATES, scalar_freq=2, eval_every=10**6,
             checkpoint_interval=10**6, video=False)
    if variant == "dreamer_v2":
        f.update(stoch_size=4, num_categories=4, slow_target_update=3)
    return f


def weights_digest(state: dict) -> str:
    """sha256 over the sorted sha256 of every tensor's bytes: independent of the tensors' names,
    so a restructured model with the same numbers gives the same digest."""
    import torch
    hashes = sorted(hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()
                                   + str(tuple(t.shape)).encode()).hexdigest()
                    for t in state.values() if isinstance(t, torch.Tensor))
    return hashlib.sha256("".join(hashes).encode()).hexdigest()


def trace(variant: str, obs: str, precision: int) -> dict:
    """Run the tiny configuration in this process and read back what it wrote."""
    import contextlib
    import importlib
    import io

    import torch
    import yaml
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(variant)
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "run"
        args = [f"--{k}={v}" for k, v in fields(variant, obs, precision).items()] + [f"--logdir={logdir}"]
        console = io.StringIO()
        with contextlib.redirect_stdout(console):
            rc = module.main(args)
        if rc != 0:
            raise RuntimeError(f"{variant} {obs} {precision}: main() returned {rc}")
        ran = yaml.safe_load((logdir / "config.yaml").read_text())["precision"]    # what ran
        note = next((line for line in console.getvalue().splitlines()
                     if line.startswith("note: precision")), "")
        records = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        updates = [{k: r[k] for k in LOSSES if k in r} for r in records if "model_loss" in r]
        ckpt = sorted((logdir / "ckpts").glob("ckpt-*.pt"))[-1]
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    tensors = [t.double() for t in state.values() if isinstance(t, torch.Tensor)]
    return dict(updates=updates, weights=weights_digest(state), bf16_kernels=bf16_kernels(),
                precision_ran=ran, precision_note=note,
                parameters=int(sum(t.numel() for t in tensors)),
                abs_sum=float(sum(t.abs().sum() for t in tensors)),
                square_sum=float(sum((t ** 2).sum() for t in tensors)))


def bf16_kernels() -> str:
    """Which CPU instructions run this machine's bf16 matrix products. Machines with the same
    answer give the same bf16 trace; AMX and AVX-512 BF16 accumulate in other orders."""
    import platform

    import torch
    if platform.machine().lower() in ("arm64", "aarch64"):
        kind = "arm"
    elif torch.cpu._is_amx_tile_supported():
        kind = "amx"
    elif torch.cpu._is_avx512_bf16_supported():
        kind = "avx512_bf16"
    else:
        kind = "emulated"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")              # oneDNN's own cap, where one is set
    return f"{kind} (ONEDNN_MAX_CPU_ISA={isa})" if isa else kind


def case_name(variant: str, obs: str, precision: int) -> str:
    return f"{variant} {obs}" + (" bf16" if precision == 16 else "")


def run_in_subprocess(variant: str, obs: str, precision: int) -> dict:
    """One trace in a fresh interpreter with one thread (thread count changes float sums)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    out = subprocess.run([sys.executable, __file__, variant, obs, str(precision)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DATA.parent.mkdir(exist_ok=True)
        runs = {case: run_in_subprocess(*case) for case in CASES}
        fell_back = [case for case, r in runs.items() if r["precision_ran"] != case[2]]
        if fell_back:                     # a bf16 case that ran as fp32 is no bf16 trace
            sys.exit(f"not written: {', '.join(case_name(*case) for case in fell_back)} ran as fp32 "
                     f"here ({runs[fell_back[0]]['precision_note']}); write the trace where bf16 runs")
        result = {case_name(*case): r for case, r in runs.items()}
        DATA.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {DATA}")
    else:
        result = trace(sys.argv[1], sys.argv[2], int(sys.argv[3]))
        sys.stdout.flush()
        print(json.dumps(result))
