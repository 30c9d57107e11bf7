"""The scripts as a user meets them: the flagship commands at the papers' full sizes, the console's
progress bar, the original documentation page's API (summary, from_config), optional logging back-ends, Ctrl-C
outside the training loop, exploration noise, discrete actions in V1, and V2's options
(LayerNorm, SiLU, two-hot reward head, life-loss discount) in real short runs.
"""

import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import helpers
from helpers import VARIANTS, module, one_error_line, read_jsonl, run_main, to_cli

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def tiny(variant, **overrides) -> dict:
    """helpers.tiny, shortened to 200 env steps (two episodes) with only the final checkpoint."""
    return helpers.tiny(variant, **{"total_steps": 200, "checkpoint_interval": 10**6, **overrides})


def finite_losses(run, keys=("model_loss", "actor_loss", "value_loss")):
    records = read_jsonl(run / "metrics.jsonl")
    for key in keys:
        values = [r[key] for r in records if key in r]
        assert values and all(math.isfinite(v) for v in values), (key, values)
    return records


# =================================================================================================
# The flagship commands at the official sizes: only the step counts are shortened, to one update
# =================================================================================================

@pytest.mark.parametrize("variant,env,args", [
    ("dreamer_v2", "atari/Pong", ["--time_limit", 400, "--seed_steps", 400, "--total_steps", 404]),
    ("dreamer_v1", "dmc/walker-walk", ["--time_limit", 200, "--seed_steps", 200, "--total_steps", 202]),
])
def test_flagship_command_runs_one_update_at_the_official_sizes(variant, env, args, tmp_path, capsys):
    """`python dreamer_v2.py --env atari/Pong` and `python dreamer_v1.py --env dmc/walker-walk`:
    the papers' networks and batches (V2 Atari: deter 600, 32 x 32 latents, depth 48, batch
    16 x 50; V1: deter 200, depth 32, batch 50 x 50), one pretraining update on CPU once the
    first (time-limited) episode is in replay, one agent step into the second."""
    run = tmp_path / "run"
    rc, out, err = run_main(variant, ["--env", env, *args, "--pretrain_steps", 1, "--device", "cpu",
                                      "--logdir", run, "--eval_every", 10**6, "--video", "false"],
                            capsys)
    assert rc == 0, err[-2000:]
    cfg = module(variant).DreamerConfig.from_yaml(run / "config.yaml")
    if variant == "dreamer_v2":
        assert (cfg.deter_size, cfg.stoch_size, cfg.num_categories, cfg.cnn_depth) == (600, 32, 32, 48)
        assert (cfg.batch_size, cfg.train_seq_len, cfg.grayscale) == (16, 50, True)
    else:
        assert (cfg.deter_size, cfg.stoch_size, cfg.cnn_depth, cfg.batch_size) == (200, 30, 32, 50)
    ckpt = module(variant).load_torch(sorted((run / "ckpts").glob("ckpt-*.pt"))[-1])
    assert ckpt["counters"]["updates"] == 1
    finite_losses(run)


# =================================================================================================
# The console: a progress bar with the percentage, and the time left from measured times
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_progress_bar(variant):
    """The bar, the percentage and the step count with thousands separators; nothing else."""
    progress_bar = module(variant).progress_bar
    assert progress_bar(5000, 20000) == "[#####---------------]  25%       5,000/20,000"
    assert progress_bar(1000, 100_000) == "[--------------------]   1%       1,000/100,000"
    assert progress_bar(1_234_567, 5_000_000) == "[#####---------------]  25%   1,234,567/5,000,000"
    assert progress_bar(0, 300) == "[--------------------]   0%           0/300"
    assert progress_bar(300, 300) == "[####################] 100%         300/300"
    assert progress_bar(350, 300) == "[####################] 100%         350/300"   # bar clamped
    assert progress_bar(1, 4, width=4) == "[#---]  25%           1/4"


