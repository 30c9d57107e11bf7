"""DreamerV2 in one file: "Mastering Atari with Discrete World Models".
Hafner, Lillicrap, Norouzi, Ba. ICLR 2021. arXiv:2010.02193.

The idea. DreamerV2 keeps DreamerV1's recipe (dreamer_v1.py): learn a world model from replayed
experience, then learn behaviour purely inside the model's imagination. It changes the world model
and the actor so that the recipe reaches human-level Atari: the stochastic state is 32 categorical
variables of 32 classes each, trained with straight-through gradients; the KL term is balanced so
that the prior learns faster than the posterior is regularised; a discount head predicts episode
ends; the GRU is layer-normed; the actor learns by REINFORCE on discrete actions and the critic
against a slow copy of itself. Every line that differs from dreamer_v1.py says `# V2:`.

Run:
    python dreamer_v2.py --env atari/Pong --device cuda
    python dreamer_v2.py --env dmc/cartpole-balance --obs state     # learns on a laptop CPU
    python dreamer_v2.py --resume runs/<run>                         # continue a stopped run
    python dreamer_v2.py --eval_only runs/<run>                      # evaluate its latest checkpoint

Map of the file, in the paper's order:
    1. Config ............ DreamerConfig and its presets
    2. Distributions ..... the actor's and the latent state's distributions
    3. Networks .......... ConvEncoder, ConvDecoder, MLP, Actor
    4. RSSM .............. the recurrent state-space model
    5. WorldModel ........ its loss, imagination, open-loop prediction
    6. ActorCritic ....... lambda-returns, the actor and critic losses
    7. Replay ............ whole episodes on disk, sequences of 50 steps
    8. Dreamer, DreamerAgent: the update and the training loop
    9. Running it ........ config files, CLI, checkpoints, signals, logging, plots (stop reading here)

The paper's equations (arXiv v4) and where they are computed:
    Sec. 2.1 world model learning .............................................. WorldModel
    Sec. 2.2 behaviour learning (the actor-critic) ............................. ActorCritic
    Eq. (1)  RSSM: recurrent model, representation model, transition predictor . RSSM.img_step / obs_step
             image, reward and discount predictors ............................. WorldModel heads
    Eq. (2)  world-model loss .................................................. WorldModel.loss
    Alg. 1   straight-through gradients ........................................ straight_through_sample
    Alg. 2   KL balancing ...................................................... kl_loss
    Eq. (3)  actor and critic .................................................. Actor, ActorCritic.value
    Eq. (4)  lambda-target V^lambda ............................................ lambda_return
    Eq. (5)  critic loss ....................................................... ActorCritic.loss
    Eq. (6)  actor loss: REINFORCE, dynamics backprop, entropy ................. ActorCritic.loss
    The actor-critic's comments write s_t for the model state (h_t, z_t) that it reads.

Tensors inside the model are time-major, (T, B, ...); replay hands out (B, T, ...) and the update
transposes once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import difflib
import functools
import inspect
import io
import json
import math
import os
import platform
import random
import re
import signal
import sys
import time
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import common

ALGO = "Dreamerv2"                                 # V2: this file's variant
# A NaN/Inf inside a forward pass must reach the loss, where the optimiser step is skipped and
# counted; torch's argument validation of distributions would raise (and end the run) instead.
torch.distributions.Distribution.set_default_validate_args(False)


# =================================================================================================
# 1. Config. The official defaults (danijar/dreamerv2 configs.yaml): `dmc` in the field defaults,
#    `atari` in PRESETS. Step counts are environment steps (frames after action repeat), as the
#    paper's plots are; the official V2 code counts agent steps, so these are converted.
# =================================================================================================

@dataclass(init=False)
class DreamerConfig:
    # --- Environment
    env: str = "dmc/walker-walk"       # backend/task: dmc/walker-walk, atari/Pong, gym/Pendulum-v1, ...
    env_backend: str = ""              # the backend when env names only the task (env: Pong)
    obs: str = "pixels"                # pixels (64x64 images) or state (vector observations)
    action_repeat: int = 2             # env steps per agent step (atari 4, gym/mujoco 1)
    time_limit: int = 1000             # episode length in env steps (atari 108000; 0: the env's own)
    grayscale: bool = False            # one-channel images (atari: true)
    fast_render: bool = False          # dmc: no shadows or reflections; fast on CPU, not the paper look
    seed: int = 0                      # seeds torch, numpy, python and the environments
    device: str = "auto"               # cpu, cuda, cuda:N or auto
    logdir: str = ""                   # run directory; empty: runs/<algo>-<env>-<seed>-<time>
    # --- World model (Sec. 2.1)
    stoch_size: int = 32               # V2: classes of each categorical latent
    num_categories: int = 32           # V2: categorical latents; z_t is 32 one-hots of 32 classes
    deter_size: int = 200              # GRU state h_t (atari 600)
    hidden_size: int = 200             # RSSM hidden layers (atari 600)
    obs_embed_size: int = 1536         # V2: conv output at depth 48; another size adds a projection
    cnn_depth: int = 48                # V2: channels of the first conv layer
    num_units: int = 400               # width of every MLP
    act: str = "elu"                   # activation: elu, relu, silu (the doc page's) or tanh
    norm: str = "none"                 # V2: LayerNorm in the MLPs: none (official) or layer
    kl_loss_coeff: float = 1.0         # beta in Eq. (2) (atari 0.1)
    kl_alpha: float = 0.8              # V2: KL balancing, the prior's share of the gradient (Alg. 2)
    free_nats: float = 1.0             # V2: KL below this is not penalised (atari 0)
    free_avg: bool = True              # V2: free nats on the batch-mean KL (false: per step)
    pred_discount: bool = False        # V2: learn the discount head (atari, gym, mujoco: true)
    discount_scale: float = 5.0        # V2: weight of the discount log-likelihood
    reward_head: str = "mse"           # V2: mse (the paper's Gaussian) or twohot (DreamerV3, the doc page's)
    twohot_bins: int = 255             # bins of the two-hot head, uniform on [-20, 20] in symlog space
    clip_rewards: str = "identity"     # V2: identity or tanh (atari) for the world model's targets
    life_loss_discount: bool = False   # V2 option: a lost Atari life gives discount 0 in replay
    model_learning_rate: float = 3e-4  # V2: world-model Adam (atari 2e-4)
    # --- Behaviour learning (Sec. 2.2)
    imagine_horizon: int = 15          # H, imagined steps from every posterior state
    discount: float = 0.99             # gamma (atari 0.999)
    td_lambda: float = 0.95            # lambda of the lambda-target, Eq. (4)
    actor_learning_rate: float = 8e-5  # atari 4e-5
    value_learning_rate: float = 8e-5  # atari 1e-4
    actor_grad: str = "auto"           # V2: auto (reinforce if discrete, else dynamics), dynamics, reinforce, both
    actor_grad_mix: float = 0.1        # V2: with both, the dynamics gradient's weight 1 - rho in Eq. (6)
    actor_entropy: float = 1e-4        # V2: entropy bonus eta in Eq. (6) (atari 1e-3)
    actor_dist: str = "trunc_normal"   # V2: continuous actions: trunc_normal or tanh_normal (V1's)
    actor_init_std: float = 5.0        # tanh_normal: std = softplus(x + softplus^-1(5)) + min_std
    actor_min_std: float = 0.1         # V2: trunc_normal std = 2 sigmoid(x / 2) + min_std
    actor_mean_scale: float = 5.0      # tanh_normal: mean = scale * tanh(x / scale)
    action_noise: float = 0.0          # V2: no extra noise; the actor's own samples explore
    slow_target_update: int = 100      # V2: updates between copies of the critic to its slow target
    # --- Training loop
    batch_size: int = 16               # V2: sequences per batch (the paper's table says 50)
    train_seq_len: int = 50            # steps per sequence
    grad_clip: float = 100.0           # global gradient-norm clip of each optimiser
    adam_eps: float = 1e-5             # V2: Adam epsilon
    weight_decay: float = 1e-6         # V2: decoupled; each parameter shrinks by (1 - wd) per update
    seed_steps: int = 2000             # random-action prefill in env steps (atari 200000)
    train_every: int = 10              # V2: env steps between training phases (atari 64)
    train_steps: int = 1               # gradient updates per training phase
    pretrain_steps: int = 100          # updates right after the prefill (atari 1)
    total_steps: int = 5_000_000       # env steps of the whole run
    replay_capacity: int = 2_000_000   # agent steps kept in replay; the oldest episodes are deleted
    prioritize_ends: bool = False      # V2: start more sequences near episode ends (atari: true)
    # --- Evaluation, logging and checkpoints
    eval_every: int = 10_000           # env steps between evaluations
    eval_episodes: int = 1             # episodes per evaluation, with the actor's mode
    scalar_freq: int = 1000            # env steps between lines of metrics.jsonl
    checkpoint_interval: int = 10_000  # env steps between checkpoints
    keep_checkpoints: int = 3          # latest checkpoints kept, besides the best evaluation's weights
    video: bool = True                 # open-loop prediction GIF at each evaluation (pixels)
    video_scale: int = 1               # the GIF's pixel scale (2 or 3 for slides)
    tensorboard: bool = False          # also log to TensorBoard (pip install tensorboard)
    enable_wandb: bool = False         # also log to Weights & Biases (pip install wandb)
    max_nonfinite_updates: int = 20    # consecutive NaN/Inf updates before training stops
    # --- Speed: the same code, executed differently
    precision: int = 16                # 16 = bf16 autocast where native and faster, else 32
    compile: bool = False              # torch.compile each network and the RSSM's step functions

    def __init__(self, **given):
        """The paper's defaults, then the backend's preset, then `given`: the fields read are the
        fields that run (DreamerConfig(env="atari/Pong").action_repeat is 4)."""
        given = {ALIASES.get(k, k): v for k, v in given.items()}
        algo = given.pop("algo", ALGO)             # not a field: checked first, V1 has other fields
        if str(algo).lower() != ALGO.lower():
            raise other_algo(algo)
        for name in given:
            if name not in FIELDS:
                raise ConfigError(unknown_field(name))
        for f in fields(self):
            setattr(self, f.name, f.default)
        backend = backend_of(given.get("env", self.env), given.get("env_backend", ""))
        for name, value in {**PRESETS.get(backend, PRESETS["default"]), **given}.items():
            setattr(self, name, check_type(name, value))
        self.validate()

    @property
    def env_name(self) -> str:
        """The canonical backend/task name."""
        return self.env if "/" in self.env or not self.env_backend else f"{self.env_backend}/{self.env}"

    @property
    def backend(self) -> str:
        return backend_of(self.env, self.env_backend)

    def validate(self) -> "DreamerConfig":
        if not self.backend:
            raise ConfigError(f"config field 'env' is {self.env!r}; allowed: backend/task such as "
                              f"'dmc/walker-walk' or 'atari/Pong' (or set env_backend)")
        for name, (check, allowed) in CHECKS.items():
            if not check(getattr(self, name)):
                raise ConfigError(f"config field '{name}' has value {getattr(self, name)!r}; allowed: {allowed}")
        if self.seed_steps < self.train_seq_len:
            raise ConfigError(f"config field 'seed_steps' is {self.seed_steps}; allowed: at least "
                              f"train_seq_len ({self.train_seq_len}) so replay can give a sequence")
        return self

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_yaml(self, path) -> None:
        text = yaml.safe_dump({"algo": ALGO, **self.to_dict()}, sort_keys=False)
        atomic_write(path, text.encode())

    @classmethod
    def from_dict(cls, values: dict) -> "DreamerConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"a config is a mapping of field names to values, not {type(values).__name__}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path) -> "DreamerConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            return cls.from_dict(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                              f"{getattr(err, 'problem', None) or type(err).__name__}") from None


FIELDS = {f.name: f.type for f in fields(DreamerConfig)}
ALIASES = {"collect_steps": "train_every", "embed_size": "obs_embed_size",  # the doc page's names
           "pcont": "pred_discount", "pcont_scale": "discount_scale"}      # and the official code's
ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
POSITIVE = {"stoch_size", "deter_size", "hidden_size", "obs_embed_size", "cnn_depth", "num_units",
            "model_learning_rate", "imagine_horizon", "actor_learning_rate", "value_learning_rate",
            "actor_init_std", "actor_mean_scale", "batch_size", "train_seq_len", "grad_clip", "adam_eps", "train_every", "train_steps",
            "total_steps", "replay_capacity", "eval_every", "scalar_freq", "checkpoint_interval",
            "keep_checkpoints", "max_nonfinite_updates", "action_repeat", "discount_scale", "video_scale",
            "num_categories", "twohot_bins", "slow_target_update"}                      # V2
CHOICES = {"obs": ("pixels", "state"), "act": tuple(ACTIVATIONS), "precision": (16, 32),
           "actor_grad": ("auto", "dynamics", "reinforce", "both"), "norm": ("none", "layer"),  # V2
           "reward_head": ("mse", "twohot"), "clip_rewards": ("identity", "tanh"),             # V2
           "actor_dist": ("trunc_normal", "tanh_normal")}                                      # V2
CHECKS = {  # field: (check, what is allowed)
    **{name: (lambda v: v > 0, "> 0") for name in POSITIVE},
    **{name: (lambda v: v >= 0, ">= 0") for name in FIELDS
       if FIELDS[name] in ("int", "float") and name not in POSITIVE | {"discount"}},
    **{name: (lambda v, c=c: v in c, " or ".join(map(repr, c))) for name, c in CHOICES.items()},
    **{name: (lambda v: 0 <= v <= 1, f"0 <= {name} <= 1")
       for name in ["td_lambda", "kl_alpha", "actor_grad_mix"]},                                # V2
    "discount": (lambda v: 0 < v <= 1, "0 < discount <= 1"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
}

# V2: the official atari configuration; the dmc preset is the field defaults. gym, mujoco and the
# other backends keep the env's own episode length and learn the discount, since their episodes
# can truly end (CartPole falls, Hopper tips over), as the official V2 defaults do.
PRESETS = {
    "dmc": {},
    "atari": dict(action_repeat=4, time_limit=108_000, grayscale=True, deter_size=600,  # V2
                  hidden_size=600, pred_discount=True, kl_loss_coeff=0.1, free_nats=0.0,
                  discount=0.999, clip_rewards="tanh", model_learning_rate=2e-4,
                  actor_learning_rate=4e-5, value_learning_rate=1e-4, actor_entropy=1e-3,
                  seed_steps=200_000, train_every=64, pretrain_steps=1, prioritize_ends=True,
                  eval_every=100_000),
    "default": dict(action_repeat=1, time_limit=0, pred_discount=True),
}


def backend_of(env: str, env_backend: str = "") -> str:
    if env.startswith("ALE/") or "NoFrameskip" in env:         # the doc page's Atari ids
        return "atari"
    return env.split("/", 1)[0] if "/" in env else env_backend


# =================================================================================================
# 2. Distributions and small math helpers
# =================================================================================================

def straight_through_sample(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample of a categorical whose gradient is that of its probabilities (Algorithm 1:
    sample + probs - sg(probs); Bengio et al. 2013). logits (..., K) -> (..., K)."""
    probs = torch.softmax(logits, -1)
    # Inverse-CDF sampling: the class whose cumulative probability first exceeds u ~ U(0, total).
    # One uniform per categorical; torch.multinomial draws one exponential per class, 15x slower
    # on CPU. NaN logits give class 0 here, and the NaN flows on through `probs` below.
    cdf = probs.detach().cumsum(-1)
    u = torch.rand_like(cdf[..., :1]) * cdf[..., -1:]
    index = (cdf <= u).sum(-1).clamp(max=probs.shape[-1] - 1)
    sample = F.one_hot(index, probs.shape[-1]).to(probs.dtype)
    return sample + (probs - probs.detach())          # exactly one-hot forward


