"""Details both scripts take from the official code (danijar/dreamer for V1, danijar/dreamerv2 for
V2), each checked against a reference written here: Keras' initialisers, the V2 optimiser's weight
decay, the vector-observation encoder, REINFORCE's gradient path, and V2's sequence start.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import VARIANTS, lambda_return_by_definition, module

torch.set_num_threads(1)


def small_model(variant, obs="state", obs_shape=(5,), action_size=2, discrete=False, **overrides):
    mod = module(variant)
    fields = dict(env="gym/Pendulum-v1", obs=obs, stoch_size=4, deter_size=16, hidden_size=16,
                  num_units=24, cnn_depth=8, obs_embed_size=256, imagine_horizon=3)
    if variant == "dreamer_v2":
        fields["num_categories"] = 3
    cfg = mod.DreamerConfig(**{**fields, **overrides})
    return mod.Dreamer(cfg, obs_shape, action_size, discrete)


def time_major_batch(model, T=4, B=3):
    gen = torch.Generator().manual_seed(0)
    return dict(state=torch.randn(T, B, model.obs_shape[0], generator=gen),
                action=torch.rand(T, B, model.action_size, generator=gen) * 2 - 1,
                reward=torch.randn(T, B, generator=gen), discount=torch.ones(T, B))


# =================================================================================================
# Initialisation: Keras' glorot_uniform kernels and zero biases (the official layers' defaults)
# =================================================================================================

def glorot_bound(weight: torch.Tensor, transposed: bool) -> float:
    """sqrt(6 / (fan_in + fan_out)) with Keras' fans: a dense kernel's input and output widths;
    a conv kernel's channels times its receptive field."""
    if weight.ndim == 2:
        fan_out, fan_in = weight.shape
    else:
        first, second, *kernel = weight.shape
        field = math.prod(kernel)
        fan_out, fan_in = (second * field, first * field) if transposed else \
            (first * field, second * field)
    return math.sqrt(6 / (fan_in + fan_out))


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_are_glorot_uniform_and_biases_zero(variant):
    torch.manual_seed(0)
    model = small_model(variant, obs="pixels", obs_shape=(64, 64, 3), num_units=400)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    assert len(layers) > 20
    for layer in layers:
        bound = glorot_bound(layer.weight, isinstance(layer, nn.ConvTranspose2d))
        assert layer.weight.abs().max() <= bound
        if layer.weight.numel() >= 10_000:       # uniform on [-b, b] has variance b^2 / 3
            assert layer.weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)
        assert layer.bias is None or not layer.bias.any()
    # (PyTorch's own default, bound 1 / sqrt(fan_in), fails the variance check: a 400 x 400 kernel
    # has Glorot variance 1/400 but PyTorch's 1/1200, and its biases are not zero.)


def test_v1_gru_recurrent_kernel_is_orthogonal():
    """Keras' GRU: glorot input kernel, orthogonal recurrent kernel, zero biases."""
    torch.manual_seed(0)
    cell = small_model("dreamer_v1").world_model.rssm.cell
    W = cell.weight_hh.detach().double()                     # (3 * deter, deter)
    torch.testing.assert_close(W.T @ W, torch.eye(W.shape[1], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert not cell.bias_ih.any() and not cell.bias_hh.any()
    assert cell.weight_ih.abs().max() <= glorot_bound(cell.weight_ih, False)


# =================================================================================================
# The optimiser: the official optimisers (dreamerv2 common/tfutils.py Optimizer, dreamer tools.py
# Adam) shrink every variable whose name matches the pattern '.*', so all of them, biases and
# LayerNorm's too, by (1 - wd) per step, before the Adam step
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_decay_shrinks_every_parameter_by_one_minus_wd_per_step(variant, tmp_path, tiny_fields):
    mod = module(variant)
    cfg = mod.DreamerConfig(**tiny_fields(env="gym/Pendulum-v1", obs="state", weight_decay=0.01,
                                          value_learning_rate=3e-4, logdir=str(tmp_path / "run")))
    agent = mod.DreamerAgent(cfg)
    try:
        value, opt = agent.dreamer.actor_critic.value, agent.dreamer.optimizers["value"]
        with torch.no_grad():
            for p in value.parameters():
                p.uniform_(-1, 1)
        before = {name: p.detach().clone() for name, p in value.named_parameters()}
        # A loss whose gradient is exactly zero: Adam's own step is zero, only the decay acts.
        zero_loss = 0.0 * sum(p.sum() for p in value.parameters())
        assert opt.step(zero_loss).item() is True          # the step was taken
        for name, p in value.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.01), rtol=1e-6, atol=1e-7)
    finally:
        agent.close()