@pytest.mark.parametrize("variant", VARIANTS)
def test_console_eta_from_measured_times(variant, tmp_path, monkeypatch):
    """Console.eta by hand: the time per env step measured in the current phase without the
    update time, times the env steps left, plus the updates still to come (owed, pretraining,
    and train_steps per train_every of the steps after max(step, seed_steps)) times the running
    average update time (first measurement, then 0.9 old + 0.1 new)."""
    mod = module(variant)
    agent = mod.DreamerAgent(mod.DreamerConfig(**tiny(
        variant, logdir=str(tmp_path / "run"), total_steps=20_000, seed_steps=1000, train_every=100,
        train_steps=2, pretrain_steps=10)))
    try:
        console = agent.console
        monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: 1000.0))

        # Prefill, nothing measured: 10 + (20,000 - 1,000) // 100 * 2 = 390 updates to come.
        agent.step, agent.pretrained, agent.pending_updates = 500, False, 0
        console.phase_start, console.updating, console.update_time = (900.0, 0), 0.0, None
        assert console.eta(agent) == "eta after the first update"

        # The update time: the first measurement, then an exponential average; `updating` sums them.
        console.update_seconds(1.0)
        console.update_seconds(2.0)
        assert console.update_time == pytest.approx(1.1) and console.updating == pytest.approx(3.0)

        # Training: 1,000 env steps in 60 s of which 10 s were updates: 0.05 s per step; 3 owed +
        # 15,000 // 100 * 2 = 303 updates at 0.5 s: 15,000 * 0.05 + 303 * 0.5 = 901.5 s.
        agent.step, agent.pretrained, agent.pending_updates = 5000, True, 3
        console.phase_start, console.updating, console.update_time = (940.0, 4000), 10.0, 0.5
        assert console.eta(agent) == "eta 0:15:01 (303 updates to go)"

        # Pretraining owed: 100 steps in 10 s, 0.1 s per step; 10 + 19,000 // 100 * 2 = 390 updates
        # at 0.2 s: 19,000 * 0.1 + 390 * 0.2 = 1,978 s.
        agent.step, agent.pending_updates = 1000, 10
        console.phase_start, console.updating, console.update_time = (990.0, 900), 0.0, 0.2
        assert console.eta(agent) == "eta 0:32:58 (390 updates to go)"

        # Done: nothing left, whatever was measured.
        agent.step, agent.pending_updates = 20_000, 0
        console.update_time = None
        assert console.eta(agent) == "eta 0:00:00 (0 updates to go)"

        # Hours and thousands: 4,000,000 steps at 600 s / 1,000,000 and 400,000 updates at 0.05 s:
        # 2,400 + 20,000 = 22,400 s.
        agent.cfg.total_steps, agent.cfg.train_every, agent.cfg.train_steps = 5_000_000, 10, 1
        agent.step, agent.pending_updates = 1_000_000, 0
        console.phase_start, console.updating, console.update_time = (0.0, 0), 400.0, 0.05
        assert console.eta(agent) == "eta 6:13:20 (400,000 updates to go)"
    finally:
        agent.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_console_lines_carry_the_progress_bar(variant, tmp_path, capsys):
    """A line at each metrics write (env steps 100, 150, 200; at 50 there is nothing to write),
    each the progress bar, the ETA and the shown metrics, with a `phase:` line where the phase
    changes. The first update comes only once the first episode is in replay, after step 100."""
    rc, out, err = run_main(variant, to_cli(tiny(variant, logdir=tmp_path / "run")), capsys)
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith(("[", "phase: "))]
    assert len(lines) == 6, out
    assert lines[0] == "phase: prefill, random actions until env step 100"
    assert lines[1] == "phase: pretraining, 2 updates on the prefill"
    assert lines[2].startswith("[##########----------]  50%         100/200 eta after the first update "
                               "train_return ")
    assert lines[3] == "phase: training, 2 update(s) every 50 env steps"
    assert re.match(r"\[###############-----\]  75%         150/200 eta \d:\d\d:\d\d \(2 updates to go\) "
                    r"model_loss ", lines[4]), lines[4]
    assert lines[5].startswith("[####################] 100%         200/200 eta 0:00:00 (0 updates to go) "
                               "train_return ")
    # fps counts env steps from the start of the run, so its first line already has a rate
    assert [float(re.search(r" fps (\S+)", lines[i]).group(1)) > 0 for i in (2, 5)] == [True, True], out


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_phase_is_announced_after_the_last_step(variant, tmp_path, capsys):
    """An evaluation at the last env step is the run's last phase: no `phase: training` after it."""
    rc, out, err = run_main(variant, to_cli(tiny(variant, logdir=tmp_path / "run", eval_every=200)), capsys)
    assert rc == 0, err
    phases = [line for line in out.splitlines() if line.startswith("phase: ")]
    assert phases[-1] == "phase: evaluating" and phases.count("phase: evaluating") == 1, phases