class OneHotDist:
    """Categorical over one-hot vectors (discrete actions), with a straight-through rsample."""

    def __init__(self, logits):
        self.logits = logits.float()

    def rsample(self):
        return straight_through_sample(self.logits)

    def mode(self):
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).float()

    def log_prob(self, action):
        return (action * torch.log_softmax(self.logits, -1)).sum(-1)

    def entropy(self):
        return torch.distributions.Categorical(logits=self.logits).entropy()


class TanhNormal:
    """a = tanh(u), u ~ Normal(mean, std) per dimension (V1 Eq. 3). The mode and the entropy
    have no closed form; as in the official code they are estimated from `samples` draws."""

    def __init__(self, mean, std, samples: int = 100):
        self.normal = torch.distributions.Normal(mean.float(), std.float())
        self.samples = samples

    def rsample(self, shape=()):
        return torch.tanh(self.normal.rsample(shape))

    @property
    def squashed_mean(self):
        """tanh of the Normal's mean: near the mode once the std is small."""
        return torch.tanh(self.normal.mean)

    def log_prob(self, action):
        u = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6))
        # Change of variables: log p(a) = log N(u) - log |da/du|, log(1 - tanh(u)^2) written stably.
        log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
        return (self.normal.log_prob(u) - log_det).sum(-1)

    def mode(self):
        sample = self.rsample((self.samples,))
        best = self.log_prob(sample).argmax(0)                         # most likely of the draws
        return torch.gather(sample, 0, best[None, ..., None].expand_as(sample[:1]))[0]

    def entropy(self):
        return -self.log_prob(self.rsample((self.samples,))).mean(0)


class TruncNormal:  # V2: the continuous actor's distribution (Sec. 2.2)
    """Normal(mean, std) truncated to [-1, 1] per dimension. Reparameterised sampling by the
    inverse CDF; entropy in closed form."""

    def __init__(self, mean, std):
        self.mean, self.std = mean.float(), std.float()
        self.normal = torch.distributions.Normal(self.mean, self.std)
        self.cdf_lo = self.normal.cdf(torch.full_like(self.mean, -1.0))
        self.cdf_hi = self.normal.cdf(torch.ones_like(self.mean))
        self.mass = (self.cdf_hi - self.cdf_lo).clamp_min(1e-8)   # Z = Phi(beta) - Phi(alpha)

    def rsample(self, shape=()):
        u = torch.rand(torch.Size(shape) + self.mean.shape, device=self.mean.device)
        u = (self.cdf_lo + u * self.mass).clamp(1e-6, 1 - 1e-6)
        return self.normal.icdf(u).clamp(-1 + 1e-6, 1 - 1e-6)

    def mode(self):
        return self.mean.clamp(-1, 1)

    @property
    def squashed_mean(self):
        return self.mean                                  # the actor passes tanh(x) as the mean

    def log_prob(self, action):
        return (self.normal.log_prob(action) - torch.log(self.mass)).sum(-1)

    def entropy(self):
        # H = log(sqrt(2 pi e) sigma Z) + (alpha phi(alpha) - beta phi(beta)) / (2 Z)
        alpha, beta = (-1 - self.mean) / self.std, (1 - self.mean) / self.std
        phi = lambda x: torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
        entropy = (0.5 * math.log(2 * math.pi * math.e) + torch.log(self.std * self.mass)
                   + (alpha * phi(alpha) - beta * phi(beta)) / (2 * self.mass))
        return entropy.sum(-1)


# V2: symlog and two-hot come from DreamerV3 (Hafner et al. 2023, Sec. 2), where one reward head
# handles rewards of any scale; the original documentation page offers them for V2 (`reward_head:
# twohot`). The V2 paper itself uses the Gaussian (MSE) reward head, our default.

def symlog(x):
    """sign(x) * log(1 + |x|): compresses large magnitudes, identity-like near 0."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    """The inverse of symlog: sign(x) * (exp(|x|) - 1)."""
    return torch.sign(x) * torch.expm1(x.abs())


def two_hot(x, bins):
    """Encode x (...) over sorted `bins` (K,) as (..., K) weights on the two neighbouring bins,
    summing to 1, whose expectation is x. Values outside [bins[0], bins[-1]] go to the end bin."""
    x = x.clamp(bins[0], bins[-1])
    above = torch.searchsorted(bins, x.contiguous(), right=True).clamp(1, len(bins) - 1)
    below = above - 1
    weight_above = ((x - bins[below]) / (bins[above] - bins[below])).clamp(0, 1)
    return (F.one_hot(below, len(bins)) * (1 - weight_above)[..., None]
            + F.one_hot(above, len(bins)) * weight_above[..., None])


def two_hot_decode(probs, bins):
    """The expectation of bins under probs (..., K) -> (...): inverts `two_hot`."""
    return (probs * bins).sum(-1)


def gaussian_log_prob(x, mean):
    """log N(x | mean, 1) summed over the event dims after (T, B): the unit-variance decoder."""
    return (-0.5 * (x - mean) ** 2 - 0.5 * math.log(2 * math.pi)).flatten(2).sum(-1)


# =================================================================================================
# 3. Networks: a conv encoder and a transposed-conv decoder for 64x64 images, MLPs for vectors and
#    for every head, and the actor.
# =================================================================================================

class ConvEncoder(nn.Module):
    """(..., 64, 64, C) images in [-0.5, 0.5] -> (..., embed). Four stride-2 kernel-4 convolutions
    of depth d, 2d, 4d, 8d with valid padding: 8d x 2 x 2 features."""

    def __init__(self, channels: int, depth: int = 32, embed_size: int = 1024, act=nn.ReLU):
        super().__init__()
        layers, c_in = [], channels
        for i in range(4):
            layers += [nn.Conv2d(c_in, depth * 2 ** i, 4, stride=2), act()]
            c_in = depth * 2 ** i
        self.convs = nn.Sequential(*layers, nn.Flatten())
        # The official code uses the flattened conv output; a projection only if asked for.
        self.proj = nn.Identity() if embed_size == c_in * 4 else nn.Linear(c_in * 4, embed_size)
        self.embed_size = embed_size

    def forward(self, image):
        x = image.reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2)
        return self.proj(self.convs(x)).reshape(*image.shape[:-3], self.embed_size)


class ConvDecoder(nn.Module):
    """(..., feat) -> mean image (..., 64, 64, C). Dense to 32 d channels at 1x1, then transposed
    convs with kernels 5, 5, 6, 6 and stride 2: 1 -> 5 -> 13 -> 30 -> 64 pixels."""

    def __init__(self, feat_size: int, channels: int, depth: int = 32, act=nn.ReLU):
        super().__init__()
        self.linear = nn.Linear(feat_size, 32 * depth)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, stride=2), act(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, stride=2), act(),
            nn.ConvTranspose2d(2 * depth, depth, 6, stride=2), act(),
            nn.ConvTranspose2d(depth, channels, 6, stride=2))

    def forward(self, feat):
        x = self.linear(feat).reshape(-1, self.linear.out_features, 1, 1)
        return self.deconvs(x).permute(0, 2, 3, 1).reshape(*feat.shape[:-1], 64, 64, -1)


class MLP(nn.Module):
    """`layers` Dense layers of `units` with activation, then a linear output layer (none when
    out_size is None: the last hidden layer, activation included, is the output)."""

    def __init__(self, in_size: int, out_size: int | None, layers: int, units: int, act=nn.ELU,
                 norm: str = "none"):                        # V2: LayerNorm option
        super().__init__()
        net = []
        for _ in range(layers):
            norm_layer = [nn.LayerNorm(units, eps=1e-3)] if norm == "layer" else []  # V2 option
            net += [nn.Linear(in_size, units), *norm_layer, act()]
            in_size = units
        self.net = nn.Sequential(*net, *([nn.Linear(in_size, out_size)] if out_size else []))

    def forward(self, x):
        return self.net(x)


def init_weights(module: nn.Module) -> None:
    """Keras' initialisers, which the official code inherits: Glorot-uniform kernels and zero
    biases (PyTorch's own are narrower, with random biases)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) \
            and module.weight.requires_grad:                   # V2: not the frozen slow critic
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    # V2: the layer-normed GRU (GRUCell below) is one Dense layer, initialised as above.


class Actor(nn.Module):
    """Actor p_psi(a_t | z_t) (Eq. 3): a 4 x 400 MLP. V2: continuous actions from a truncated normal
    on [-1, 1] with mean tanh(x) and std 2 sigmoid(x / 2) + 0.1; discrete: one-hot categorical."""

    def __init__(self, feat_size, action_size, discrete, cfg: DreamerConfig, act=nn.ELU):
        super().__init__()
        self.discrete, self.cfg = discrete, cfg
        out = action_size if discrete else 2 * action_size
        self.net = MLP(feat_size, out, 4, cfg.num_units, act, cfg.norm)  # V2: norm option
        self.raw_init_std = math.log(math.exp(cfg.actor_init_std) - 1)   # softplus^-1(init_std)

    def forward(self, feat):
        x = self.net(feat).float()              # the distribution in fp32, under bf16 autocast too
        if self.discrete:
            return OneHotDist(x)
        mean, std = x.chunk(2, -1)
        if self.cfg.actor_dist == "trunc_normal":  # V2
            return TruncNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.cfg.actor_min_std)
        scale = self.cfg.actor_mean_scale
        mean = scale * torch.tanh(mean / scale)
        std = F.softplus(std + self.raw_init_std) + self.cfg.actor_min_std
        return TanhNormal(mean, std)