# =================================================================================================
# Vector observations: four Dense + activation layers, the last one's output is the embedding
# (dreamerv2 nets.py Encoder with mlp_layers [400] * 4)
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_state_encoder_is_four_dense_layers_each_with_its_activation(variant):
    torch.manual_seed(0)
    model = small_model(variant)
    x = torch.randn(7, 5)
    h = x.double().numpy()
    wm = model.world_model
    dense = [m for m in wm.encoder.modules() if isinstance(m, nn.Linear)]
    assert len(dense) == 4
    for layer in dense:                                  # ELU after each, the last one included
        z = h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
        h = np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    out = wm.encoder(x)
    assert out.shape == (7, model.cfg.num_units)
    np.testing.assert_allclose(out.detach().double().numpy(), h, rtol=1e-5, atol=1e-6)
    # The RSSM reads that embedding.
    post, _ = wm.rssm.observe(wm.encoder(torch.randn(4, 2, 5)), torch.zeros(4, 2, 2))
    assert post["deter"].shape == (4, 2, model.cfg.deter_size)


# =================================================================================================
# REINFORCE (V2 Eq. 6 with rho = 1; V1's seed-page option): the gradient is the score function's
# only, so nothing flows back through the imagined dynamics; dynamics backprop does flow back
# =================================================================================================

def behaviour_losses(model, batch):
    """One update's forward pass, as Dreamer.update runs it: the world-model loss gives the
    posterior states, imagination starts from them, the actor-critic scores the trajectories.
    Returns (actor loss, value loss)."""
    wm, ac = model.world_model, model.actor_critic
    _, post, _ = wm.loss(batch)
    start_discount = (batch["discount"],) if type(model).__module__ == "dreamer_v2" else ()
    traj = wm.imagine(post, ac.actor, *start_discount)
    actor_loss, value_loss, _ = ac.loss(traj)
    return actor_loss, value_loss


@pytest.mark.parametrize("variant,actor_grad,reaches_dynamics", [
    ("dreamer_v1", "reinforce", False), ("dreamer_v1", "dynamics", True),
    ("dreamer_v2", "reinforce", False), ("dreamer_v2", "dynamics", True), ("dreamer_v2", "both", True)])
def test_which_actor_gradients_reach_the_dynamics(variant, actor_grad, reaches_dynamics):
    torch.manual_seed(0)
    model = small_model(variant, actor_grad=actor_grad, actor_entropy=1e-3)
    actor_loss, _ = behaviour_losses(model, time_major_batch(model))
    wm, actor = model.world_model, model.actor_critic.actor
    dynamics = list(wm.rssm.parameters()) + list(wm.reward.parameters())
    grads = torch.autograd.grad(actor_loss, dynamics + list(actor.parameters()), allow_unused=True)
    if reaches_dynamics:
        assert any(g is not None and g.any() for g in grads[:len(dynamics)])
    else:       # no path at all (not merely zeros): backward never walks the imagined rollout
        assert all(g is None for g in grads[:len(dynamics)])
    assert all(g is not None for g in grads[len(dynamics):])    # the actor always learns


@pytest.mark.parametrize("field,value,words", [
    ("actor_grad", "both", ["actor_grad", "both", "'dynamics' or 'reinforce'"]),
    ("actor_grad_mix", 0.3, ["unknown config field 'actor_grad_mix'"]),
    ("actor_dist", "trunc_normal", ["unknown config field 'actor_dist'"]),
])
def test_v1_refuses_the_v2_actor_options(field, value, words):
    """V1's actor is the paper's tanh-normal, trained by dynamics backprop or the doc page's
    REINFORCE variant; V2's mixed gradient and truncated normal are refused by name, not ignored."""
    mod = module("dreamer_v1")
    with pytest.raises(mod.ConfigError) as error:
        small_model("dreamer_v1", **{field: value})
    for word in words:
        assert word in str(error.value), (word, str(error.value))
    assert "\n" not in str(error.value)


# =================================================================================================
# V2: every training sequence starts from the zero state and no previous action (is_first)
# =================================================================================================