# =================================================================================================
# The original documentation page's API: summary() and parameter_count(), from_config(..., seed=)
# =================================================================================================

def dense(i, o):
    return i * o + o


def test_v1_parameter_count_by_hand():
    """V1 on a 3-d state with 1-d actions; units 8, deter 6, hidden 5, stoch 4 (feat 10)."""
    mod = module("dreamer_v1")
    cfg = mod.DreamerConfig(env="gym/Pendulum-v1", obs="state", num_units=8, deter_size=6,
                            hidden_size=5, stoch_size=4)
    model = mod.Dreamer(cfg, (3,), 1, False)
    gru = 3 * 6 * 5 + 3 * 6 * 6 + 2 * 3 * 6                 # input and recurrent kernels, 2 biases
    expected = dict(
        encoder=dense(3, 8) + 3 * dense(8, 8),                # 4 layers, the last is the embedding
        rssm=dense(4 + 1, 5) + gru + dense(6, 5) + dense(5, 8) + dense(6 + 8, 5) + dense(5, 8),
        decoder=dense(10, 8) + 3 * dense(8, 8) + dense(8, 3),
        reward=dense(10, 8) + dense(8, 8) + dense(8, 1),
        discount=dense(10, 8) + 2 * dense(8, 8) + dense(8, 1),   # on in the gym preset
        actor=dense(10, 8) + 3 * dense(8, 8) + dense(8, 2),    # mean and std
        value=dense(10, 8) + 2 * dense(8, 8) + dense(8, 1))
    summary = model.summary()
    assert summary["parameters"] == expected
    assert summary["total_parameters"] == model.parameter_count() == sum(expected.values())


def test_v2_parameter_count_leaves_out_the_slow_critic():
    mod = module("dreamer_v2")
    cfg = mod.DreamerConfig(env="gym/Pendulum-v1", obs="state", num_units=8, deter_size=6,
                            hidden_size=5, stoch_size=4, num_categories=3)
    model = mod.Dreamer(cfg, (3,), 1, False)
    summary = model.summary()
    # the layer-normed GRU: one Dense on [x, h] to 3 * deter, and LayerNorm's gain and bias
    assert summary["parameters"]["rssm"] == (dense(12 + 1, 5) + dense(5 + 6, 18) + 2 * 18 + dense(6, 5)
                                             + dense(5, 12) + dense(6 + 8, 5) + dense(5, 12))
    assert summary["parameters"]["value"] == dense(18, 8) + 3 * dense(8, 8) + dense(8, 1)
    assert summary["total_parameters"] == sum(summary["parameters"].values())
    slow = sum(p.numel() for p in model.actor_critic.slow_value.parameters())
    assert sum(p.numel() for p in model.parameters()) == summary["total_parameters"] + slow


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_config_with_a_seed(variant, tmp_path):
    mod = module(variant)
    mod.DreamerConfig(**tiny(variant, logdir=str(tmp_path / "run"))).to_yaml(tmp_path / "cfg.yaml")
    agent = mod.DreamerAgent.from_config(tmp_path / "cfg.yaml", seed=7, batch_size=5)
    try:
        assert (agent.cfg.seed, agent.cfg.batch_size, agent.cfg.num_units) == (7, 5, 32)
        assert not (tmp_path / "run").exists()                  # nothing is written before train()
        assert agent.summary()["total_parameters"] == agent.dreamer.parameter_count()
    finally:
        agent.close()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("flag,package", [("tensorboard", "tensorboard"), ("enable_wandb", "wandb")])