# =================================================================================================
# 4. RSSM, the recurrent state-space model (Eq. 1). A state is a dict of tensors: deter h_t (the
#    GRU), stoch z_t (V2: a sample, 32 flattened one-hots) and the logits of its distribution.
# =================================================================================================

class GRUCell(nn.Module):
    """V2: the GRU with layer normalisation (Sec. 2.1): one Dense on [x, h] to 3 * deter, LayerNorm,
    then reset, candidate and update; the update gate's bias of -1 favours keeping h early on."""

    def __init__(self, in_size: int, size: int):
        super().__init__()
        self.linear = nn.Linear(in_size + size, 3 * size)   # with a bias, as the official Dense
        self.norm = nn.LayerNorm(3 * size, eps=1e-3)

    def forward(self, x, h):
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h


class RSSM(nn.Module):
    def __init__(self, action_size: int, embed_size: int, cfg: DreamerConfig, act=nn.ELU):
        super().__init__()
        stoch, deter, hidden = cfg.stoch_size * cfg.num_categories, cfg.deter_size, cfg.hidden_size
        self.categories, self.classes = cfg.num_categories, cfg.stoch_size    # V2
        self.act = act()
        self.img_in = nn.Linear(stoch + action_size, hidden)
        self.cell = GRUCell(hidden, deter)                         # V2: layer-normed GRU (Sec. 2.1)
        self.img_out = nn.Linear(deter, hidden)
        self.prior_head = nn.Linear(hidden, stoch)                 # V2: logits of 32 x 32 classes
        self.obs_out = nn.Linear(deter + embed_size, hidden)
        self.post_head = nn.Linear(hidden, stoch)                  # V2: logits of 32 x 32 classes
        self.stoch_size, self.deter_size = stoch, deter

    def initial(self, batch: int, device) -> dict:
        zeros = lambda *n: torch.zeros(batch, *n, device=device)  # noqa: E731
        return dict(logits=zeros(self.categories, self.classes),  # V2: categorical state
                    stoch=zeros(self.stoch_size), deter=zeros(self.deter_size))

    @staticmethod
    def feat(state) -> torch.Tensor:
        """The model state the heads read: the stochastic and the deterministic state, concatenated."""
        return torch.cat([state["stoch"], state["deter"]], -1)

    @staticmethod
    def dist(state):
        return torch.distributions.Independent(
            torch.distributions.OneHotCategorical(logits=state["logits"].float()), 1)  # V2

    def _stats(self, x) -> dict:
        """V2: categorical latents sampled with straight-through gradients (Algorithm 1)."""
        logits = x.reshape(*x.shape[:-1], self.categories, self.classes).float()
        return dict(logits=logits, stoch=straight_through_sample(logits).flatten(-2))

    def img_step(self, prev_state: dict, prev_action: torch.Tensor) -> dict:
        """The prior, from the transition model: the GRU state h_t from h_{t-1} and the previous
        stochastic state and action, then the stochastic state's distribution given h_t alone."""
        x = self.act(self.img_in(torch.cat([prev_state["stoch"], prev_action], -1)))
        deter = self.cell(x, prev_state["deter"])
        stats = self._stats(self.prior_head(self.act(self.img_out(deter))))
        return dict(**stats, deter=deter)

    def obs_step(self, prev_state: dict, prev_action, embed) -> tuple[dict, dict]:
        """The posterior, from the representation model: the prior's h_t and the observation's
        embedding. Returns (posterior, prior)."""
        prior = self.img_step(prev_state, prev_action)
        x = self.act(self.obs_out(torch.cat([prior["deter"], embed], -1)))
        post = dict(**self._stats(self.post_head(x)), deter=prior["deter"])
        return post, prior

    def observe(self, embed, action, state=None) -> tuple[dict, dict]:
        """Filter a sequence: embed (T, B, E), action (T, B, A) where action[t] led to obs[t].
        Returns posterior and prior states stacked over time, each tensor (T, B, ...)."""
        if state is None:  # V2: a sequence starts from the zero state and no previous action,
            state = self.initial(embed.shape[1], embed.device)   # as `is_first` resets both
            action = torch.cat([torch.zeros_like(action[:1]), action[1:]])
        posts, priors = [], []
        for t in range(embed.shape[0]):
            state, prior = self.obs_step(state, action[t], embed[t])
            posts.append(state)
            priors.append(prior)
        return stack(posts), stack(priors)

    def imagine(self, start: dict, actor: nn.Module, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Roll the prior forward `horizon` steps with actions from the actor. start: states (N, ...).
        Returns feats (H+1, N, F), the start included, and actions (H+1, N, A) where actions[t] led
        to feats[t] (zeros first). The actor sees detached features; its sampled actions carry
        gradients into the dynamics."""
        state, feats, actions = start, [self.feat(start)], []
        for _ in range(horizon):
            action = actor(feats[-1].detach()).rsample()
            state = self.img_step(state, action)
            feats.append(self.feat(state))
            actions.append(action)
        actions.insert(0, torch.zeros_like(actions[0]))
        return torch.stack(feats), torch.stack(actions)


def stack(states: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


# =================================================================================================
# 5. World model: encoder, RSSM, image, reward and discount heads, trained by the world-model
#    loss; imagination and open-loop prediction.
# =================================================================================================

def kl_loss(post: dict, prior: dict, free_nats: float = 0.0, scale: float = 1.0,
            alpha: float = 0.8, free_avg: bool = True):
    """V2: KL balancing (Algorithm 2). The same KL(post || prior) enters twice with stop-gradients:

        alpha * max(KL(sg(post) || prior), free) + (1 - alpha) * max(KL(post || sg(prior)), free)

    so the prior is trained towards the posterior (weight alpha = 0.8) faster than the posterior
    is regularised towards the prior (weight 0.2). With `free_avg` the free nats clip the mean KL
    over time and batch, else each step's KL before the mean. post, prior: RSSM states (any
    leading dims). Returns (scale * loss, {"kl": mean KL, "kl_prior": prior term, "kl_post":
    posterior term}) -- the two terms have equal values and differ only in where gradients go.
    At alpha = 0.5 this is the plain KL with half the gradient (as if beta were halved); the
    official code switches to the plain, full-gradient KL at exactly 0.5."""
    sg = lambda state: {k: v.detach() for k, v in state.items()}  # noqa: E731
    kl = lambda p, q: torch.distributions.kl_divergence(RSSM.dist(p), RSSM.dist(q))  # noqa: E731
    prior_kl, post_kl = kl(sg(post), prior), kl(post, sg(prior))
    if free_avg:
        prior_term, post_term = prior_kl.mean().clamp(min=free_nats), post_kl.mean().clamp(min=free_nats)
    else:
        prior_term, post_term = prior_kl.clamp(min=free_nats).mean(), post_kl.clamp(min=free_nats).mean()
    loss = alpha * prior_term + (1 - alpha) * post_term
    return scale * loss, dict(kl=prior_kl.mean(), kl_prior=prior_term, kl_post=post_term)


@dataclass
class Imagined:
    """A batch of imagined trajectories, time-major: feat (H+1, N, F) holds the start state and H
    imagined states; action[t] (H+1, N, A) led to feat[t] (zeros at t = 0); reward[t] and
    discount[t] (H+1, N) are the heads' predictions at feat[t]."""
    feat: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    discount: torch.Tensor


class WorldModel(nn.Module):
    def __init__(self, cfg: DreamerConfig, obs_shape: tuple, action_size: int):
        super().__init__()
        self.cfg, act = cfg, ACTIVATIONS[cfg.act]
        self.obs_key = "image" if cfg.obs == "pixels" else "state"
        if self.obs_key == "image":
            self.encoder = ConvEncoder(obs_shape[-1], cfg.cnn_depth, cfg.obs_embed_size, act)  # V2: ELU
        else:  # vector observations: 4 x 400 Dense + act, the last layer the embedding
            self.encoder = MLP(obs_shape[0], None, 4, cfg.num_units, act, cfg.norm)    # V2: norm
        embed_size = cfg.obs_embed_size if self.obs_key == "image" else cfg.num_units
        self.feat_size = feat_size = cfg.stoch_size * cfg.num_categories + cfg.deter_size  # V2
        self.rssm = RSSM(action_size, embed_size, cfg, act)
        if self.obs_key == "image":
            self.decoder = ConvDecoder(feat_size, obs_shape[-1], cfg.cnn_depth, act)   # V2: ELU
        else:
            self.decoder = MLP(feat_size, obs_shape[0], 4, cfg.num_units, act, cfg.norm)
        # V2: every head is 4 x 400; the reward head is Gaussian, or two-hot (DreamerV3)
        self.register_buffer("bins", torch.linspace(-20, 20, cfg.twohot_bins), persistent=False)
        reward_out = cfg.twohot_bins if cfg.reward_head == "twohot" else 1
        self.reward = MLP(feat_size, reward_out, 4, cfg.num_units, act, cfg.norm)  # p(r_t | h_t, z_t)
        self.discount_head = MLP(feat_size, 1, 4, cfg.num_units, act, cfg.norm) \
            if cfg.pred_discount else None                           # V2: p(gamma_t | h_t, z_t)

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """Images to x / 255 - 0.5, as the official code; vectors as they are."""
        return obs.float() / 255.0 - 0.5 if self.obs_key == "image" else obs.float()

    def reward_log_prob(self, feat, reward):  # V2: Gaussian (paper) or two-hot (DreamerV3)
        reward = torch.tanh(reward) if self.cfg.clip_rewards == "tanh" else reward  # V2: Atari
        out = self.reward(feat).float()
        if self.cfg.reward_head == "twohot":  # cross-entropy against two-hot symlog(r)
            return (two_hot(symlog(reward), self.bins) * torch.log_softmax(out, -1)).sum(-1)
        return gaussian_log_prob(reward[..., None], out)

    def reward_mean(self, feat):
        out = self.reward(feat).float()
        if self.cfg.reward_head == "twohot":
            return symexp(two_hot_decode(torch.softmax(out, -1), self.bins))
        return out.squeeze(-1)

    def loss(self, batch: dict):
        """The world-model loss (V1 Eq. 10, V2 Eq. 2) on time-major tensors (T, B, ...): obs, action,
        reward, discount.
        Returns (loss, posterior states, metrics)."""
        cfg = self.cfg
        obs = self.preprocess(batch[self.obs_key])
        post, prior = self.rssm.observe(self.encoder(obs), batch["action"])
        feat = self.rssm.feat(post)
        obs_like = gaussian_log_prob(obs, self.decoder(feat).float()).mean()  # observations' log-likelihood
        reward_like = self.reward_log_prob(feat, batch["reward"]).mean()      # V2: Gaussian or two-hot
        kl_term, kl_metrics = kl_loss(post, prior, cfg.free_nats, cfg.kl_loss_coeff,
                                      cfg.kl_alpha, cfg.free_avg)             # beta KL, balanced
        loss = kl_term - obs_like - reward_like
        metrics = dict(obs_loss=-obs_like, reward_loss=-reward_like, **kl_metrics)
        if self.discount_head is not None:  # the discount head: a Bernoulli log-likelihood
            discount_like = -F.binary_cross_entropy_with_logits(
                self.discount_head(feat).float().squeeze(-1), cfg.discount * batch["discount"])
            loss = loss - cfg.discount_scale * discount_like
            metrics["discount_loss"] = -discount_like
        metrics["model_loss"] = loss
        with torch.no_grad():  # what tells the pitfalls apart (README, "When it does not learn")
            metrics.update(prior_entropy=RSSM.dist(prior).entropy().mean(),
                           post_entropy=RSSM.dist(post).entropy().mean(),
                           kl_at_floor=(kl_metrics["kl"] < cfg.free_nats).float())
        return loss, post, metrics

    def imagine(self, post: dict, actor: nn.Module, start_discount) -> Imagined:  # V2: start_discount
        """Imagination (Sec. 2.2) from every posterior state of the batch: T * B starts."""
        start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
        feat, action = self.rssm.imagine(start, actor, self.cfg.imagine_horizon)
        reward = self.reward_mean(feat)                                 # V2: Gaussian or two-hot
        if self.discount_head is not None:
            discount = torch.sigmoid(self.discount_head(feat).float().squeeze(-1))
            # V2: the start state's discount is known from replay (0 after a true terminal).
            discount = torch.cat([self.cfg.discount * start_discount.flatten()[None], discount[1:]])
        else:
            discount = torch.full_like(reward, self.cfg.discount)
        return Imagined(feat, action, reward, discount)

    @torch.no_grad()
    def openloop(self, obs, action, context: int = 5):
        """Filter the first `context` steps of a real sequence, then imagine the rest from the real
        actions alone. obs: preprocessed (T, B, ...), action (T, B, A). Returns the decoded
        predictions (T, B, ...): reconstructions first, then imagined observations."""
        post, _ = self.rssm.observe(self.encoder(obs[:context]), action[:context])
        state, feats = {k: v[-1] for k, v in post.items()}, [self.rssm.feat(post)]
        for t in range(context, obs.shape[0]):
            state = self.rssm.img_step(state, action[t])
            feats.append(self.rssm.feat(state)[None])
        return self.decoder(torch.cat(feats)).float()