def test_v2_sequence_start_ignores_the_stored_first_action():
    torch.manual_seed(0)
    model = small_model("dreamer_v2")
    wm = model.world_model
    embed = wm.encoder(torch.randn(5, 3, 5)).detach()
    action = torch.rand(5, 3, 2) * 2 - 1

    def observe(actions):
        torch.manual_seed(1)                              # the same latent samples each call
        return wm.rssm.observe(embed, actions)[0]

    other_first, other_second = action.clone(), action.clone()
    other_first[0] = torch.rand(3, 2) * 2 - 1
    other_second[1] = torch.rand(3, 2) * 2 - 1
    base = observe(action)
    torch.testing.assert_close(observe(other_first)["deter"], base["deter"])
    torch.testing.assert_close(observe(torch.cat([torch.zeros_like(action[:1]), action[1:]]))["deter"],
                               base["deter"])
    assert not torch.allclose(observe(other_second)["deter"][1:], base["deter"][1:])


# =================================================================================================
# Actor and critic losses against loops written here: lambda-returns by their definition, the
# trajectory weights as running products, and the three actor gradients of V2 Eq. (6)
# =================================================================================================

def imagined_rollout(model, H=4, N=6, zero_at=None):
    """An imagined trajectory (the module's Imagined) of random features, actions, rewards and
    discounts: H imagined steps after the start state, N trajectories."""
    gen = torch.Generator().manual_seed(3)
    feat_size = model.actor_critic.value.net[0].in_features
    feat = torch.randn(H + 1, N, feat_size, generator=gen)
    action = torch.rand(H + 1, N, model.action_size, generator=gen) * 1.8 - 0.9
    reward = torch.randn(H + 1, N, generator=gen)
    discount = 0.5 + 0.5 * torch.rand(H + 1, N, generator=gen)
    if zero_at is not None:
        discount[zero_at, 0] = 0.0                    # a terminal inside one trajectory
    return module(type(model).__module__).Imagined(feat, action, reward, discount)


def losses_and_returns(model, traj, monkeypatch):
    """ActorCritic.loss(traj) -> (actor loss, value loss), and the lambda-returns it computed
    on the way (read off the module's lambda_return, which the loss calls once)."""
    mod = module(type(model).__module__)
    original, seen = mod.lambda_return, []

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(mod, "lambda_return", spy)
    actor_loss, value_loss, _ = model.actor_critic.loss(traj)
    monkeypatch.setattr(mod, "lambda_return", original)
    assert len(seen) == 1
    return actor_loss, value_loss, seen[0]


@pytest.mark.parametrize("actor_grad", ["dynamics", "reinforce", "both"])
def test_v2_actor_and_critic_losses_match_a_hand_written_reference(actor_grad, monkeypatch):
    torch.manual_seed(0)
    model = small_model("dreamer_v2", actor_grad=actor_grad, actor_entropy=3e-3, actor_grad_mix=0.3)
    ac = model.actor_critic
    with torch.no_grad():                             # a slow critic that differs from the critic
        for p in ac.slow_value.parameters():
            p.add_(0.1 * torch.randn_like(p))
    traj = imagined_rollout(model, zero_at=2)
    feat, action, reward, discount = traj.feat, traj.action, traj.reward, traj.discount
    cfg, H = model.cfg, feat.shape[0] - 1
    actor_loss, value_loss, returns = losses_and_returns(model, traj, monkeypatch)

    with torch.no_grad():
        slow = ac.slow_value(feat).squeeze(-1)                    # targets from the slow critic
        R = lambda_return_by_definition(reward[:-1], slow[:-1], discount[:-1], slow[-1],
                                        cfg.td_lambda).float()
        w = torch.ones_like(discount)                             # w_t = d_0 * ... * d_{t-1}
        for t in range(1, H + 1):
            w[t] = w[t - 1] * discount[t - 1]
        policy = ac.actor(feat[:-2])
        terms = []
        for t in range(H - 1):       # pi(. | z_t) chose a_{t+1}; the return credited is R_{t+1}
            log_prob = policy.log_prob(action[t + 1])[t]
            reinforce = log_prob * (R[t + 1] - slow[t])
            objective = {"dynamics": R[t + 1], "reinforce": reinforce,
                         "both": 0.3 * R[t + 1] + 0.7 * reinforce}[actor_grad]
            terms.append(w[t] * (objective + 3e-3 * policy.entropy()[t]))
        expected_actor = -torch.stack(terms).mean()
        critic = ac.value(feat[:-1]).squeeze(-1)                  # the start state z_0 included
        expected_value = (w[:-1] * 0.5 * (critic - R) ** 2).mean()
    torch.testing.assert_close(returns.detach(), R)
    assert w[3, 0] == 0 and w[2, 0] > 0                           # the terminal silences what follows
    torch.testing.assert_close(actor_loss.detach(), expected_actor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value_loss.detach(), expected_value, rtol=1e-5, atol=1e-6)