def test_missing_logging_package_is_a_clear_error(variant, flag, package, tmp_path, capsys):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; the error is for machines without it")
    rc, _, err = run_main(variant, to_cli(tiny(variant, logdir=tmp_path / "run", **{flag: True})),
                          capsys)
    assert rc == 2
    line = one_error_line(err)
    assert f"'{flag}'" in line and f"pip install {package}" in line


# =================================================================================================
# Ctrl-C outside the training loop (while a resumed run loads its replay, say): one line, no trace
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_ctrl_c_during_set_up_is_one_line(variant, tmp_path, capsys, monkeypatch):
    mod = module(variant)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt                      # what SIGINT raises outside the loop

    monkeypatch.setattr(mod.ReplayBuffer, "__init__", interrupted)
    rc, _, err = run_main(variant, to_cli(tiny(variant, logdir=tmp_path / "run")), capsys)
    assert rc == 130
    assert "interrupted" in one_error_line(err)
    assert not (tmp_path / "run").exists()                      # nothing was written


# =================================================================================================
# The command line keeps freed memory in the process (glibc): big blocks come from the heap
# =================================================================================================

HEAP_PROBE = """
import ctypes, json, sys
sys.path.insert(0, ".")
import {variant} as mod
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]

def heap():                                           # the [heap] mapping's (start, end), from the kernel
    line = next((line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]")), "0-0")
    return tuple(int(x, 16) for x in line.split()[0].split("-"))

made = mod.keep_freed_memory() if {call} else None
block = libc.malloc(60 * 2**20)                       # V1's imagined-trajectory layer output: 60 MB
start, end = heap()
libc.free(block)
print(json.dumps(dict(made=made, in_heap=start <= block < end, heap_kept=heap()[1] >= end)))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
@pytest.mark.parametrize("variant", VARIANTS)
def test_keep_freed_memory_serves_big_blocks_from_the_heap(variant):
    """Checked against the kernel's map of the process, in a fresh process each (the setting is
    process-wide): by glibc's default a 60 MB block is a mapping of its own, outside the heap;
    after keep_freed_memory() it comes from the heap, which keeps its size when the block is
    freed. With a MALLOC_* variable or GLIBC_TUNABLES (even empty) set by the user, glibc is
    left as it is."""
    def probe(call, **env):
        code = HEAP_PROBE.format(variant=variant, call=call)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(environ, **env),
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out.splitlines()[-1])

    assert probe(False) == dict(made=None, in_heap=False, heap_kept=True)     # glibc's default
    assert probe(True) == dict(made=True, in_heap=True, heap_kept=True)
    assert probe(True, MALLOC_ARENA_MAX="2") == dict(made=False, in_heap=False, heap_kept=True)
    assert probe(True, GLIBC_TUNABLES="") == dict(made=False, in_heap=False, heap_kept=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_command_line_keeps_freed_memory_before_building(variant, tmp_path, capsys, monkeypatch):
    mod, calls = module(variant), []

    def build_agent(*args, **kwargs):
        calls.append("agent")
        raise KeyboardInterrupt                      # stop here: the order is all this test needs

    monkeypatch.setattr(mod, "keep_freed_memory", lambda: calls.append("allocator"))
    monkeypatch.setattr(mod.DreamerAgent, "__init__", build_agent)
    rc, _, _ = run_main(variant, to_cli(tiny(variant, logdir=tmp_path / "run")), capsys)
    assert rc == 130 and calls == ["allocator", "agent"]


# =================================================================================================
# Exploration (V1): additive Gaussian noise N(0, 0.3) clipped to [-1, 1]; epsilon-greedy for
# one-hot actions, where a random action keeps the greedy one with probability 1 / n
# =================================================================================================

def test_v1_exploration_noise_has_the_configured_distribution():
    mod = module("dreamer_v1")
    torch.manual_seed(0)
    cfg = mod.DreamerConfig(env="gym/Pendulum-v1", obs="state", num_units=8)
    noisy = mod.Dreamer(cfg, (3,), 2, False).explore(torch.zeros(50_000, 2))
    assert noisy.mean().item() == pytest.approx(0.0, abs=0.005)
    assert noisy.std().item() == pytest.approx(0.3, rel=0.02)
    near_edge = mod.Dreamer(cfg, (3,), 2, False).explore(torch.full((50_000, 2), 0.9))
    assert near_edge.max().item() == 1.0                       # clipped, not wrapped or rescaled
    # P(0.9 + N(0, 0.3) > 1) = P(Z > 1/3) = 0.3694
    assert (near_edge == 1.0).float().mean().item() == pytest.approx(0.3694, abs=0.01)

    cfg = mod.DreamerConfig(env="atari/Pong", obs="state", num_units=8, action_noise=0.4)
    greedy = torch.zeros(60_000, 6)
    greedy[:, 2] = 1
    picked = mod.Dreamer(cfg, (3,), 6, True).explore(greedy)
    assert torch.equal(picked.sum(-1), torch.ones(60_000))     # still one-hot
    assert (picked.argmax(-1) != 2).float().mean().item() == pytest.approx(0.4 * 5 / 6, abs=0.01)


# =================================================================================================
# Real short runs: V1 with discrete actions on Pong; V2 with its optional networks and reward head
# =================================================================================================

def test_v1_trains_on_pong_with_one_hot_actions(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main("dreamer_v1", to_cli(tiny("dreamer_v1", env="atari/Pong", obs="pixels",
                                                    cnn_depth=8, obs_embed_size=256, time_limit=200,
                                                    total_steps=400, train_every=100,
                                                    logdir=run)), capsys)
    assert rc == 0, err
    finite_losses(run, ("model_loss", "actor_loss", "value_loss", "discount_loss"))
    with np.load(sorted((run / "episodes").glob("*.npz"))[-1], allow_pickle=False) as episode:
        actions = episode["action"][1:]
    assert actions.shape[1] == 6 and np.array_equal(actions.sum(-1), np.ones(len(actions)))


def test_v2_options_layer_norm_silu_and_two_hot_reward_train(tmp_path, capsys):
    mod, run = module("dreamer_v2"), tmp_path / "run"
    rc, _, err = run_main("dreamer_v2", to_cli(tiny("dreamer_v2", norm="layer", act="silu",
                                                    reward_head="twohot", logdir=run)), capsys)
    assert rc == 0, err
    finite_losses(run, ("model_loss", "reward_loss", "actor_loss", "value_loss"))
    model = mod.Dreamer.from_pretrained(run / "ckpts")
    kinds = {type(m) for m in model.modules()}
    assert nn.SiLU in kinds and nn.ELU not in kinds
    reward = model.world_model.reward
    assert any(isinstance(m, nn.LayerNorm) for m in reward.modules())          # MLPs normed
    assert reward.net[-1].out_features == 255                                   # two-hot bins


@pytest.mark.parametrize("life_loss_discount", [True, False])
def test_v2_life_loss_discount_marks_every_lost_life(life_loss_discount, tmp_path, capsys):
    """Breakout starts with 5 lives; random play loses them all within a few hundred steps. With
    the option every lost life stores discount 0 (the last one is the game's end); without it
    only the true end does. (Random games measured 130-300 agent steps; 4,000 frames are 1,000.)"""
    run = tmp_path / "run"
    rc, _, err = run_main("dreamer_v2", to_cli(tiny(
        "dreamer_v2", env="atari/Breakout", obs="pixels", time_limit=20_000, seed_steps=4000,
        total_steps=4000, scalar_freq=10**6, life_loss_discount=life_loss_discount,
        logdir=run)), capsys)
    assert rc == 0, err
    first = sorted((run / "episodes").glob("*.npz"))[0]
    with np.load(first, allow_pickle=False) as episode:
        discount = episode["discount"]
    assert discount[-1] == 0                                  # the game ended: all lives lost
    assert int((discount == 0).sum()) == (5 if life_loss_discount else 1)