# =================================================================================================
# 6. Actor-critic, learned on imagined trajectories: lambda-returns, the actor and the critic.
# =================================================================================================

def lambda_return(reward, value, discount, bootstrap, lambda_: float):
    """The lambda-return (V1 Eq. 6, V2 Eq. 4) by its recursion, time-major: reward, value, discount
    (T, B); bootstrap (B).

        G_t = r_t + gamma_t * ((1 - lambda) * v_{t+1} + lambda * G_{t+1}),  v_T = G_T = bootstrap

    Equal to the exponentially weighted average of the k-step returns (V1 paper, Eq. 5-6).
    `discount` is a constant or the learned discount; a 0 ends the return at that step.
    """
    next_value = torch.cat([value[1:], bootstrap[None]], 0)
    inputs = reward + discount * next_value * (1 - lambda_)
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + discount[t] * lambda_ * last
        returns.append(last)
    return torch.stack(returns[::-1])


class ActorCritic(nn.Module):
    def __init__(self, cfg: DreamerConfig, feat_size: int, action_size: int, discrete: bool):
        super().__init__()
        self.cfg, act = cfg, ACTIVATIONS[cfg.act]
        self.actor = Actor(feat_size, action_size, discrete, cfg, act)
        self.value = MLP(feat_size, 1, 4, cfg.num_units, act, cfg.norm)  # V2: critic v_xi(z_t), Eq. (3)
        # V2: the lambda-targets and the REINFORCE baseline come from a slow copy of the critic,
        # copied every `slow_target_update` updates (Sec. 2.2).
        self.slow_value = copy.deepcopy(self.value).requires_grad_(False)
        # V2: "auto" is REINFORCE for discrete actions and dynamics backprop for continuous ones.
        self.actor_grad = cfg.actor_grad if cfg.actor_grad != "auto" else \
            ("reinforce" if discrete else "dynamics")

    def update_slow_critic(self) -> None:
        self.slow_value.load_state_dict(self.value.state_dict())

    def loss(self, traj: Imagined):
        """The actor loss (V1 Eq. 7, V2 Eq. 6) and the critic loss (V1 Eq. 8, V2 Eq. 5) of imagined
        trajectories:

            states   s_0   s_1   s_2  ...  s_{H-1}   s_H      feat[t]
            actions        a_1   a_2  ...  a_{H-1}   a_H      action[t] led to feat[t]
            targets  V_0   V_1   V_2  ...  V_{H-1}            returns[t], Eq. (4); v(s_H) bootstraps
            weights  1     g_0  g_0g_1 ...                    weights[t], prod of discounts before s_t
            actor:   pi(a_{t+1} | s_t) is scored by V_{t+1}, t = 0 .. H-2
            critic:  v(s_t) regresses onto V_t,             t = 0 .. H-1 (V2: s_0 included)

        Returns (actor loss, critic loss, metrics)."""
        cfg = self.cfg
        value = self.slow_value(traj.feat).float().squeeze(-1)   # V2: targets from the slow critic
        returns = lambda_return(traj.reward[:-1], value[:-1], traj.discount[:-1], value[-1],
                                cfg.td_lambda)                                          # Eq. (4)
        # V2: the weights start at the start state, so a terminal start silences the rollout.
        weights = torch.cumprod(torch.cat([torch.ones_like(traj.discount[:1]), traj.discount[:-1]]),
                                0).detach()
        policy = self.actor(traj.feat[:-2].detach())
        objective = returns[1:]                               # dynamics backprop: rho = 0 in Eq. (6)
        if self.actor_grad != "dynamics":  # V2: REINFORCE with the slow critic as baseline, Eq. (6)
            advantage = (returns[1:] - value[:-2]).detach()
            reinforce = policy.log_prob(traj.action[1:-1].detach()) * advantage
            mix = cfg.actor_grad_mix if self.actor_grad == "both" else 0.0     # V2: mix = 1 - rho
            # Pure REINFORCE leaves the returns out: no gradient runs back through imagination.
            objective = reinforce if mix == 0 else mix * returns[1:] + (1 - mix) * reinforce
        if cfg.actor_entropy or not isinstance(policy, TanhNormal):
            entropy = policy.entropy()    # in closed form, or a tanh-normal's from 100 draws
        else:  # no bonus: the tanh-normal's entropy is only a metric, its mean over the states,
            with torch.no_grad():         # and one draw per state estimates that at 1% of the cost
                entropy = -policy.log_prob(policy.rsample())
        objective = objective + cfg.actor_entropy * entropy              # V2: eta H[a_t | z_t]
        actor_loss = -(weights[:-2] * objective).mean()                  # Eq. (6)
        critic = self.value(traj.feat[:-1].detach()).float().squeeze(-1)  # V2: s_0 too
        value_loss = (weights[:-1] * 0.5 * (critic - returns.detach()) ** 2).mean()  # Eq. (5)
        metrics = dict(actor_loss=actor_loss, value_loss=value_loss, actor_entropy=entropy.mean(),
                       imag_return=returns.mean(), imag_reward=traj.reward.mean())
        if not self.actor.discrete:  # past +-0.95 tanh's slope is under 0.1: a mode stuck at a bound
            metrics["actor_mean_at_bound"] = (policy.squashed_mean.abs() > 0.95).float().mean()
        return actor_loss, value_loss, metrics


# =================================================================================================
# 7. Replay: whole episodes as .npz files under <run>/episodes, written atomically. Sequences of
#    `train_seq_len` steps from a uniformly chosen episode.
# =================================================================================================

class ReplayBuffer:
    """Episodes in memory and on disk; the oldest are dropped (from both) above `capacity` steps."""

    def __init__(self, directory, capacity: int, seq_len: int, rng: np.random.Generator,
                 prioritize_ends: bool = False):                       # V2: prioritize_ends
        self.prioritize_ends = prioritize_ends                            # V2
        self.directory, self.capacity, self.seq_len, self.rng = Path(directory), capacity, seq_len, rng
        self.episodes: dict[str, dict] = {}                     # file name -> arrays, oldest first
        for path in sorted(self.directory.glob("*.npz")):
            episode = load_episode(path)
            if episode is not None:
                self.episodes[path.name] = episode
        self.next_index = 1 + max(map(episode_number, self.episodes), default=-1)
        self._enforce_capacity()

    @property
    def num_steps(self) -> int:
        return sum(len(ep["reward"]) - 1 for ep in self.episodes.values())

    def add(self, episode: dict) -> None:
        name = f"{self.next_index:06d}-{len(episode['reward']) - 1}.npz"
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **episode)
        atomic_write(self.directory / name, buffer.getvalue())
        self.episodes[name] = episode
        self.next_index += 1
        self._enforce_capacity()

    def set_aside(self, first: int, directory: Path) -> int:
        """Move the episodes numbered `first` and later out of replay into `directory`; the next
        one stored is numbered `first` again (or lower, were that file lost). Returns how many."""
        late = [name for name in self.episodes if episode_number(name) >= first]
        for name in late:
            directory.mkdir(parents=True, exist_ok=True)
            (self.directory / name).replace(directory / name)
            del self.episodes[name]
        self.next_index = min(self.next_index, first)
        return len(late)

    def _enforce_capacity(self) -> None:
        while len(self.episodes) > 1 and self.num_steps > self.capacity:
            (self.directory / next(iter(self.episodes))).unlink(missing_ok=True)
            del self.episodes[next(iter(self.episodes))]

    def can_sample(self) -> bool:
        return any(len(ep["reward"]) >= self.seq_len for ep in self.episodes.values())

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        """Sequences from uniformly chosen episodes at uniform start indices (V2 `prioritize_ends`:
        starts past the last valid one move to it, so episode ends are seen more often). `rng`: a
        generator other than the replay's own. Returns arrays (B, T, ...)."""
        rng = self.rng if rng is None else rng
        usable = [ep for ep in self.episodes.values() if len(ep["reward"]) >= self.seq_len]
        if not usable:
            raise RuntimeError(f"replay has no episode of at least {self.seq_len} steps")
        chunks = []
        for i in rng.integers(0, len(usable), batch_size):
            last = len(usable[i]["reward"]) - self.seq_len
            upper = last + 1 + (self.seq_len if self.prioritize_ends else 0)  # V2: prioritize ends
            start = min(rng.integers(0, upper), last)
            chunks.append({k: v[start:start + self.seq_len] for k, v in usable[i].items()})
        return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}


def episode_number(name: str) -> int:
    return int(name.split("-")[0])                     # "000012-500.npz": episode 12, 500 steps


def load_episode(path) -> dict | None:
    """An episode file, never unpickled; a damaged one is a warning naming it, and None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            episode = {k: data[k] for k in data.files}
        if len({len(v) for v in episode.values()}) != 1 or "reward" not in episode:
            raise ValueError("arrays of different lengths")
        return episode
    except Exception as err:  # noqa: BLE001 - any damage means: skip this file
        print(f"warning: skipping damaged episode file {path}: {err}", file=sys.stderr)
        return None


# =================================================================================================
# 8. Dreamer: the world model and the actor-critic with their optimisers, the update and the
#    policy. DreamerAgent: the environment, replay and the training loop.
# =================================================================================================

class Optimizer:
    """Adam with global-norm gradient clipping for `modules`. A NaN/Inf loss or gradient never
    reaches the weights: that step is skipped. `fused` (on CUDA) is the one-kernel Adam, which
    skips the step on the device itself, so no update waits for the GPU."""

    def __init__(self, modules: list[nn.Module], lr: float, cfg: DreamerConfig, device, fused=None):
        self.params, self.clip = [p for m in modules for p in m.parameters()], cfg.grad_clip
        self.fused = device.type == "cuda" if fused is None else fused
        # Decoupled weight decay shrinks every parameter (biases and norms too: the official
        # pattern is '.*') by (1 - wd) per step; AdamW multiplies it by lr, hence the division.
        self.opt = torch.optim.AdamW(self.params, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay / lr,
                                     **(dict(fused=True) if self.fused else {}))

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """One step on `loss`; returns whether it was taken, as a bool tensor on the device."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward(inputs=self.params)                       # gradients for these parameters only
        norm = nn.utils.clip_grad_norm_(self.params, self.clip)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        if self.fused:        # the fused kernel skips the step where found_inf is set (as AMP does)
            self.opt.found_inf = (~finite).float()
            self.opt.step()
        elif finite:          # reading `finite` waits for the device: free on a CPU
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return finite