def test_v1_actor_and_value_losses_match_a_hand_written_reference(monkeypatch):
    """V1 Eq. (7)-(8) as the official code: the imagined states s_1..s_{H-1} are weighted by the
    discounts between them (w_1 = 1), and the value regresses onto their lambda-returns."""
    torch.manual_seed(0)
    model = small_model("dreamer_v1", actor_entropy=0.0)
    traj = imagined_rollout(model, zero_at=2)
    feat, reward, discount = traj.feat, traj.reward, traj.discount
    cfg, H = model.cfg, feat.shape[0] - 1
    actor_loss, value_loss, returns = losses_and_returns(model, traj, monkeypatch)
    with torch.no_grad():
        v = model.actor_critic.value(feat).squeeze(-1)
        R = lambda_return_by_definition(reward[:-1], v[:-1], discount[:-1], v[-1], cfg.td_lambda).float()
        w = torch.ones(H - 1, feat.shape[1])                      # for s_1 .. s_{H-1}
        for k in range(1, H - 1):
            w[k] = w[k - 1] * discount[k]
        expected_actor = -(w * R[1:]).mean()
        expected_value = (w * 0.5 * (v[1:-1] - R[1:]) ** 2).mean()
    torch.testing.assert_close(returns.detach(), R)
    torch.testing.assert_close(actor_loss.detach(), expected_actor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value_loss.detach(), expected_value, rtol=1e-5, atol=1e-6)


def test_v1_entropy_metric_without_a_bonus_is_the_tanh_normals_entropy():
    """With no bonus (the paper) the actor's entropy is only logged, estimated from one draw per
    imagined state. Its mean over the states must still be the tanh-normal's entropy, here by
    quadrature per action dimension: H[tanh u] = H[u] + E[log(1 - tanh(u)^2)], u ~ N(m, s). (A
    small initial std keeps tanh(u) off +-1 in float32, where log p(a) has to be clipped.)"""
    torch.manual_seed(0)
    model = small_model("dreamer_v1", actor_entropy=0.0, actor_init_std=0.5)
    traj = imagined_rollout(model, N=3000)
    metric = model.actor_critic.loss(traj)[2]["actor_entropy"]
    with torch.no_grad():
        normal = model.actor_critic.actor(traj.feat[:-2]).normal
        m, s = normal.mean.double()[..., None], normal.stddev.double()[..., None]
        z = torch.linspace(-9, 9, 3001, dtype=torch.float64)
        u = m + s * z
        log_sech2 = -2 * (u.abs() + torch.log1p(torch.exp(-2 * u.abs())) - math.log(2))
        expected_log_sech2 = torch.trapezoid(log_sech2 * torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi), z)
        entropy = 0.5 * torch.log(2 * math.pi * math.e * s[..., 0] ** 2) + expected_log_sech2
        expected = entropy.sum(-1).mean()
    assert metric.item() == pytest.approx(expected.item(), abs=0.05)
    assert not metric.requires_grad                     # a metric only: no graph is built for it


# =================================================================================================
# The fallback preset (gym, mujoco, ...): true terminals exist there, so the discount head is on
# (official V2 `defaults`: pred_discount True); dmc keeps it off
# =================================================================================================

@pytest.mark.parametrize("variant", VARIANTS)
def test_fallback_preset_learns_the_discount_and_dmc_does_not(variant):
    cfg = module(variant).DreamerConfig
    assert cfg(env="gym/CartPole-v1").pred_discount is True
    assert cfg(env="mujoco/Hopper-v5").pred_discount is True
    assert cfg(env="dmc/walker-walk").pred_discount is False
    assert cfg(env="gym/CartPole-v1", pred_discount=False).pred_discount is False
