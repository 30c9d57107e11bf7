"""CUDA-only checks, skipped where torch.cuda.is_available() is false; benchmarks/gpu_check.sh runs
them on a GPU machine. For V1 dmc and V2 atari at the benchmark's small sizes, one update in bf16
and one in compile mode agree with eager fp32 from the same weights, batch and torch seed, on every
loss (the construction of tests/test_benchmarks.py::test_compile_matches_eager, the tolerances of
tests/test_precision.py for bf16); and the policy step runs on CUDA with actions in [-1, 1].

Each comparison prints its largest relative difference (pytest -rA shows it), so that a run on a
GPU records how close the modes really are, not only that they are within the tolerance."""

import contextlib
import math
import tempfile

import numpy as np
import pytest
import torch
from test_benchmarks import load_benchmark
from test_precision import LOSSES

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA tests: torch.cuda.is_available() is False here (no GPU); "
           "benchmarks/gpu_check.sh runs them on a GPU machine")

PRESETS = ("v1-dmc", "v2-atari")
# compile vs eager, both fp32 on CUDA (TF32 off, see true_fp32): the same operations, fused and
# summed in another order by inductor (on CPU they agree to 5e-7 or better); 1e-3 leaves room for
# that rounding carried through the 10 recurrent steps and the 15 imagined ones, not for an error.
COMPILE_REL, COMPILE_ABS = 1e-3, 1e-5
# bf16 vs fp32 (test_precision.py's tolerances): the world-model losses within 2% (bf16 keeps 8
# bits of mantissa); the actor and value losses follow sampled imagined trajectories, so bf16 must
# move them by less than a quarter of what another torch seed moves them in fp32.
BF16_REL, BF16_SEEDS, BF16_SPREAD = 0.02, (0, 1, 2), 0.25
WORLD_MODEL_LOSSES = ("model_loss", "obs_loss", "reward_loss", "kl")
BEHAVIOUR_LOSSES = ("actor_loss", "value_loss")
assert set(WORLD_MODEL_LOSSES + BEHAVIOUR_LOSSES) == set(LOSSES)


@contextlib.contextmanager
def agent_in(preset: str, mode: str, device: str):
    """A real agent of the benchmark's `preset` in `mode` on `device`, seeded like every other
    (same weights whatever the mode), with the benchmark's synthetic replay; closed afterwards."""
    bench = load_benchmark()
    with tempfile.TemporaryDirectory(prefix="cuda-test-") as logdir:
        agent, note = bench.build_agent(preset, mode, True, device, logdir)
        try:
            if note:
                print(f"{preset}: {note}")
            bench.fill_replay(agent)
            yield agent, bench
        finally:
            agent.close()