class Dreamer(nn.Module):
    """The world model and the actor-critic, their optimisers, the update and the policy."""

    def __init__(self, cfg: DreamerConfig, obs_shape: tuple, action_size: int, discrete: bool,
                 device="cpu"):
        super().__init__()
        self.cfg, self.obs_shape = cfg, tuple(obs_shape)
        self.action_size, self.discrete = action_size, discrete
        self.world_model = WorldModel(cfg, obs_shape, action_size)
        self.actor_critic = ActorCritic(cfg, self.world_model.feat_size, action_size, discrete)
        self.apply(init_weights)
        self.actor_critic.update_slow_critic()                # V2: the slow critic starts equal
        self.device = torch.device(device)
        self.to(self.device)
        if cfg.precision == 16:
            fast, why = bf16_is_fast(self.device)
            if not fast:  # said once; config.yaml records what runs
                print(f"note: precision 16 runs as precision 32: {why}")
                cfg.precision = 32
        wm, ac = self.world_model, self.actor_critic
        self.optimizers = dict(model=Optimizer([wm], cfg.model_learning_rate, cfg, self.device),
                               actor=Optimizer([ac.actor], cfg.actor_learning_rate, cfg, self.device),
                               value=Optimizer([ac.value], cfg.value_learning_rate, cfg, self.device))
        if cfg.compile:
            self.compile_parts()

    def autocast(self):
        """bf16 autocast for `precision: 16`: matrix products in bf16, weights and losses in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == 16)

    def update(self, batch: dict) -> dict:
        """One update (V1 Algorithm 1, "dynamics learning" and "behaviour learning") on time-major
        tensors (T, B, ...). One forward pass gives the three losses, as in the official code; the
        actor's gradient runs back through the world model, so the world model steps last."""
        wm, ac = self.world_model, self.actor_critic
        with self.autocast():
            model_loss, post, metrics = wm.loss(batch)
            traj = wm.imagine(post, ac.actor, batch["discount"])       # V2: the true first discount
            actor_loss, value_loss, behaviour = ac.loss(traj)
        finite = [self.optimizers["actor"].step(actor_loss), self.optimizers["value"].step(value_loss),
                  self.optimizers["model"].step(model_loss)]
        metrics = {k: v.detach() for k, v in {**metrics, **behaviour}.items()}   # read when logged
        return dict(metrics, finite=finite[0] & finite[1] & finite[2])

    @torch.no_grad()
    def policy_step(self, obs: torch.Tensor, state, explore: bool):
        """obs: (B, ...) one observation per env. state: (latent, previous action) or None.
        Returns (action (B, A), new state)."""
        wm = self.world_model
        if state is None:
            latent = wm.rssm.initial(obs.shape[0], obs.device)
            prev_action = torch.zeros(obs.shape[0], self.action_size, device=obs.device)
        else:
            latent, prev_action = state
        latent, _ = wm.rssm.obs_step(latent, prev_action, wm.encoder(wm.preprocess(obs)))
        dist = self.actor_critic.actor(wm.rssm.feat(latent))
        action = self.explore(dist.rsample()) if explore else dist.mode()
        return action, (latent, action)

    def explore(self, action):
        """Exploration noise: Gaussian clipped to [-1, 1], or epsilon-greedy with epsilon =
        action_noise for one-hot actions."""
        noise = self.cfg.action_noise
        if self.discrete:
            random_action = F.one_hot(torch.randint(0, self.action_size, action.shape[:-1],
                                                    device=action.device), self.action_size)
            use_random = torch.rand(action.shape[:-1], device=action.device)[..., None] < noise
            return torch.where(use_random, random_action.float(), action)
        return (action + noise * torch.randn_like(action)).clamp(-1, 1)

    def compile_parts(self) -> None:
        """The `compile` flag: torch.compile each network and the RSSM's step functions. The time
        loops stay in Python, so the three losses keep separate backward passes."""
        wm = self.world_model
        for module in (wm.encoder, wm.decoder, wm.reward, wm.discount_head, self.actor_critic.value,
                       self.actor_critic.actor.net):
            if module is not None:
                module.compile()
        torch._dynamo.config.recompile_limit = 32    # MLP.forward serves heads of many shapes
        wm.rssm.img_step = torch.compile(wm.rssm.img_step)
        wm.rssm.obs_step = torch.compile(wm.rssm.obs_step)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> dict:
        wm, ac = self.world_model, self.actor_critic
        parts = dict(encoder=wm.encoder, rssm=wm.rssm, decoder=wm.decoder, reward=wm.reward,
                     discount=wm.discount_head, actor=ac.actor, value=ac.value)
        return dict(algo=ALGO, env=self.cfg.env_name, total_parameters=self.parameter_count(),
                    parameters={k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m})

    def save(self, path) -> None:
        """The weights (with the shapes to rebuild the model) to `path`, config.yaml beside it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_torch(path, dict(self.header(), model=self.state_dict()))
        self.cfg.to_yaml(Path(path).parent / "config.yaml")

    def header(self) -> dict:
        return dict(algo=ALGO, config=self.cfg.to_dict(), obs_shape=list(self.obs_shape),
                    action_size=self.action_size, discrete=self.discrete)

    @classmethod
    def from_config(cls, config, obs_shape=None, action_size=None, discrete=None, device="cpu"):
        """A new model from a DreamerConfig or a YAML file; the shapes are read from the env."""
        cfg = config if isinstance(config, DreamerConfig) else DreamerConfig.from_yaml(config)
        if obs_shape is None:
            with make_env(cfg, seed=cfg.seed) as env:
                obs_shape, action_size, discrete = env_shapes(env, cfg)
        return cls(cfg, obs_shape, action_size, discrete, device)

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "Dreamer":
        """The model saved at `path`: a file written by `save` or a checkpoint, or a run, ckpts
        or best/ directory (its newest weights). Writes nothing."""
        file, data = find_weights(path)
        model = cls(DreamerConfig.from_dict(data["config"]), data["obs_shape"], data["action_size"],
                    data["discrete"], device)
        load_state(model, data, file)
        return model


class DreamerAgent:
    """The environment, the replay and the model, and the training loop (V1 paper, Algorithm 1).
    Nothing is written to disk before `train()`."""

    def __init__(self, cfg: DreamerConfig, logdir=None, resume: bool = False):
        self.cfg = cfg = copy.deepcopy(cfg).validate()
        self.logdir = Path(logdir or cfg.logdir or default_logdir(cfg))
        cfg.logdir = str(self.logdir)
        if not resume and any((self.logdir / "ckpts").glob("ckpt-*.pt")):
            raise ConfigError(f"--logdir '{self.logdir}' already holds a run; allowed: a new "
                              f"directory, or continue it with --resume {self.logdir}")
        seed_everything(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env, self.eval_env = make_env(cfg, seed=cfg.seed), None
        self.dreamer = Dreamer(cfg, *env_shapes(self.env, cfg), device=pick_device(cfg.device))
        self.device = self.dreamer.device
        self.replay = ReplayBuffer(self.logdir / "episodes", cfg.replay_capacity,
                                   cfg.train_seq_len, self.rng, cfg.prioritize_ends)  # V2
        self.step = self.episodes = self.updates = self.evals = 0   # env steps, episodes, ...
        self.pending_updates = self.last_train = self.nonfinite = self.nonfinite_in_row = 0
        self.finite_flags = []                                   # of updates not yet counted
        self.pretrained, self.best_eval, self.stop = False, -math.inf, None
        self.eval_owed = False             # an evaluation a stop cut short: taken on --resume
        self.should = dict(eval=Every(cfg.eval_every), log=Every(cfg.scalar_freq),
                           save=Every(cfg.checkpoint_interval))
        self.logger, self.console = Logger(self.logdir, cfg), Console(cfg)
        if resume:
            resume_run(self)

    # --- Algorithm 1: prefill with random actions, then collect with the policy and train every
    #     `train_every` env steps, evaluating, logging and checkpointing on their schedules.
    def train(self) -> dict:
        cfg = self.cfg
        open_run(self)
        with stop_on_signals(self):
            if self.eval_owed:
                self.evaluate_and_log()
            while self.step < cfg.total_steps and not self.stop:
                self.run_episode()
            save_checkpoint(self)
        self.logger.write(self.step, self.console, self)
        plot_curves(self.logdir)
        self.logger.close()
        if self.stop:
            print(f"stopped by {self.stop} at env step {self.step}; checkpoint saved. Continue "
                  f"with: python {Path(__file__).name} --resume {self.logdir}", flush=True)
            if self.stop == "SIGINT":
                raise KeyboardInterrupt
        return dict(env_steps=self.step, episodes=self.episodes, updates=self.updates,
                    best_eval=self.best_eval)

    def run_episode(self) -> None:
        """One training episode, stored in replay when it ends or is interrupted (nothing lost)."""
        cfg = self.cfg
        obs, _ = self.env.reset(seed=episode_seed(cfg.seed, self.episodes))
        episode = [transition(obs, np.zeros(self.dreamer.action_size, np.float32), 0.0, False)]
        state, score, done, save = None, 0.0, False, False
        while not done and not self.stop and self.step < cfg.total_steps:
            if self.step < cfg.seed_steps:
                action = self.random_action()
            else:
                action, state = self.act(obs, state, explore=True)
            obs, reward, terminated, truncated, info = self.env.step(action)
            done = terminated or truncated
            ends = terminated or (cfg.life_loss_discount and info.get("life_loss", False))  # V2
            episode.append(transition(obs, action, reward, ends))
            score += reward
            if done:
                self.logger.scalar("train_return", score)
                self.logger.scalar("train_length", len(episode) - 1)
            self.step += cfg.action_repeat
            self.train_if_due()
            if self.step >= cfg.seed_steps and self.should["eval"](self.step):
                self.evaluate_and_log()
            if self.should["log"](self.step):
                self.count_nonfinite()
                self.logger.write(self.step, self.console, self)
            save = self.should["save"](self.step)
            if save and not done:
                save_checkpoint(self)
            self.console.tick(self)
        if len(episode) > 1:
            self.replay.add({k: np.stack([step[k] for step in episode]) for k in episode[0]})
        self.episodes += done
        if save and done:        # due at the episode's last step: taken once it is stored
            save_checkpoint(self)

    def train_if_due(self) -> None:
        """`pretrain_steps` updates right after the prefill, then `train_steps` every `train_every`
        env steps. Owed updates are counted in the checkpoint, so a stop loses none."""
        cfg = self.cfg
        if self.step < cfg.seed_steps or not self.replay.can_sample():
            return
        if not self.pretrained:
            self.pretrained, self.last_train = True, self.step
            self.pending_updates += cfg.pretrain_steps
        elif self.step - self.last_train >= cfg.train_every:
            self.last_train += cfg.train_every
            self.pending_updates += cfg.train_steps
        while self.pending_updates > 0 and not self.stop:
            for k, v in self.train_batch().items():
                self.logger.scalar(k, v)
            self.pending_updates -= 1
            self.console.tick(self)

    def train_batch(self) -> dict:
        batch = self.replay.sample(self.cfg.batch_size)
        cuda = self.device.type == "cuda"      # pinned memory: the copy overlaps the GPU's work
        batch = {k: (torch.as_tensor(v).pin_memory() if cuda else torch.as_tensor(v))
                 .to(self.device, non_blocking=cuda).transpose(0, 1)
                 for k, v in batch.items() if k in ("image", "state", "action", "reward", "discount")}
        if self.updates % self.cfg.slow_target_update == 0:       # V2: the slow critic (Sec. 2.2)
            self.dreamer.actor_critic.update_slow_critic()
        started = time.perf_counter()
        metrics = self.dreamer.update(batch)
        self.console.update_seconds(time.perf_counter() - started)
        self.updates += 1
        self.finite_flags.append(metrics.pop("finite"))
        if self.device.type != "cuda":        # on a GPU, read at the next metrics line instead
            self.count_nonfinite()
        return dict(metrics, nonfinite_updates=self.nonfinite)

    def count_nonfinite(self) -> None:
        """Count the skipped updates among those since the last call (one read of the device);
        `max_nonfinite_updates` in a row stop training."""
        flags, self.finite_flags = self.finite_flags, []
        for finite in (torch.stack(flags).tolist() if flags else []):
            self.nonfinite_in_row = 0 if finite else self.nonfinite_in_row + 1
            self.nonfinite += not finite
            if self.nonfinite_in_row >= self.cfg.max_nonfinite_updates:
                raise NonFiniteError(
                    f"training stopped: {self.nonfinite_in_row} consecutive updates had NaN/Inf "
                    f"losses or gradients (skipped, weights untouched). Try a lower learning rate "
                    f"(--model_learning_rate 1e-4) or tighter clipping (--grad_clip 10).")

    def act(self, obs: dict, state, explore: bool):
        x = torch.as_tensor(np.ascontiguousarray(obs[self.dreamer.world_model.obs_key][None]),
                            device=self.device)
        with self.dreamer.autocast():
            action, state = self.dreamer.policy_step(x, state, explore)
        return action[0].float().cpu().numpy(), state

    def random_action(self):
        d = self.dreamer
        if d.discrete:
            return np.eye(d.action_size, dtype=np.float32)[self.rng.integers(d.action_size)]
        return self.rng.uniform(-1, 1, d.action_size).astype(np.float32)

    @torch.no_grad()
    def evaluate(self, episodes: int | None = None) -> float:
        """Mean return of `episodes` (default eval_episodes) with the actor's mode, no noise."""
        cfg = self.cfg
        if self.eval_env is None:
            self.eval_env = make_env(cfg, seed=cfg.seed + 1)
        returns, rng_before = [], rng_states()
        for i in range(cfg.eval_episodes if episodes is None else episodes):
            obs, _ = self.eval_env.reset(seed=episode_seed(cfg.seed + 1, self.evals * 1000 + i))
            state, score, done = None, 0.0, False
            while not done and not self.stop:
                action, state = self.act(obs, state, explore=False)
                obs, reward, terminated, truncated, _ = self.eval_env.step(action)
                score, done = score + reward, terminated or truncated
            if done:
                returns.append(score)
        if self.stop:       # cut short: no mean of fewer episodes; the same evaluation runs again
            set_rng_states(rng_before)             # on --resume, with the same random numbers
            return float("nan")
        self.evals += 1
        return float(np.mean(returns)) if returns else float("nan")

    def evaluate_and_log(self) -> None:
        """An evaluation inside training: its return, the best weights, the open-loop report."""
        self.console.phase(self, "evaluating")
        score = self.evaluate()
        self.eval_owed = bool(self.stop)
        if self.eval_owed:
            self.console.phase(self, None)
            return
        if not math.isnan(score):
            self.logger.scalar("eval_return", score)
            if score > self.best_eval:
                self.best_eval = score
                self.dreamer.save(self.logdir / "ckpts" / "best" / "model.pt")
        if self.replay.can_sample():
            self.openloop_report()
        plot_curves(self.logdir)
        self.console.phase(self, None)

    @torch.no_grad()
    def openloop_report(self, context: int = 5, horizons=(1, 5, 15)) -> None:
        """Open-loop predictions of 8 replay sequences, drawn with a generator of their own so that
        evaluation never changes the training batches. The mean squared error at imagined steps 1,
        5 and 15 measures how fast imagination drifts from reality; from pixels, 4 sequences are
        also a GIF."""
        cfg, wm = self.cfg, self.dreamer.world_model
        batch = self.replay.sample(8, np.random.default_rng([cfg.seed, self.evals]))
        obs = wm.preprocess(torch.as_tensor(batch[wm.obs_key], device=self.device).transpose(0, 1))
        model = wm.openloop(obs, torch.as_tensor(batch["action"], device=self.device).transpose(0, 1),
                            context)
        error = ((model - obs) ** 2).flatten(2).mean((1, 2))                # (T,)
        for k in horizons:
            if context + k - 1 < len(error):
                self.logger.scalar(f"openloop_mse_{k}", error[context + k - 1])
        if cfg.video and wm.obs_key == "image":
            save_gif(self.logdir / "videos" / f"openloop-{self.step:010d}.gif",
                     openloop_frames(obs[:, :4], model[:, :4], context, cfg.video_scale))

    # --- The documentation page's convenience API
    def summary(self) -> dict:
        return self.dreamer.summary()

    @classmethod
    def from_config(cls, config, seed: int | None = None, **overrides) -> "DreamerAgent":
        cfg = config if isinstance(config, DreamerConfig) else DreamerConfig.from_yaml(config)
        values = {**cfg.to_dict(), **overrides, **({} if seed is None else dict(seed=seed))}
        return cls(DreamerConfig(**values))

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "DreamerAgent":
        """An agent with the weights saved at `path` (see Dreamer.from_pretrained) and a new run
        directory, created only when it trains."""
        file, data = find_weights(path)
        values = {**data["config"], "logdir": "", **overrides}
        agent = cls(DreamerConfig(**values))
        load_state(agent.dreamer, data, file)
        return agent

    def close(self) -> None:
        for env in (self.env, self.eval_env):
            if env is not None:
                env.close()


