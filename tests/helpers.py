"""Helpers the test modules share: running a script's main() in this process, reading its files,
and the brute-force lambda-return every return test compares against. (Fixtures live in
conftest.py; plain functions live here, imported as `from helpers import ...`.)"""

import importlib
import json
from pathlib import Path

import numpy as np
import torch

import common

VARIANTS = ("dreamer_v1", "dreamer_v2")
ALGO = {"dreamer_v1": "Dreamerv1", "dreamer_v2": "Dreamerv2"}
EPISODE = 100                                # env steps per Pendulum episode in `tiny` runs


def module(variant: str):
    return importlib.import_module(variant)


def to_cli(fields: dict) -> list[str]:
    """{"batch_size": 3} -> ["--batch_size", "3"]: every config field is a CLI flag."""
    return [part for key, value in fields.items() for part in (f"--{key}", str(value))]


def tiny(variant, **overrides) -> dict:
    """Config fields of a run that trains in about a second: prefill 100 random steps, then 2
    updates every 50 env steps; a checkpoint every 100 steps; no evaluation unless asked."""
    fields = dict(env="gym/Pendulum-v1", obs="state", device="cpu", seed=0,
                  num_units=32, deter_size=32, stoch_size=8, hidden_size=32, obs_embed_size=32,
                  batch_size=3, train_seq_len=10, imagine_horizon=4,
                  seed_steps=100, train_every=50, train_steps=2, pretrain_steps=2,
                  time_limit=EPISODE, total_steps=300, eval_every=10**6, eval_episodes=1,
                  scalar_freq=50, checkpoint_interval=100, video=False)
    if variant == "dreamer_v2":
        fields.update(stoch_size=4, num_categories=4, slow_target_update=3)
    fields.update(overrides)
    return fields


def run_main(variant: str, args, capsys):
    """`python dreamer_vX.py ARGS` in this process: (exit code, stdout, stderr). The script does
    `sys.exit(main())`, so main's return value is the exit code; an exception escaping main is a
    traceback in the real script and is reported as exit code 'traceback'."""
    mod = module(variant)
    try:
        rc = mod.main([str(a) for a in args])
    except SystemExit as exit_:                       # argparse exits by itself
        rc = exit_.code
    except Exception as err:  # noqa: BLE001
        out = capsys.readouterr()
        return "traceback", out.out, out.err + f"\nTraceback: {type(err).__name__}: {err}"
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_jsonl(path) -> list[dict]:
    """Every record of a metrics.jsonl file (each line must parse)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def one_error_line(err: str) -> str:
    """The user-error contract: stderr is exactly one line, starting with 'error: '."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# --- Lambda-returns by their definition (V1 Eq. 5-6, V2 Eq. 4) -----------------------------------

def k_step_return(reward, discount, values, t, k):
    """V_N^k(s_t) of V1 Eq. (5), written out: the discounted rewards of the next k steps, then the
    value of the state reached: sum_{n=t}^{h-1} (prod_{j=t}^{n-1} g_j) r_n + (prod_{j=t}^{h-1} g_j) v_h
    with h = min(t + k, T). `values` has T + 1 entries: v_0 .. v_{T-1} (the `value` argument) and
    the bootstrap v_T; h >= t + 1, so v_0 is never used. With a per-step discount g_j (learned, or
    0 at a terminal) the product replaces the paper's gamma^(n - t)."""
    T = len(reward)
    h = min(t + k, T)
    total, weight = 0.0, 1.0
    for n in range(t, h):
        total += weight * reward[n]
        weight *= discount[n]
    return total + weight * values[h]


def lambda_return_by_definition(reward, value, discount, bootstrap, lambda_):
    """V1 Eq. (6) on python floats: V_lambda(s_t) = (1 - lambda) sum_{n=1}^{H-1} lambda^(n-1)
    V_N^n(s_t) + lambda^(H-1) V_N^H(s_t), with the paper's fixed horizon H = T (k-step returns that
    reach past the horizon are cut at it by h = min(t + k, T)). reward, value, discount: (T, B)
    tensors or arrays; bootstrap (B,). The weighted average of k-step returns, not the recursion
    the code uses. Returns a float64 tensor (T, B)."""
    reward, value, discount, bootstrap = (np.asarray(torch.as_tensor(x).detach(), np.float64)
                                          for x in (reward, value, discount, bootstrap))
    T, B = reward.shape
    out = np.zeros((T, B))
    for b in range(B):
        r, g = reward[:, b].tolist(), discount[:, b].tolist()
        v = value[:, b].tolist() + [float(bootstrap[b])]
        for t in range(T):
            out[t, b] = (1 - lambda_) * sum(lambda_ ** (n - 1) * k_step_return(r, g, v, t, n)
                                            for n in range(1, T)) \
                + lambda_ ** (T - 1) * k_step_return(r, g, v, t, T)
    return torch.tensor(out)


# --- Learning tests: the random baseline and the recorded returns ----------------------------------

def random_pendulum_return(episodes=10, seed=0):
    """Mean return of uniform random actions on Pendulum-v1 (200 env steps, action repeat 2)."""
    rng = np.random.default_rng(seed)
    returns = []
    with common.make_env("gym/Pendulum-v1", obs="state", action_repeat=2, time_limit=200,
                         seed=seed) as env:
        for i in range(episodes):
            env.reset(seed=seed + i)
            done, score = False, 0.0
            while not done:
                _, reward, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 1))
                score += reward
                done = terminated or truncated
            returns.append(score)
    return float(np.mean(returns))


def episode_returns(logdir):
    """Return of every stored training episode, oldest first (the replay files are the record)."""
    returns = []
    for path in sorted((Path(logdir) / "episodes").glob("*.npz")):
        with np.load(path, allow_pickle=False) as episode:
            returns.append(float(episode["reward"].sum()))
    return returns