def one_update(preset: str, mode: str, seed: int, device: str) -> dict:
    """The metrics of one update from the construction's weights, on one batch of the replay, with
    torch seeded with `seed` just before it (test_compile_matches_eager's construction). Inductor
    draws its own random numbers unless `fallback_random`, so that is on for every mode."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True), agent_in(preset, mode, device) as (agent, bench):
        assert agent.cfg.compile == ("compile" in mode)
        assert agent.cfg.precision == (16 if "bf16" in mode else 32), "bf16 must really run here"
        batch = bench.to_device(agent, agent.replay.sample(agent.cfg.batch_size))
        assert batch["action"].device.type == torch.device(device).type
        torch.manual_seed(seed)
        metrics = agent.dreamer.update(batch)
        params = list(agent.dreamer.parameters())
        assert params and all(p.dtype == torch.float32 and p.device.type == batch["action"].device.type
                              for p in params), "parameters must stay fp32 on the device"
        state = [t for opt in agent.dreamer.optimizers.values() for s in opt.opt.state.values()
                 for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
        assert state and all(t.dtype == torch.float32 for t in state), "optimiser state must stay fp32"
    return metrics


@contextlib.contextmanager
def true_fp32():
    """No TF32 in the matrix products and convolutions (cuDNN's convolutions default to TF32):
    inductor may lay a convolution out differently, and cuDNN then pick another algorithm; in true
    fp32 two algorithms differ only by their order of summation."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_compile(preset: str, device: str = "cuda") -> dict:
    """compile vs eager fp32 (no TF32), one update, seed 123: every loss within COMPILE_REL /
    COMPILE_ABS. Returns {loss: relative difference}."""
    with true_fp32():
        eager = one_update(preset, "eager", 123, device)
        compiled = one_update(preset, "compile", 123, device)
    assert eager["finite"] == compiled["finite"] == 1.0
    diffs = {key: relative(compiled[key], eager[key]) for key in LOSSES}
    print(f"{preset} compile vs eager on {device}: relative difference per loss "
          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    for key in LOSSES:
        assert math.isfinite(compiled[key]), key
        assert compiled[key] == pytest.approx(eager[key], rel=COMPILE_REL, abs=COMPILE_ABS), \
            (key, compiled[key], eager[key], diffs[key])
    return diffs


def check_bf16(preset: str, device: str = "cuda") -> dict:
    """bf16 vs eager fp32, one update for each seed of BF16_SEEDS: test_precision.py's criteria.
    Returns {loss: relative difference (world model) or worst difference / fp32 seed spread}."""
    runs = {mode: [one_update(preset, mode, seed, device) for seed in BF16_SEEDS] for mode in ("eager", "bf16")}
    assert all(m["finite"] == 1.0 for ms in runs.values() for m in ms)
    result = {}
    for key in WORLD_MODEL_LOSSES:
        result[key] = max(relative(b[key], f[key]) for f, b in zip(runs["eager"], runs["bf16"]))
    for key in BEHAVIOUR_LOSSES:
        seeds = [r[key] for r in runs["eager"]]
        spread = max(seeds) - min(seeds)
        worst = max(abs(b[key] - f[key]) for f, b in zip(runs["eager"], runs["bf16"]))
        assert spread > 0, (key, seeds)
        result[key] = worst / spread
    print(f"{preset} bf16 vs fp32 on {device}: max relative difference "
          + ", ".join(f"{k} {result[k]:.1e}" for k in WORLD_MODEL_LOSSES)
          + "; worst difference / fp32 seed spread " + ", ".join(f"{k} {result[k]:.2f}" for k in BEHAVIOUR_LOSSES))
    for key in WORLD_MODEL_LOSSES:
        assert result[key] < BF16_REL, (key, result[key], [(f[key], b[key]) for f, b in zip(*runs.values())])
    for key in BEHAVIOUR_LOSSES:
        assert result[key] < BF16_SPREAD, (key, result[key], [(f[key], b[key]) for f, b in zip(*runs.values())])
    return result


def check_policy(preset: str, mode: str, device: str = "cuda", steps: int = 5) -> None:
    """Dreamer.policy_step on the device (under the agent's autocast, as DreamerAgent.act calls it)
    and DreamerAgent.act, exploring and not, the latent state carried over `steps` steps: actions
    of shape (1, A) on the device, finite, in [-1, 1] (one-hot for discrete actions)."""
    with agent_in(preset, mode, device) as (agent, _):
        d, key = agent.dreamer, agent.dreamer.world_model.obs_key
        rng = np.random.default_rng(0)
        for explore in (True, False):
            state, act_state = None, None
            for _ in range(steps):
                obs = rng.integers(0, 256, (1, *d.obs_shape)).astype(np.uint8 if key == "image" else np.float32)
                x = torch.as_tensor(obs, device=agent.device)
                with d.autocast():
                    action, state = d.policy_step(x, state, explore)
                assert action.device.type == torch.device(device).type and action.shape == (1, d.action_size)
                action = action.float()
                assert torch.isfinite(action).all() and action.abs().max() <= 1, action
                if d.discrete:
                    assert torch.equal(action.sum(-1), torch.ones(1, device=action.device)), action
                numpy_action, act_state = agent.act({key: obs[0]}, act_state, explore)
                assert numpy_action.shape == (d.action_size,) and np.isfinite(numpy_action).all()
                assert np.abs(numpy_action).max() <= 1, numpy_action


@pytest.mark.parametrize("preset", PRESETS + ("v2-dmc",))
def test_policy_step_on_cuda_gives_actions_in_range(preset):
    for mode in ("eager", "bf16"):
        check_policy(preset, mode)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_update_agrees_with_fp32(preset):
    check_bf16(preset)


@pytest.mark.parametrize("preset", PRESETS)
def test_compile_update_agrees_with_eager(preset):
    check_compile(preset)