class Every:
    """True when `every` steps have passed since it last was (the official code's tools.Every)."""

    def __init__(self, every: int):
        self.every, self.last = every, 0

    def __call__(self, step: int) -> bool:
        if step - self.last < self.every:
            return False
        self.last = step
        return True


def transition(obs: dict, action, reward: float, terminated: bool) -> dict:
    """One replay step: the observation, the action that led to it, the reward received on the
    way, and the discount (0 after a true terminal state, 1 otherwise)."""
    step = {k: v for k, v in obs.items() if k in ("image", "state")}
    step.update(action=np.asarray(action, np.float32), reward=np.float32(reward),
                discount=np.float32(0.0 if terminated else 1.0),
                is_first=np.bool_(obs.get("is_first", False)))
    return step


def episode_seed(seed: int, index: int) -> int:
    """Each episode gets its own env seed, so a resumed run meets the same episodes."""
    return (seed * 1_000_003 + index) % 2**31


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# =================================================================================================
# 9. Running it: errors, config files and the CLI, checkpoints, signals, the console, metrics,
#    curves and GIFs. Nothing of the algorithm is below this line.
# =================================================================================================

class ConfigError(ValueError):
    """A user error in the configuration or the command line (one line, exit code 2)."""


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used (one line, exit code 2)."""


class OtherAlgoError(CheckpointError):
    """A checkpoint of the other variant: an error to report, not a damaged file to skip."""


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with NaN/Inf losses or gradients."""


BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}
# A run's env and networks are fixed: its checkpoint only fits those.
FIXED_ON_RESUME = ("env", "env_backend", "obs", "action_repeat", "grayscale", "stoch_size",  # V2: more
                   "num_categories", "deter_size", "hidden_size", "obs_embed_size", "cnn_depth",
                   "num_units", "act", "norm", "pred_discount", "reward_head", "twohot_bins", "actor_dist")


def check_type(name: str, value):
    """`value` as field `name`'s type, from the strings the CLI and YAML give ("1e-4", "true")."""
    kind = FIELDS[name]
    if kind in ("int", "float") and isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind == "bool" and isinstance(value, str) and value.lower() in BOOLS:
        value = BOOLS[value.lower()]
    if kind == "str" and isinstance(value, os.PathLike):     # logdir=Path(...)
        value = os.fspath(value)
    python_type = dict(int=int, float=float, bool=bool, str=str)[kind]
    if type(value) is not python_type:
        raise ConfigError(f"config field '{name}' has value {value!r} of type {type(value).__name__}; "
                          f"allowed: a value of type {kind}")
    return value


def unknown_field(name: str) -> str:
    close = difflib.get_close_matches(name, list(FIELDS) + list(ALIASES), n=1)
    return (f"unknown config field '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")
            + f" (see `python {Path(__file__).name} --help`)")


def other_algo(algo) -> ConfigError:
    return ConfigError(f"config field 'algo' is {algo!r} but this is {Path(__file__).name}; allowed: "
                       f"{ALGO!r} (use dreamer_{str(algo).lower()[-2:]}.py for {algo!r})")


def make_env(cfg: DreamerConfig, seed: int):
    options = dict(grayscale=cfg.grayscale) if cfg.backend == "atari" else {}
    if cfg.backend in ("dmc", "mujoco") and cfg.fast_render:
        options["fast_render"] = True
    return common.make_env(cfg.env_name, obs=cfg.obs, action_repeat=cfg.action_repeat,
                           time_limit=cfg.time_limit or None, seed=seed, **options)


def env_shapes(env, cfg: DreamerConfig):
    key = "image" if cfg.obs == "pixels" else "state"
    return tuple(env.observation_space[key].shape), env.action_size, env.discrete


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device' is {name!r} but CUDA is not available; "
                          f"allowed here: 'cpu' or 'auto'")
    return torch.device(name)


def bf16_is_native(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why not). GPUs from Ampere on and CPUs with bf16
    matrix instructions (x86 AVX-512 BF16 or AMX, ARM BF16) do; elsewhere bf16 is emulated in
    software, which is slower than fp32."""
    try:
        if device.type == "cuda":
            return (torch.cuda.is_bf16_supported(including_emulation=False),
                    "this GPU has no native bf16, and emulated bf16 is slower than fp32")
        if platform.machine().lower() in ("arm64", "aarch64"):
            return (torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    "this CPU has no native bf16, and emulated bf16 is slower than fp32")
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):  # a torch build without these checks
        native = False
    return native, "this CPU has no native bf16 (AVX-512 BF16 or AMX), and emulated bf16 is slower than fp32"


@functools.cache
def bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    """(whether `precision: 16` pays on `device`, why not). bf16 must be native, and on a CPU one
    bf16 matrix product of the dmc presets' hidden layers (16 x 50 rows, 400 units) must be at
    least 1.2 times as fast as in fp32; closer than that, fp32 keeps its precision. Native is not
    enough on a CPU: with AVX-512 BF16, bf16 was 2x faster than fp32 on an AMD EPYC and 2x slower
    on an Intel Xeon, whose fp32 products run on Intel's MKL. Timed once per process (~0.1 s)."""
    native, why = bf16_is_native(device)
    if not native or device.type != "cpu":
        return native, why
    rows, width = 800, 400
    seconds = matmul_seconds(rows, width)
    fp32, bf16 = seconds[torch.float32], seconds[torch.bfloat16]
    if 1.2 * bf16 > fp32:
        return False, (f"bf16 is not faster than fp32 on this CPU (one {rows}x{width} by {width}x{width} "
                       f"matrix product: bf16 {bf16 * 1e3:.2f} ms, fp32 {fp32 * 1e3:.2f} ms)")
    return True, ""


def matmul_seconds(rows: int, width: int, rounds: int = 10) -> dict:
    """{dtype: the fastest of `rounds` (rows x width) @ (width x width) products}, fp32 and bf16
    taking turns, after one untimed round. Its own generator: the run's random stream is untouched."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(rows, width, generator=gen), torch.randn(width, width, generator=gen)
    operands = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(operands, math.inf)
    for round_ in range(rounds + 1):
        for dtype, (x, y) in operands.items():
            start = time.perf_counter()
            x @ y
            if round_:
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


def keep_freed_memory() -> bool:
    """Let this process keep the memory it frees (Linux with glibc); whether the setting was made.

    glibc gives every block above 32 MB (its largest automatic mmap threshold) back to the system
    as soon as it is freed, so each update maps such buffers afresh and faults their pages in
    again: V1's heads over the whole imagined trajectory (15 x 2,500 x 400 floats, 60 MB a layer)
    and the convolutions of a pixel batch. Served from the heap, and the heap never trimmed, a CPU
    update ran up to 1.9x faster and never slower (benchmarks/RESULTS.md). What is computed is the
    same; the process keeps its peak memory. The command line calls this before building anything.
    Where any MALLOC_* variable or GLIBC_TUNABLES is set, glibc is left as the user set it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(key.startswith("MALLOC_") for key in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                   # mallopt's parameters, <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 2**30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def default_logdir(cfg: DreamerConfig) -> Path:
    name = f"{ALGO.lower()}-{cfg.env_name.replace('/', '-')}-{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


# --- Files: written atomically, loaded without running code ------------------------------------

def atomic_write(path, data: bytes) -> None:
    """Write a temporary file beside `path`, fsync, rename: a crash leaves the old file or the
    new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk, a read-only or vanished run directory
        raise CheckpointError(f"cannot write '{path}': {err.strerror or err}; the previous "
                              f"version of the file, if any, is kept") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(path, data: dict) -> None:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    atomic_write(path, buffer.getvalue())


def load_torch(file, map_location="cpu") -> dict:
    """torch.load(weights_only=True): tensors and plain containers, never code. torch.load does
    not check the zip's CRCs, so flipped bytes would load: they are checked first."""
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
        if damaged:
            raise ValueError(f"CRC-32 mismatch in {damaged}")
        data = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged, truncated, empty or malicious
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint '{file}': {reason}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"'{file}' is not a Dreamer checkpoint (no 'model' entry)")
    if str(data.get("algo", "")).lower() != ALGO.lower():
        raise OtherAlgoError(f"checkpoint '{file}' is from algo {data.get('algo')!r}; allowed here: "
                              f"{ALGO!r} (use dreamer_{str(data.get('algo')).lower()[-2:]}.py)")
    return data


def newest_checkpoint(directory: Path):
    """(path, data) of the newest checkpoint in `directory` that loads; damaged ones are skipped
    with a warning naming them."""
    for path in sorted(directory.glob("ckpt-*.pt"), reverse=True):
        try:
            return path, load_torch(path)
        except OtherAlgoError:
            raise
        except CheckpointError as err:
            print(f"warning: skipping damaged checkpoint {path}: {err}", file=sys.stderr)
    raise CheckpointError(f"'{directory}' has no usable checkpoint (ckpt-*.pt)")


def find_weights(path):
    """(file, data) for a .pt file, a run directory (its newest checkpoint), its ckpts/ or best/."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; allowed: a .pt file or a run directory")
    if path.suffix in (".yaml", ".yml"):
        raise CheckpointError(f"'{path}' is a config file, not a checkpoint; allowed: a .pt file or "
                              f"a run directory (a config goes to --config)")
    if path.is_file():
        return path, load_torch(path)
    if (path / "ckpts").is_dir():
        path = path / "ckpts"
    if (path / "model.pt").is_file():
        return path / "model.pt", load_torch(path / "model.pt")
    if path.is_dir() and any(path.glob("ckpt-*.pt")):
        return newest_checkpoint(path)
    raise CheckpointError(f"'{path}' holds no checkpoint; allowed: a run directory, its ckpts/ or "
                          f"ckpts/best/, or a .pt file")


def load_state(model: nn.Module, data: dict, file) -> None:
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as err:
        first = [line.strip() for line in str(err).splitlines() if line.strip()][1:2]
        raise CheckpointError(f"checkpoint '{file}' does not fit this model (another env or size?): "
                              f"{first[0] if first else err}") from None


# --- A run on disk: start, checkpoint, resume, stop on signals -------------------------------------

def open_run(agent: DreamerAgent) -> None:
    """Create the run directory (the first write of a run) and start the console and the logs."""
    cfg, logdir = agent.cfg, agent.logdir
    if cfg.total_steps < cfg.seed_steps and agent.step == 0:   # (at seed_steps it pretrains)
        print(f"warning: total_steps ({cfg.total_steps}) is below seed_steps ({cfg.seed_steps}): "
              f"this run only collects random actions and trains nothing; raise --total_steps",
              file=sys.stderr)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        (logdir / ".write-test").write_bytes(b"ok")
        (logdir / ".write-test").unlink()
    except OSError as err:
        raise ConfigError(f"--logdir '{logdir}' is not writable: {err.strerror}; "
                          f"allowed: a directory you can write to") from None
    cfg.to_yaml(logdir / "config.yaml")
    agent.logger.open(agent.step)
    agent.console.start(agent)


def counters(agent: DreamerAgent) -> dict:
    agent.count_nonfinite()
    return dict(env_steps=agent.step, agent_steps=agent.step // agent.cfg.action_repeat,
                episodes=agent.episodes, updates=agent.updates, evals=agent.evals,
                pretrained=agent.pretrained, last_train=agent.last_train,
                pending_updates=agent.pending_updates, nonfinite_updates=agent.nonfinite,
                consecutive_nonfinite=agent.nonfinite_in_row, best_eval=agent.best_eval,
                eval_owed=agent.eval_owed,
                schedule={k: every.last for k, every in agent.should.items()},
                replay_next=agent.replay.next_index)


def rng_states() -> dict:
    """The torch random streams that training and acting draw from (CPU, and CUDA if present)."""
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])


def save_checkpoint(agent: DreamerAgent) -> Path:
    """Everything the run needs to continue exactly: weights, optimisers, counters, RNG streams."""
    d, path = agent.dreamer, agent.logdir / "ckpts" / f"ckpt-{agent.step:010d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = dict(rng_states(), numpy=agent.rng.bit_generator.state,
               python=list(random.getstate()[1]), python_version=random.getstate()[0])
    save_torch(path, dict(d.header(), model=d.state_dict(), counters=counters(agent), rng=rng,
                          optimizers={k: o.opt.state_dict() for k, o in d.optimizers.items()}))
    for old in sorted(path.parent.glob("ckpt-*.pt"))[:-agent.cfg.keep_checkpoints]:
        old.unlink()
    return path


def resume_run(agent: DreamerAgent) -> None:
    logdir, cfg = agent.logdir, agent.cfg
    for stale in logdir.rglob(".*.tmp[0-9]*"):  # left by a run killed while writing
        print(f"warning: removing half-written file {stale}", file=sys.stderr)
        stale.unlink()
    path, data = newest_checkpoint(logdir / "ckpts")
    for name in FIXED_ON_RESUME:
        if data["config"].get(name) != getattr(cfg, name):
            raise ConfigError(f"--resume: config field '{name}' is {getattr(cfg, name)!r} but the run "
                              f"in '{logdir}' has {data['config'].get(name)!r}; a run's env and network "
                              f"sizes cannot change; allowed: its own value, or a new run")
    load_state(agent.dreamer, data, path)
    for name, opt in agent.dreamer.optimizers.items():
        opt.opt.load_state_dict(data["optimizers"][name])
    c = data["counters"]
    agent.step, agent.episodes, agent.updates, agent.evals = (c["env_steps"], c["episodes"],
                                                              c["updates"], c["evals"])
    agent.pretrained, agent.last_train, agent.pending_updates = (c["pretrained"], c["last_train"],
                                                                 c["pending_updates"])
    agent.nonfinite, agent.nonfinite_in_row = c["nonfinite_updates"], c["consecutive_nonfinite"]
    agent.best_eval, agent.eval_owed = c["best_eval"], c.get("eval_owed", False)
    set_aside_after_checkpoint(agent, c)
    for name, last in c["schedule"].items():
        agent.should[name].last = last
    set_rng_states(data["rng"])
    agent.rng.bit_generator.state = data["rng"]["numpy"]
    random.setstate((data["rng"]["python_version"], tuple(data["rng"]["python"]), None))
    print(f"resumed {logdir} at env step {agent.step} from {path}")
    if agent.step >= cfg.total_steps:
        print(f"this run is complete (total_steps {cfg.total_steps}); to train on, resume it with "
              f"a larger total: --resume {logdir} --total_steps {2 * cfg.total_steps}")


def set_aside_after_checkpoint(agent: DreamerAgent, c: dict) -> None:
    """A run killed between checkpoints (kill -9, a power cut), or resumed from an older checkpoint
    than its newest (a damaged one), has episodes and metrics lines newer than the checkpoint. The
    resumed run collects and logs those steps again, so they move to discarded/ (kept, never
    replayed): the run goes on exactly as if it had stopped at the checkpoint."""
    aside = agent.logdir / "discarded" / f"after-step-{agent.step}"
    late = agent.replay.set_aside(c["replay_next"], aside / "episodes")
    path = agent.logdir / "metrics.jsonl"
    keep, after = [], []
    for line in (path.read_text().splitlines(keepends=True) if path.exists() else []):
        (after if (json_step(line) or 0) > agent.step else keep).append(line)   # a torn line stays
    if after:
        aside.mkdir(parents=True, exist_ok=True)
        (aside / "metrics.jsonl").write_text("".join(after))
        atomic_write(path, "".join(keep).encode())
    if late or after:
        print(f"warning: {late} episode(s) and {len(after)} metrics line(s) newer than checkpoint "
              f"step {agent.step} moved to {aside}; the run collects and logs those steps again",
              file=sys.stderr)


def json_step(line: str) -> int | None:
    with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
        return json.loads(line).get("step")
    return None


@contextlib.contextmanager
def stop_on_signals(agent: DreamerAgent):
    """SIGINT/SIGTERM: say so at once; the loop then finishes the current step, stores the partial
    episode and writes a final checkpoint."""
    def handler(signum, _frame):
        agent.stop = signal.Signals(signum).name
        print(f"\n{agent.stop}: stopping after this step; writing a checkpoint", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- The console, metrics.jsonl, TensorBoard / W&B --------------------------------------------

def progress_bar(step: int, total: int, width: int = 20) -> str:
    """'[#####---------------]  25%      5,000/20,000'."""
    done = min(max(step / max(total, 1), 0.0), 1.0)
    return f"[{'#' * round(done * width)}{'-' * (width - round(done * width))}] {100 * done:3.0f}% {step:>11,}/{total:,}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Console:
    """What the terminal shows: the phase, progress, and an ETA from the measured time per env step
    (acting, in the current phase) and per update, times the env steps and updates still to come;
    a line at least every 30 s of wall time, whatever the step rate."""

    def __init__(self, cfg: DreamerConfig):
        self.cfg, self.update_time, self.last_line, self.current = cfg, None, 0.0, None
        self.phase_start = self.updating = None

    def start(self, agent) -> None:
        self.last_line, self.current = time.time(), self.phase_of(agent)
        self.phase_start, self.updating = (time.time(), agent.step), 0.0
        if agent.step < agent.cfg.total_steps:                 # a finished run has no phase left
            print(f"phase: {self.current}", flush=True)

    def phase_of(self, agent) -> str:
        cfg = agent.cfg
        if agent.step < cfg.seed_steps:
            return f"prefill, random actions until env step {cfg.seed_steps:,}"
        if agent.updates < cfg.pretrain_steps:
            return f"pretraining, {cfg.pretrain_steps} updates on the prefill"
        return f"training, {cfg.train_steps} update(s) every {cfg.train_every} env steps"

    def phase(self, agent, name: str | None) -> None:
        """An explicit phase (evaluating) until None, then back to the schedule's."""
        self.current = name or self.phase_of(agent)
        if name or agent.step < agent.cfg.total_steps:        # no new phase after the last step
            print(f"phase: {self.current}", flush=True)
        self.last_line = time.time()

    def update_seconds(self, seconds: float) -> None:
        self.update_time = seconds if self.update_time is None else 0.9 * self.update_time + 0.1 * seconds
        if self.updating is not None:
            self.updating += seconds

    def eta(self, agent) -> str:
        cfg = agent.cfg
        left_updates = agent.pending_updates + (0 if agent.pretrained else cfg.pretrain_steps) \
            + max(0, cfg.total_steps - max(agent.step, cfg.seed_steps)) // cfg.train_every * cfg.train_steps
        if left_updates and self.update_time is None:
            return "eta after the first update"
        (t0, s0), now = self.phase_start, time.time()
        per_step = (now - t0 - self.updating) / max(agent.step - s0, 1)
        seconds = (cfg.total_steps - agent.step) * per_step + left_updates * (self.update_time or 0)
        return f"eta {duration(seconds)} ({left_updates:,} updates to go)"

    def line(self, agent, shown: str = "") -> None:
        if self.phase_start is None:
            return
        phase = self.phase_of(agent) if self.current and not self.current.startswith("evaluating") else self.current
        if phase != self.current:
            self.current, self.phase_start, self.updating = phase, (time.time(), agent.step), 0.0
            print(f"phase: {phase}", flush=True)
        print(f"{progress_bar(agent.step, agent.cfg.total_steps)} {self.eta(agent)} {shown}".rstrip(), flush=True)
        self.last_line = time.time()

    def tick(self, agent) -> None:
        if self.phase_start is not None and time.time() - self.last_line >= 30:
            self.line(agent)


class Logger:
    """Averages scalars between writes and appends them to metrics.jsonl (never overwrites)."""

    SHOWN = ("train_return", "eval_return", "model_loss", "kl", "actor_loss", "value_loss", "fps")

    def __init__(self, logdir: Path, cfg: DreamerConfig):
        self.logdir, self.cfg, self.values, self.tb, self.wandb = logdir, cfg, {}, None, None
        self.start = self.start_step = None
        self.history, self.warned = [], set()

    def open(self, step: int) -> None:
        """Start appending at env step `step`; fps counts env steps from here."""
        self.start, self.start_step = time.time(), step
        path = self.logdir / "metrics.jsonl"
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as f:           # a line torn by a crash: start on a new line
                f.write("\n")
        if self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("config field 'tensorboard' is true but the tensorboard package "
                                  "is missing; allowed: false, or `pip install tensorboard`") from None
            self.tb = SummaryWriter(str(self.logdir / "tb"))
        if self.cfg.enable_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("config field 'enable_wandb' is true but wandb is missing; "
                                  "allowed: false, or `pip install wandb`") from None
            self.wandb = wandb.init(project="dreamer", config=self.cfg.to_dict(), dir=str(self.logdir))

    def scalar(self, name: str, value) -> None:
        self.values.setdefault(name, []).append(value)           # a tensor is read when written

    def write(self, step: int, console: Console | None = None, agent=None) -> dict | None:
        if not self.values:
            return None
        now = time.time()
        record = {"step": step, **{k: float(np.mean([float(x) for x in v])) for k, v in self.values.items()}}
        record.update(fps=(step - self.start_step) / max(now - self.start, 1e-9), time=now)
        if agent is not None:
            record["updates"] = agent.updates
        self.values = {}
        path = self.logdir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, a read-only or vanished run directory
            raise CheckpointError(f"cannot append to '{path}': {err.strerror or err}") from None
        shown = " ".join(f"{k} {record[k]:.3g}" for k in self.SHOWN if k in record)
        if console is not None and agent is not None:
            console.line(agent, shown)
        else:
            print(f"{progress_bar(step, self.cfg.total_steps)} {shown}", flush=True)
        for k, v in record.items():
            if self.tb:
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(record, step=step)
        self.history.append(record)
        for name, advice in pitfalls(self.history, self.cfg).items():
            if name not in self.warned:
                print(f"warning: {advice} (README: When it does not learn)", file=sys.stderr, flush=True)
                self.warned.add(name)
        return record

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


PITFALL_UPDATES = 500  # updates a symptom must last before the console names it


def pitfalls(records: list[dict], cfg: DreamerConfig) -> dict[str, str]:
    """The original documentation page's pitfalls whose symptom is unambiguous in the metrics
    records so far: {name: what it means and the documented fix}."""
    found = {}
    nonfinite = max((r.get("nonfinite_updates", 0) for r in records), default=0)
    if nonfinite:
        found["nan"] = (f"{nonfinite:.0f} update(s) had NaN/Inf losses or gradients and were skipped; "
                        f"if this repeats, lower --model_learning_rate (1e-4) or --grad_clip (10)")
    trained = [r for r in records if "kl_at_floor" in r]
    streak = next((i for i in range(len(trained), 0, -1) if trained[i - 1]["kl_at_floor"] < 1), 0)
    if trained[streak:]:
        since = trained[streak - 1].get("updates", 0) if streak else 0
        updates = trained[-1].get("updates", 0) - since
        if updates >= PITFALL_UPDATES:
            last = trained[-1]
            found["kl_floor"] = (
                f"the KL has been below free_nats ({cfg.free_nats:g}) in each of the last {updates} "
                f"updates (KL {last['kl']:.3g}; posterior entropy {last['post_entropy']:.3g}, prior "
                f"{last['prior_entropy']:.3g} nats): the KL term sends no gradient, so the prior that "
                f"imagination uses is not trained towards the posterior; lower --free_nats")
    return found


def read_metrics(logdir) -> list[dict]:
    path = Path(logdir) / "metrics.jsonl"
    records = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        with contextlib.suppress(json.JSONDecodeError):   # a line torn by a crash: skipped
            records.append(json.loads(line))
    return records


# --- Pictures: curves.png and the open-loop GIF --------------------------------------------------

PANELS = {"return": ("train_return", "eval_return"), "world model loss": ("model_loss",),
          "KL (nats)": ("kl",), "latent entropy": ("prior_entropy", "post_entropy"),
          "open-loop error": ("openloop_mse_1", "openloop_mse_5", "openloop_mse_15"),
          "actor entropy": ("actor_entropy",), "actor mean at a bound": ("actor_mean_at_bound",),
          "actor loss": ("actor_loss",), "critic loss": ("value_loss",)}


def plot_returns(ax, records, seed_steps=0, references=None, label="") -> None:
    """Training and evaluation returns against env steps (`label` before their names), the
    prefill shaded, `references` ({label: return}) as dashed lines. results/plot.py uses it too."""
    plot_panel(ax, records, PANELS["return"], seed_steps, label)
    references = references or {}
    lowest = min(references.values(), default=None)
    for name, value in references.items():
        ax.axhline(value, color="gray", linestyle="--", linewidth=1)
        below = len(references) > 1 and value == lowest  # so that two close lines' labels part
        ax.annotate(name, (0.01, value), xycoords=("axes fraction", "data"), fontsize=7,
                    textcoords="offset points", xytext=(0, -9 if below else 3))
    ax.set_ylabel("episode return")


def plot_panel(ax, records, keys, seed_steps=0, label="") -> None:
    import matplotlib.ticker as ticker
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            style = dict(marker="o", markersize=3) if key == "eval_return" else dict(alpha=0.6)
            ax.plot(*zip(*points), label=f"{label} {key.replace('_', ' ')}".strip(), **style)
    if seed_steps:
        ax.axvspan(0, seed_steps, color="gray", alpha=0.15, label="prefill")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda x, _: f"{x / 1e6:g}M" if abs(x) >= 1e6 else f"{x / 1e3:g}k" if abs(x) >= 1e3 else f"{x:g}"))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
    ax.set_xlabel("env steps")
    ax.grid(alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=7)


def plot_curves(logdir) -> Path | None:
    """curves.png: returns and the metrics that tell the pitfalls apart, against env steps."""
    import matplotlib.pyplot as plt
    fig = curves_figure(logdir)
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write(Path(logdir) / "curves.png", buffer.getvalue())
    return Path(logdir) / "curves.png"


def curves_figure(logdir):
    """The figure of curves.png, titled with the algo, env, observations, seed and run name."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(logdir)
    panels = {t: k for t, k in PANELS.items() if any(key in r for r in records for key in k)}
    if not panels:
        return None
    config = yaml.safe_load((Path(logdir) / "config.yaml").read_text()) \
        if (Path(logdir) / "config.yaml").exists() else {}
    cols = math.ceil(math.sqrt(len(panels)))             # 9 panels: 3 x 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(3.4 * cols, 2.8 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels.items()):
        if title == "return":
            plot_returns(ax, records, config.get("seed_steps", 0))
        else:
            plot_panel(ax, records, keys, config.get("seed_steps", 0))
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{ALGO} · {config.get('env', '?')} · {config.get('obs', '')} · seed {config.get('seed', '?')}"
                 f" · {Path(logdir).name}", fontsize=10)
    fig.tight_layout()
    return fig


def openloop_frames(truth, model, context: int, scale: int = 1) -> list:
    """GIF frames: rows truth / model / error, one column per sequence with a divider, a label
    column, and a red frame around the model's row once it imagines (after `context` steps).
    truth, model: (T, B, 64, 64, C) in [-0.5, 0.5]."""
    from PIL import Image, ImageDraw
    model = model.clamp(-0.5, 0.5)
    rows = torch.stack([truth, model, (model - truth + 1) / 2 - 0.5], 2)       # (T, B, 3, H, W, C)
    rows = ((rows + 0.5) * 255).clamp(0, 255).byte().cpu().numpy()
    if rows.shape[-1] == 1:
        rows = rows.repeat(3, -1)
    T, B, _, H, W, _ = rows.shape
    frames = []
    for t in range(T):
        canvas = Image.new("RGB", (48 + B * (W + 2), 14 + 3 * (H + 2)), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 1), f"step {t + 1}: " + ("context" if t < context else "imagined"), fill="black")
        for r, label in enumerate(("truth", "model", "error")):
            draw.text((2, 14 + r * (H + 2) + H // 2 - 5), label, fill="black")
            for b in range(B):
                canvas.paste(Image.fromarray(rows[t, b, r]), (48 + b * (W + 2), 14 + r * (H + 2)))
        if t >= context:
            draw.rectangle((47, 14 + H + 1, canvas.width - 1, 14 + 2 * H + 2), outline="red")
        frames.append(canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST))
    return frames


def save_gif(path: Path, frames: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=150, loop=0)
    atomic_write(path, buffer.getvalue())
    return path


# --- The command line ----------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (no usage dump), reported by main()."""

    def error(self, message):
        raise ConfigError(f"command line: {message} (see `python {Path(__file__).name} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """Every config field is a flag; its comment in DreamerConfig is its help."""
    helps = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", inspect.getsource(DreamerConfig), re.M))
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    # Values such as -1e-4 are values, not flags (Python 3.11's argparse knows only -1 and -.5).
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument("--eval_only", metavar="CKPT", help="evaluate a checkpoint or a run directory's "
                        "newest checkpoint (RUN/ckpts/best: the best evaluation's) and exit")
    parser.add_argument("--algo", help=f"accepted when it names this file's variant ({ALGO})")
    for f in fields(DreamerConfig):
        parser.add_argument(f"--{f.name}", metavar=f.type.upper(),
                            help=f"{helps.get(f.name, '')} (default: {f.default!r})")
    for alias, name in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=name, help=f"= --{name}")
    parser.set_defaults(**{f.name: None for f in fields(DreamerConfig)})
    return parser


def given_fields(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(DreamerConfig) if getattr(args, f.name) is not None}


def config_from_args(args) -> DreamerConfig:
    values = {}
    if args.algo:
        values["algo"] = args.algo
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            hint = f"; did you mean --resume {run.parent}?" if (run.parent / "config.yaml").is_file() else ""
            raise CheckpointError(f"--resume '{run}' is not a run directory (no config.yaml){hint}; "
                                  f"allowed: a directory written by a previous run")
        values.update(DreamerConfig.from_yaml(run / "config.yaml").to_dict(), logdir=str(run))
    elif args.config:
        values.update(yaml_fields(args.config))
    return DreamerConfig(**{**values, **given_fields(args)})


def yaml_fields(path) -> dict:
    """The fields a YAML file sets (only those: the preset fills the rest), checked like a config."""
    DreamerConfig.from_yaml(path)
    return yaml.safe_load(Path(path).read_text()) or {}


def main(argv=None) -> int:
    agent = None
    try:
        args, unknown = build_parser().parse_known_args([str(a) for a in (sys.argv[1:] if argv is None else argv)])
        if unknown:
            flag = next((a for a in unknown if a.startswith("-")), unknown[0])
            raise ConfigError(f"unknown argument {flag!r}: " + unknown_field(flag.lstrip("-").split("=")[0]))
        if args.eval_only:
            file, _ = find_weights(args.eval_only)
            agent = DreamerAgent.from_pretrained(file, **given_fields(args))
            episodes = max(1, agent.cfg.eval_episodes)
            score = agent.evaluate(episodes)
            print(f"eval_return {score:.2f} over {episodes} episode(s) of {file}")
            if args.logdir:
                Path(args.logdir).mkdir(parents=True, exist_ok=True)
                atomic_write(Path(args.logdir) / "eval.json", json.dumps(dict(
                    checkpoint=str(file), episodes=episodes, eval_return=score)).encode())
            return 0
        keep_freed_memory()
        agent = DreamerAgent(config_from_args(args), resume=bool(args.resume))
        precision = "bf16 autocast" if agent.cfg.precision == 16 else "fp32"
        print(f"run directory: {agent.logdir}  device: {agent.device}  precision: {precision}  "
              f"parameters: {agent.dreamer.parameter_count():,}")
        agent.train()
        return 143 if agent.stop == "SIGTERM" else 0           # SIGINT raised KeyboardInterrupt
    except (ConfigError, CheckpointError, common.EnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if agent is None or agent.stop is None:  # outside the training loop: nothing to save
            print("error: interrupted outside the training loop; nothing was lost (checkpoints and "
                  "episodes are as last written)", file=sys.stderr)
        return 130
    except NonFiniteError as err:
        save_checkpoint(agent)
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.close()


if __name__ == "__main__":
    sys.exit(main())
