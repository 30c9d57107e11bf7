"""DreamerV2 in one file: "Mastering Atari with Discrete World Models".

Hafner, Lillicrap, Norouzi, Ba. ICLR 2021. arXiv:2010.02193.

The idea. DreamerV2 keeps DreamerV1's recipe (dreamer_v1.py): learn a world model, then learn
behaviour purely in its imagination. It changes the world model and the actor so that the recipe
reaches human-level Atari: the stochastic state is 32 categorical variables of 32 classes each,
trained with straight-through gradients; the KL term is balanced so that the prior learns faster
than the posterior is regularised; a discount head predicts episode ends; the GRU is layer-normed;
the actor learns with REINFORCE on discrete actions; the critic learns against a slow target.
Every line that differs from dreamer_v1.py carries a `# V2:` comment naming the paper's section.

Run:
    python dreamer_v2.py --env atari/Pong
    python dreamer_v2.py --env dmc/walker-walk --device cuda
    python dreamer_v2.py --resume runs/<run>          # continue a stopped run
    python dreamer_v2.py --eval_only runs/<run>/ckpts # evaluate a checkpoint

Map of the file (the paper's order):
    1. Config .................. DreamerConfig, domain presets (atari, dmc), validation
    2. Distributions ........... straight-through categoricals (Alg. 1), truncated normal, two-hot
    3. Networks ................ ConvEncoder, ConvDecoder, MLP, Actor
    4. RSSM .................... categorical latents, layer-normed GRU (Sec. 2.1, Eq. 1)
    5. Losses .................. world model (Eq. 2), KL balancing (Alg. 2), lambda_return (Eq. 4),
                                 critic (Eq. 5), actor (Eq. 6)
    6. Replay .................. whole episodes as .npz files, uniform sequence sampling
    7. Dreamer, DreamerAgent ... model + optimisers + collect/train/evaluate loop, checkpoints
    8. Logging and CLI ......... metrics.jsonl, PNG curves, open-loop video GIF, main()

Tensors inside the model are time-major: (T, B, ...). Replay hands out batch-major (B, T, ...)
numpy arrays and `DreamerAgent` transposes them once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy  # V2: the slow critic is a copy of the critic
import difflib
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

# A NaN/Inf inside a forward pass must reach the loss, where `optimize` skips the step and counts
# it; torch's argument validation of distributions would raise (and end the run) instead.
torch.distributions.Distribution.set_default_validate_args(False)


# =================================================================================================
# 1. Config. Defaults are the official ones (danijar/dreamerv2, configs.yaml: the dmc preset here,
#    the atari preset in PRESETS). Every step count is in environment steps (frames after action
#    repeat), as the paper's plots are; the official V2 code counts agent steps, we convert.
# =================================================================================================

class ConfigError(ValueError):
    """A user error in the configuration (reported in one line, without a stack trace)."""


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be used (reported in one line)."""


@dataclass(init=False)
class DreamerConfig:
    # --- Algorithm and environment
    algo: str = "Dreamerv2"            # V2: this file's variant; other values are refused
    env: str = "dmc/walker-walk"       # "backend/task" (or the task alone with env_backend)
    env_backend: str = ""              # "dmc", "atari", "gym", ...; read from `env` when empty
    obs: str = "pixels"                # "pixels" (64x64 images) or "state" (vector observations)
    image_size: int = 64               # the conv stack is built for 64x64 (the seed's (64, 64))
    action_repeat: int = 2             # env steps per agent step (2 on DMC)
    time_limit: int = 1000             # episode length in env steps (DMC: 1000; 0: the env's own)
    grayscale: bool = False            # one-channel images (the atari preset turns it on)
    fast_render: bool = False          # DMC: no shadows/reflections; fast on CPU, not paper look
    seed: int = 0                      # seeds torch, numpy, python and the environments
    device: str = "auto"               # "cpu", "cuda", "cuda:N" or "auto"
    logdir: str = ""                   # run directory; empty: runs/<algo>-<env>-<seed>-<time>
    # --- World model (Sec. 2.1)
    stoch_size: int = 32               # V2: classes of each categorical latent (Sec. 2.1)
    num_categories: int = 32           # V2: number of categorical latents: z_t is 32 x 32 one-hot
    unimix: float = 0.0                # V2 option: mix this much uniform into latent probs (V3's 0.01)
    deter_size: int = 200              # GRU deterministic state h_t (atari preset: 600)
    hidden_size: int = 200             # RSSM hidden layers (atari preset: 600)
    obs_embed_size: int = 1536         # V2: conv output at depth 48 (a projection only when it differs
                                       # from the conv output); state obs: num_units wide
    cnn_depth: int = 48                # V2: channels of the first conv layer
    num_units: int = 400               # width of every MLP
    act: str = "elu"                   # MLP, CNN and RSSM activation ("silu": the seed page's)
    norm: str = "none"                 # V2: LayerNorm in the MLPs: "none" (official) or "layer"
    kl_loss_coeff: float = 1.0         # beta in Eq. (2) (atari preset: 0.1)
    kl_alpha: float = 0.8              # V2: KL balancing, weight of the prior's term (Alg. 2)
    free_nats: float = 1.0             # V2: KL below this is not penalised (atari preset: 0)
    free_avg: bool = True              # V2: free nats on the batch mean KL (else per step)
    pred_discount: bool = False        # V2: discount head, Bernoulli (atari preset: on)
    discount_scale: float = 5.0        # V2: weight of its log-likelihood (atari preset)
    reward_head: str = "mse"           # V2 paper: "mse"; "twohot": the seed's (DreamerV3) head
    twohot_bins: int = 255             # bins of the two-hot head, uniform on [-20, 20] in symlog
    clip_rewards: str = "identity"     # V2: "tanh" squashes rewards for the world model (atari)
    life_loss_discount: bool = False   # V2 option: a lost Atari life gives discount 0 in replay
    model_learning_rate: float = 3e-4  # V2: dmc 3e-4, atari 2e-4
    # --- Behaviour learning (Sec. 2.2)
    imagine_horizon: int = 15          # H, imagination steps
    discount: float = 0.99             # gamma (atari preset: 0.999)
    td_lambda: float = 0.95            # lambda in Eq. (4)
    actor_learning_rate: float = 8e-5  # atari preset: 4e-5
    value_learning_rate: float = 8e-5  # atari preset: 1e-4
    actor_grad: str = "auto"           # V2: "auto" = reinforce (discrete) / dynamics (continuous)
    actor_grad_mix: float = 0.1        # with "both": weight of the dynamics gradient (1 - rho)
    actor_entropy: float = 1e-4        # V2: entropy bonus eta in Eq. (6) (atari preset: 1e-3)
    actor_dist: str = "trunc_normal"   # V2: continuous actions: "trunc_normal" or "tanh_normal"
    actor_init_std: float = 5.0        # tanh_normal only: std = softplus(x + softplus^-1(5)) + min
    actor_min_std: float = 0.1         # V2: trunc_normal std = 2 sigmoid(x / 2) + min_std
    actor_mean_scale: float = 5.0      # tanh_normal only: mean = scale * tanh(mu / scale)
    action_noise: float = 0.0          # V2: no extra noise; the actor's own samples explore
    slow_target_update: int = 100      # V2: updates between copies of the critic to its target
    # --- Training loop
    batch_size: int = 16               # V2: sequences per batch (the paper's table says 50)
    train_seq_len: int = 50            # steps per sequence
    grad_clip: float = 100.0           # global gradient norm clip per optimiser
    adam_eps: float = 1e-5             # V2: Adam epsilon
    weight_decay: float = 1e-6         # V2: decoupled; kernels shrink by (1 - wd) per step
    seed_steps: int = 2000             # random-action prefill, env steps (atari: 200k frames)
    train_every: int = 10              # V2: one update every 5 agent steps (atari: 16 = 64 frames)
    train_steps: int = 1               # V2: gradient updates per training phase
    pretrain_steps: int = 100          # updates right after the prefill (atari preset: 1)
    total_steps: int = 5_000_000       # env steps of the whole run
    replay_capacity: int = 2_000_000   # transitions (agent steps) kept in replay, as the official
                                       # capacity counts; oldest episodes deleted, on disk too
    prioritize_ends: bool = False      # V2: oversample sequence ends (atari preset: on)
    # --- Evaluation, logging and checkpoints
    eval_every: int = 10_000           # env steps between evaluations
    eval_episodes: int = 1             # episodes per evaluation, no exploration noise
    scalar_freq: int = 1000            # env steps between metric lines
    checkpoint_interval: int = 10_000  # env steps between checkpoints
    keep_checkpoints: int = 3          # latest checkpoints kept (plus the best evaluation)
    video: bool = True                 # open-loop prediction GIF at each evaluation
    tensorboard: bool = False          # also log to TensorBoard (needs the tensorboard package)
    enable_wandb: bool = False         # also log to Weights & Biases (needs wandb)
    max_nonfinite_updates: int = 20    # consecutive NaN/Inf updates before training stops
    # --- Speed (same model code; only how it is executed changes)
    precision: int = 16                # V2: 16 = bf16 autocast on CUDA (no effect on CPU); or 32
    compile: bool = False              # torch.compile each network and the RSSM step functions

    def __init__(self, **overrides):
        """Paper defaults, then `overrides`. Fields set by the user (here or later by assignment)
        are remembered, so the domain preset never overrides them (see `resolve`)."""
        for f in fields(self):
            object.__setattr__(self, f.name, f.default)
        object.__setattr__(self, "user_set", set())
        for key, value in overrides.items():
            setattr(self, key, value)

    def __setattr__(self, name, value):
        if name in ALIASES:                   # the seed page's names for the same fields
            name = ALIASES[name]
        if name not in FIELD_TYPES:
            raise ConfigError(unknown_key_message(name))
        object.__setattr__(self, name, coerce(name, value))
        self.user_set.add(name)

    collect_steps = property(lambda self: self.train_every, doc="The seed page's train_every.")

    # --- Environment name and domain presets
    @property
    def env_name(self) -> str:
        """The canonical "backend/task" name."""
        if "/" in self.env or not self.env_backend:
            return self.env
        return f"{self.env_backend}/{self.env}"

    @property
    def backend(self) -> str:
        name = self.env_name
        if name.startswith("ALE/") or "NoFrameskip" in name:     # seed-style Atari ids
            return "atari"
        return name.split("/", 1)[0] if "/" in name else ""

    def resolve(self) -> "DreamerConfig":
        """A copy with the backend's preset applied to every field the user did not set."""
        preset = PRESETS.get(self.backend, PRESETS["default"])
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in preset.items() if k not in self.user_set})
        cfg = DreamerConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> "DreamerConfig":
        if not self.backend:
            raise ConfigError(f"config field 'env' is {self.env!r}; allowed: 'backend/task' such "
                              f"as 'dmc/walker-walk' or 'atari/Pong' (or set env_backend)")
        for name, (check, allowed) in CHECKS.items():
            value = getattr(self, name)
            if not check(value):
                raise ConfigError(f"config field '{name}' has value {value!r}; allowed: {allowed}")
        if self.algo.lower() != DreamerConfig.algo.lower():
            raise other_algo_error(self.algo)
        if self.seed_steps < self.train_seq_len:
            raise ConfigError(f"config field 'seed_steps' is {self.seed_steps}; allowed: at least "
                              f"train_seq_len ({self.train_seq_len}) so replay can give a sequence")
        return self

    # --- Serialisation (safe YAML only)
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_yaml(self, path) -> None:
        """The resolved config (preset applied), so that loading it back gives the same run."""
        atomic_write_bytes(path, yaml.safe_dump(self.resolve().to_dict(), sort_keys=False).encode())

    @classmethod
    def from_dict(cls, values: dict) -> "DreamerConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of field names to values, "
                              f"got {type(values).__name__}")
        if str(values.get("algo", cls.algo)).lower() != cls.algo.lower():  # before its own fields
            raise other_algo_error(values["algo"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path) -> "DreamerConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}; "
                              f"allowed: plain YAML, field: value per line") from None
        return cls.from_dict(values)


FIELD_TYPES = {f.name: f.type for f in fields(DreamerConfig)}
ALIASES = {"collect_steps": "train_every", "embed_size": "obs_embed_size",
           "pcont": "pred_discount", "pcont_scale": "discount_scale"}


def other_algo_error(algo) -> ConfigError:
    return ConfigError(f"config field 'algo' is {algo!r} but this is {Path(__file__).name}; "
                       f"allowed: {DreamerConfig.algo!r} (use dreamer_{str(algo).lower()[-2:]}.py "
                       f"for {algo!r})")


def unknown_key_message(name: str) -> str:
    close = difflib.get_close_matches(name, list(FIELD_TYPES) + list(ALIASES), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config field '{name}'{hint} (see `python {Path(__file__).name} --help`)"


def coerce(name: str, value):
    """Check a value's type for field `name`; accept the string forms YAML and the CLI produce."""
    kind = FIELD_TYPES[name]
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif kind == "int":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, str):          # YAML reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, str):
        return value
    raise ConfigError(f"config field '{name}' has value {value!r} of type "
                      f"{type(value).__name__}; allowed: a value of type {kind}")


ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _positive(v):
    return v > 0


def _nonnegative(v):
    return v >= 0


def _unit(v):
    return 0 <= v <= 1


CHECKS = {  # field: (check, what is allowed)
    **{name: (_positive, "> 0") for name in [
        "stoch_size", "deter_size", "hidden_size", "obs_embed_size", "cnn_depth", "num_units",
        "model_learning_rate", "actor_learning_rate", "value_learning_rate", "imagine_horizon",
        "batch_size", "train_seq_len", "grad_clip", "adam_eps", "action_repeat",
        "num_categories", "slow_target_update", "twohot_bins",  # V2
        "train_every", "train_steps", "total_steps", "replay_capacity", "eval_every",
        "scalar_freq", "checkpoint_interval", "keep_checkpoints", "actor_init_std",  # V2: no min_std
        "actor_mean_scale", "max_nonfinite_updates", "discount_scale"]},
    **{name: (_nonnegative, ">= 0") for name in [
        "free_nats", "kl_loss_coeff", "actor_entropy", "actor_min_std", "action_noise",
        "weight_decay", "seed_steps", "pretrain_steps", "eval_episodes", "seed", "time_limit"]},
    "discount": (lambda v: 0 < v <= 1, "0 < discount <= 1"),
    "kl_alpha": (_unit, "0 <= kl_alpha <= 1"),                                          # V2
    "unimix": (lambda v: 0 <= v < 1, "0 <= unimix < 1"),                                # V2
    "norm": (lambda v: v in ("none", "layer"), "'none' or 'layer'"),                    # V2
    "reward_head": (lambda v: v in ("mse", "twohot"), "'mse' or 'twohot'"),             # V2
    "clip_rewards": (lambda v: v in ("identity", "tanh"), "'identity' or 'tanh'"),      # V2
    "td_lambda": (_unit, "0 <= td_lambda <= 1"),
    "actor_grad_mix": (_unit, "0 <= actor_grad_mix <= 1"),
    "obs": (lambda v: v in ("pixels", "state"), "'pixels' or 'state'"),
    "image_size": (lambda v: v == 64, "64 (the conv stack is built for 64x64 images)"),
    "act": (lambda v: v in ACTIVATIONS, " | ".join(ACTIVATIONS)),
    "actor_grad": (lambda v: v in ("auto", "dynamics", "reinforce", "both"),  # V2: auto
                   "'auto', 'dynamics', 'reinforce' or 'both'"),
    "actor_dist": (lambda v: v in ("tanh_normal", "trunc_normal"), "'tanh_normal' or 'trunc_normal'"),
    "precision": (lambda v: v in (16, 32), "16 or 32"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
               "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    "env": (lambda v: bool(v), "a name such as 'dmc/walker-walk'"),
}

# Domain presets: overrides applied by env backend to the fields the user did not set.
# V2: the official atari and dmc configurations (configs.yaml); other backends take the dmc-like
# defaults with action repeat 1 and the env's own time limit.
PRESETS = {
    "dmc": {},
    "atari": dict(action_repeat=4, time_limit=108_000, grayscale=True, deter_size=600,  # V2
                  hidden_size=600, pred_discount=True, discount_scale=5.0, kl_loss_coeff=0.1,
                  free_nats=0.0, discount=0.999, clip_rewards="tanh", model_learning_rate=2e-4,
                  actor_learning_rate=4e-5, value_learning_rate=1e-4, actor_entropy=1e-3,
                  seed_steps=200_000, train_every=64, pretrain_steps=1, prioritize_ends=True,
                  eval_every=100_000),
    # gym, mujoco, ...: the env's own time limit; their episodes can truly end (CartPole falls,
    # Hopper tips over), so the discount head learns where (as in the official V2 defaults)
    "default": dict(action_repeat=1, time_limit=0, pred_discount=True),
}


# =================================================================================================
# 2. Distributions and small math helpers
# =================================================================================================

def straight_through_sample(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample from a categorical whose gradient is that of the softmax probabilities.

    Forward: one_hot(sample). Backward: d/dlogits of softmax(logits) (straight-through estimator,
    Bengio et al. 2013; DreamerV2 Algorithm 1). logits: (..., K) -> (..., K).
    """
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
    """Categorical over one-hot vectors for discrete actions, with straight-through rsample."""

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
    """a = tanh(u), u ~ Normal(mean, std) per dimension (DreamerV1 Eq. 3). The mode and the entropy have no
    closed form; as in the official code they are estimated from `samples` draws."""

    def __init__(self, mean, std, samples: int = 100):
        self.normal = torch.distributions.Normal(mean.float(), std.float())
        self.samples = samples

    def rsample(self, shape=()):
        return torch.tanh(self.normal.rsample(shape))

    def log_prob(self, action):
        action = action.clamp(-1 + 1e-6, 1 - 1e-6)
        u = torch.atanh(action)
        # Change of variables: log p(a) = log N(u) - log |da/du|, log(1 - tanh(u)^2) written stably.
        log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
        return (self.normal.log_prob(u) - log_det).sum(-1)

    def mode(self):
        sample = self.rsample((self.samples,))
        best = self.log_prob(sample).argmax(0)                         # most likely of the draws
        return torch.gather(sample, 0, best[None, ..., None].expand_as(sample[:1]))[0]

    def entropy(self):
        return -self.log_prob(self.rsample((self.samples,))).mean(0)


class TruncNormal:
    """Normal(mean, std) truncated to [-1, 1] per dimension (DreamerV2's continuous actor).
    Reparameterised sampling by the inverse CDF; entropy in closed form."""

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

    def log_prob(self, action):
        return (self.normal.log_prob(action) - torch.log(self.mass)).sum(-1)

    def entropy(self):
        # H = log(sqrt(2 pi e) sigma Z) + (alpha phi(alpha) - beta phi(beta)) / (2 Z)
        alpha, beta = (-1 - self.mean) / self.std, (1 - self.mean) / self.std
        phi = lambda x: torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
        entropy = (0.5 * math.log(2 * math.pi * math.e) + torch.log(self.std * self.mass)
                   + (alpha * phi(alpha) - beta * phi(beta)) / (2 * self.mass))
        return entropy.sum(-1)


# V2: symlog, symexp and two-hot come from DreamerV3 (Hafner et al. 2023, Sec. 2), where they let
# one reward head handle rewards of any scale; the seed page offers them for V2 (`reward_head:
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
    """log N(x | mean, 1) summed over the event dims that follow (T, B): the unit-variance decoder."""
    return (-0.5 * (x - mean) ** 2 - 0.5 * math.log(2 * math.pi)).flatten(2).sum(-1)


# =================================================================================================
# 3. Networks: conv encoder and transposed-conv decoder for 64x64 images, MLPs for
#    vectors, reward / value / discount heads and the actor.
# =================================================================================================

class ConvEncoder(nn.Module):
    """(..., 64, 64, C) images in [-0.5, 0.5] -> (..., embed). Four stride-2 kernel-4 convolutions
    with depth 32, 64, 128, 256 and valid padding give 256 x 2 x 2 = 1024 features."""

    def __init__(self, channels: int, depth: int = 32, embed_size: int = 1024, act=nn.ReLU):
        super().__init__()
        layers, c_in = [], channels
        for i in range(4):
            layers += [nn.Conv2d(c_in, depth * 2 ** i, 4, stride=2), act()]
            c_in = depth * 2 ** i
        self.convs = nn.Sequential(*layers, nn.Flatten())
        conv_out = c_in * 2 * 2
        # The official code uses the flattened conv output; a projection only if asked for.
        self.proj = nn.Identity() if embed_size == conv_out else nn.Linear(conv_out, embed_size)
        self.embed_size = embed_size

    def forward(self, image):
        batch = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).permute(0, 3, 1, 2)
        return self.proj(self.convs(x)).reshape(*batch, self.embed_size)


class ConvDecoder(nn.Module):
    """(..., feat) -> mean image (..., 64, 64, C). Dense to 32*depth at 1x1, then transposed convs
    with kernels 5, 5, 6, 6 and stride 2: 1 -> 5 -> 13 -> 30 -> 64 pixels."""

    def __init__(self, feat_size: int, channels: int, depth: int = 32, act=nn.ReLU):
        super().__init__()
        self.linear = nn.Linear(feat_size, 32 * depth)
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(32 * depth, 4 * depth, 5, stride=2), act(),
            nn.ConvTranspose2d(4 * depth, 2 * depth, 5, stride=2), act(),
            nn.ConvTranspose2d(2 * depth, depth, 6, stride=2), act(),
            nn.ConvTranspose2d(depth, channels, 6, stride=2))

    def forward(self, feat):
        batch = feat.shape[:-1]
        x = self.linear(feat).reshape(-1, self.linear.out_features, 1, 1)
        return self.deconvs(x).permute(0, 2, 3, 1).reshape(*batch, 64, 64, -1)


class MLP(nn.Module):
    """`layers` hidden Dense layers of `units` with activation, then a linear output layer
    (none when out_size is None: the last hidden layer, activation included, is the output)."""

    def __init__(self, in_size: int, out_size: int | None, layers: int, units: int, act=nn.ELU,
                 norm: str = "none"):                        # V2: LayerNorm option
        super().__init__()
        net = []
        for _ in range(layers):
            norm_layer = [nn.LayerNorm(units, eps=1e-3)] if norm == "layer" else []  # V2 option
            net += [nn.Linear(in_size, units), *norm_layer, act()]
            in_size = units
        out = [nn.Linear(in_size, out_size)] if out_size is not None else []
        self.net = nn.Sequential(*net, *out)

    def forward(self, x):
        return self.net(x)


def init_weights(module: nn.Module) -> None:
    """Keras' initialisers, which the official code inherits: Glorot-uniform kernels and zero
    biases (PyTorch's defaults are narrower and give random biases)."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    # V2: the layer-normed GRU (GRUCell below) is one Dense layer, initialised as above.


class Actor(nn.Module):
    """Actor p_psi(a_t | z_t) (Eq. 3): 4 x 400 MLP. V2: continuous actions from a truncated normal
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
        if self.cfg.actor_dist == "trunc_normal":
            return TruncNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.cfg.actor_min_std)  # V2
        scale = self.cfg.actor_mean_scale
        mean = scale * torch.tanh(mean / scale)
        std = F.softplus(std + self.raw_init_std) + self.cfg.actor_min_std
        return TanhNormal(mean, std)


# =================================================================================================
# 4. RSSM, the recurrent state-space model (Sec. 2.1, Eq. 1). The state is a dict of tensors:
#    deter h_t (GRU), stoch z_t (V2: sampled, flattened one-hots) and the categoricals' logits.
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
        self.categories, self.classes, self.unimix = cfg.num_categories, cfg.stoch_size, cfg.unimix
        self.act = act()                                           # V2: no Gaussian min_std
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
        """The model state the heads read: concat(s_t, h_t)."""
        return torch.cat([state["stoch"], state["deter"]], -1)

    @staticmethod
    def dist(state):  # V2: 32 independent categoricals (Sec. 2.1)
        return torch.distributions.Independent(
            torch.distributions.OneHotCategorical(logits=state["logits"].float()), 1)  # V2

    def _stats(self, x) -> dict:
        """V2: categorical latents sampled with straight-through gradients (Algorithm 1)."""
        logits = x.reshape(*x.shape[:-1], self.categories, self.classes).float()
        if self.unimix:  # optional: a floor on every class probability (DreamerV3)
            probs = (1 - self.unimix) * torch.softmax(logits, -1) + self.unimix / self.classes
            logits = torch.log(probs)
        stoch = straight_through_sample(logits).flatten(-2)
        return dict(logits=logits, stoch=stoch)

    def img_step(self, prev_state: dict, prev_action: torch.Tensor) -> dict:
        """V2: transition predictor p(z_t | h_t) (Eq. 1), after the recurrent model h_t."""
        x = self.act(self.img_in(torch.cat([prev_state["stoch"], prev_action], -1)))
        deter = self.cell(x, prev_state["deter"])     # V2 notation: h_t = f(h_{t-1}, z_{t-1}, a_{t-1})
        stats = self._stats(self.prior_head(self.act(self.img_out(deter))))
        return dict(**stats, deter=deter)

    def obs_step(self, prev_state: dict, prev_action, embed) -> tuple[dict, dict]:
        """V2: representation model q(z_t | h_t, x_t) (Eq. 1): the prior's h_t plus the observation
        embedding e_t. Returns (posterior, prior)."""
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
        return stack_states(posts), stack_states(priors)

    def imagine(self, start: dict, actor: nn.Module, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent imagination (V2 Sec. 2.2): roll the transition model forward `horizon` steps with
        actions from the actor. start: states with tensors (N, ...). Returns feats (H+1, N, F),
        the start included, and actions (H+1, N, A) where actions[t] led to feats[t] (zeros first).
        The actor sees detached features; its sampled actions carry gradients into the dynamics."""
        state, feats, actions = start, [self.feat(start)], []
        for _ in range(horizon):
            action = actor(feats[-1].detach()).rsample()
            state = self.img_step(state, action)
            feats.append(self.feat(state))
            actions.append(action)
        actions.insert(0, torch.zeros_like(actions[0]))
        return torch.stack(feats), torch.stack(actions)


def stack_states(states: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


# =================================================================================================
# 5. Losses. V2 world model: Eq. (2) with KL balancing (Algorithm 2). Behaviour: lambda-returns
#    Eq. (4), critic Eq. (5), actor Eq. (6).
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


def lambda_return(reward, value, discount, bootstrap, lambda_: float):
    """V^lambda (V2 Eq. 4) by its recursion, time-major: reward, value, discount (T, B); bootstrap (B).

        G_t = r_t + gamma_t * ((1 - lambda) * v_{t+1} + lambda * G_{t+1}),  v_T = G_T = bootstrap

    Equal to the exponentially weighted average of k-step returns (DreamerV1, Eq. 5-6).
    V2: `discount` is the learned discount gamma_hat_t (or a constant); a 0 ends the return.
    """
    next_value = torch.cat([value[1:], bootstrap[None]], 0)
    inputs = reward + discount * next_value * (1 - lambda_)
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + discount[t] * lambda_ * last
        returns.append(last)
    return torch.stack(returns[::-1])


# =================================================================================================
# 6. Replay: whole episodes as .npz files under <run>/episodes, written atomically (temporary
#    file, fsync, rename). Sequences of `train_seq_len` steps from a uniformly chosen episode.
# =================================================================================================

def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash
    leaves either the old file or the new one, never half of one."""
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
        if tmp.exists():
            tmp.unlink()


def save_episode(path, episode: dict) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **episode)
    atomic_write_bytes(path, buffer.getvalue())


def load_episode(path) -> dict | None:
    """Load an episode (never unpickling); a damaged file gives a warning naming it and None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            episode = {k: data[k] for k in data.files}
        lengths = {len(v) for v in episode.values()}
        if len(lengths) != 1 or "reward" not in episode:
            raise ValueError("arrays of different lengths")
        return episode
    except Exception as err:  # noqa: BLE001 - any damage means: skip this file
        print(f"warning: skipping damaged episode file {path}: {err}", file=sys.stderr)
        return None


class ReplayBuffer:
    """Episodes in memory and on disk, oldest dropped (from both) above `capacity` steps."""

    def __init__(self, directory, capacity: int, seq_len: int, rng: np.random.Generator,
                 prioritize_ends: bool = False):                       # V2: prioritize_ends
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity, self.seq_len, self.rng = capacity, seq_len, rng
        self.prioritize_ends = prioritize_ends                            # V2
        self.episodes: dict[str, dict] = {}                     # file name -> arrays, oldest first
        for path in sorted(self.directory.glob("*.npz")):
            episode = load_episode(path)
            if episode is not None:
                self.episodes[path.name] = episode
        self.next_index = 1 + max((int(n.split("-")[0]) for n in self.episodes), default=-1)
        self._enforce_capacity()

    @property
    def num_steps(self) -> int:
        return sum(len(ep["reward"]) - 1 for ep in self.episodes.values())

    def add(self, episode: dict) -> None:
        length = len(episode["reward"]) - 1
        name = f"{self.next_index:06d}-{length}.npz"
        save_episode(self.directory / name, episode)
        self.episodes[name] = episode
        self.next_index += 1
        self._enforce_capacity()

    def _enforce_capacity(self) -> None:
        while len(self.episodes) > 1 and self.num_steps > self.capacity:
            name = next(iter(self.episodes))
            del self.episodes[name]
            (self.directory / name).unlink(missing_ok=True)

    def can_sample(self) -> bool:
        return any(len(ep["reward"]) >= self.seq_len for ep in self.episodes.values())

    def sample(self, batch_size: int, rng: np.random.Generator | None = None) -> dict:
        """A batch of sequences, each from a uniformly chosen episode at a uniform start index
        (V2 `prioritize_ends`: starts past the last valid one are moved to it, so episode ends
        are seen more often). `rng`: a generator other than the replay's own. Returns arrays
        (B, T, ...)."""
        rng = self.rng if rng is None else rng
        usable = [ep for ep in self.episodes.values() if len(ep["reward"]) >= self.seq_len]
        if not usable:
            raise RuntimeError(f"replay has no episode of at least {self.seq_len} steps")
        chunks = []
        for i in rng.integers(0, len(usable), batch_size):
            episode = usable[i]
            last = len(episode["reward"]) - self.seq_len
            upper = last + 1 + (self.seq_len if self.prioritize_ends else 0)  # V2: prioritize ends
            start = min(rng.integers(0, upper), last)
            chunks.append({k: v[start:start + self.seq_len] for k, v in episode.items()})
        return {k: np.stack([c[k] for c in chunks]) for k in chunks[0]}


# =================================================================================================
# 7. Dreamer: world model + actor + value, the update (V1 paper, Algorithm 1), the policy; DreamerAgent:
#    environment, replay, optimisers, the collect / train / evaluate loop, checkpoints.
# =================================================================================================

class Dreamer(nn.Module):
    def __init__(self, cfg: DreamerConfig, obs_shape: tuple, action_size: int, discrete: bool):
        super().__init__()
        self.cfg, self.obs_shape = cfg, tuple(obs_shape)
        self.action_size, self.discrete = action_size, discrete
        act = ACTIVATIONS[cfg.act]
        self.obs_key = "image" if cfg.obs == "pixels" else "state"
        if self.obs_key == "image":
            channels = obs_shape[-1]
            self.encoder = ConvEncoder(channels, cfg.cnn_depth, cfg.obs_embed_size, act)  # V2: ELU
        else:  # vector observations: 4 x 400 Dense + act, the last one the embedding (as DreamerV2)
            self.encoder = MLP(obs_shape[0], None, 4, cfg.num_units, act, cfg.norm)
        embed_size = cfg.obs_embed_size if self.obs_key == "image" else cfg.num_units
        feat_size = cfg.stoch_size * cfg.num_categories + cfg.deter_size   # V2: 32 x 32 one-hots
        self.rssm = RSSM(action_size, embed_size, cfg, act)
        if self.obs_key == "image":
            self.decoder = ConvDecoder(feat_size, channels, cfg.cnn_depth, act)   # V2: ELU
        else:
            self.decoder = MLP(feat_size, obs_shape[0], 4, cfg.num_units, act, cfg.norm)
        # V2: every head is 4 x 400 (Sec. 2.1); the reward head is Gaussian, or two-hot (DreamerV3)
        self.register_buffer("bins", torch.linspace(-20, 20, cfg.twohot_bins), persistent=False)
        reward_out = cfg.twohot_bins if cfg.reward_head == "twohot" else 1
        self.reward = MLP(feat_size, reward_out, 4, cfg.num_units, act, cfg.norm)  # p(r_t | h_t, z_t)
        self.discount_head = MLP(feat_size, 1, 4, cfg.num_units, act, cfg.norm) \
            if cfg.pred_discount else None                                   # V2: p(gamma_t | h_t, z_t)
        self.actor = Actor(feat_size, action_size, discrete, cfg, act)
        self.value = MLP(feat_size, 1, 4, cfg.num_units, act, cfg.norm)    # V2: critic v_xi(z_t), Eq. 3
        self.apply(init_weights)
        # V2: a slow copy of the critic computes the targets (Sec. 2.2); copied every 100 updates.
        self.slow_value = copy.deepcopy(self.value).requires_grad_(False)
        # V2: "auto" picks REINFORCE for discrete actions and dynamics backprop for continuous ones.
        self.actor_grad = cfg.actor_grad if cfg.actor_grad != "auto" else \
            ("reinforce" if discrete else "dynamics")

    @property
    def world_model(self) -> list[nn.Module]:
        return [m for m in (self.encoder, self.rssm, self.decoder, self.reward, self.discount_head) if m]

    # --- Observation preprocessing: images x / 255 - 0.5, as in the official code
    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        if self.obs_key == "image":
            return obs.float() / 255.0 - 0.5
        return obs.float()

    # --- V2: the reward head's likelihood and mean, Gaussian (paper) or two-hot (DreamerV3)
    def reward_log_prob(self, feat, reward):
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

    # --- World-model learning (Sec. 2.1, Eq. 2)
    def world_model_loss(self, batch: dict):
        """batch: time-major tensors (T, B, ...) with obs, action, reward, discount.
        Returns (loss, posterior states, metrics)."""
        cfg = self.cfg
        obs = self.preprocess(batch[self.obs_key])
        embed = self.encoder(obs)
        post, prior = self.rssm.observe(embed, batch["action"])
        feat = self.rssm.feat(post)
        obs_like = gaussian_log_prob(obs, self.decoder(feat).float()).mean()  # ln p(x_t|h_t,z_t), Eq. (2)
        reward_like = self.reward_log_prob(feat, batch["reward"]).mean()      # ln p(r_t|h_t,z_t), Eq. (2)
        kl_term, kl_metrics = kl_loss(post, prior, cfg.free_nats, cfg.kl_loss_coeff,
                                      cfg.kl_alpha, cfg.free_avg)  # V2: beta KL balanced, Alg. 2
        loss = kl_term - obs_like - reward_like
        metrics = dict(obs_loss=-obs_like, reward_loss=-reward_like, **kl_metrics)
        if self.discount_head is not None:  # V2: ln p(gamma_t | h_t, z_t), Eq. (2), Bernoulli
            target = cfg.discount * batch["discount"]
            discount_like = -F.binary_cross_entropy_with_logits(
                self.discount_head(feat).float().squeeze(-1), target)
            loss = loss - cfg.discount_scale * discount_like
            metrics["discount_loss"] = -discount_like
        metrics["model_loss"] = loss
        with torch.no_grad():  # what tells the pitfalls apart (README, "When it does not learn")
            metrics.update(prior_entropy=RSSM.dist(prior).entropy().mean(),
                           post_entropy=RSSM.dist(post).entropy().mean(),
                           kl_at_floor=(kl_metrics["kl"] < cfg.free_nats).float())
        return loss, post, metrics

    # --- Behaviour learning in imagination (V2 Sec. 2.2)
    def imagine(self, post: dict, start_discount):       # V2: start_discount from replay
        """Imagination starts from every posterior state of the batch (T*B starts)."""
        start = {k: v.detach().flatten(0, 1) for k, v in post.items()}
        feat, action = self.rssm.imagine(start, self.actor, self.cfg.imagine_horizon)
        reward = self.reward_mean(feat)                                             # V2: head choice
        if self.discount_head is not None:
            discount = torch.sigmoid(self.discount_head(feat).float().squeeze(-1))
            # V2: the start state's discount is known from replay (0 after a true terminal).
            discount = torch.cat([self.cfg.discount * start_discount.flatten()[None], discount[1:]])
        else:
            discount = torch.full_like(reward, self.cfg.discount)
        return feat, action, reward, discount

    def actor_loss(self, feat, action, reward, discount):
        """V2 Eq. (6): maximise the lambda-returns of imagined trajectories. feat (H+1, N, F) holds
        the start z_0 and the imagined z_1..z_H; returns[t] (t < H) is V^lambda of z_t.
        Returns (loss, returns (H, N), weights (H+1, N), mean entropy)."""
        cfg = self.cfg
        value = self.slow_value(feat).float().squeeze(-1)         # V2: targets from the slow critic
        returns = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1],
                                cfg.td_lambda)                                      # V2 Eq. (4)
        # Trajectory weights: the product of the discounts before each state (stop-gradient).
        # V2: from the start state on, so a terminal start (discount 0) silences the whole rollout.
        weights = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]]), 0).detach()
        policy = self.actor(feat[:-2].detach())           # pi(. | z_t) chose the step to z_{t+1}
        objective = returns[1:]                                # dynamics backprop, Eq. (6) rho = 0
        if self.actor_grad != "dynamics":  # V2: REINFORCE, the slow critic as baseline, Eq. (6)
            advantage = (returns[1:] - value[:-2]).detach()
            reinforce = policy.log_prob(action[1:-1].detach()) * advantage
            mix = cfg.actor_grad_mix if self.actor_grad == "both" else 0.0   # V2: mix = 1 - rho
            # Pure REINFORCE leaves the returns out: no gradient runs back through imagination.
            objective = reinforce if mix == 0 else mix * returns[1:] + (1 - mix) * reinforce
        entropy = policy.entropy()
        objective = objective + cfg.actor_entropy * entropy           # V2: eta H[a_t|z_t], Eq. (6)
        return -(weights[:-2] * objective).mean(), returns, weights, entropy.mean()

    def value_loss(self, feat, returns, weights):
        """Eq. (5): regress v_xi(z_t) onto the lambda-returns (targets and states detached)."""
        value = self.value(feat[:-1].detach()).float().squeeze(-1)   # V2: the start state too
        return (weights[:-1] * 0.5 * (value - returns.detach()) ** 2).mean()

    # --- One update's forward pass
    def losses(self, batch: dict):
        """World-model, actor and value losses from one forward pass, as the official code
        computes them. batch: time-major tensors (T, B, ...). Returns (losses, metrics)."""
        model_loss, post, metrics = self.world_model_loss(batch)
        feat, action, reward, discount = self.imagine(post, batch["discount"])  # V2: true first
        actor_loss, returns, weights, entropy = self.actor_loss(feat, action, reward, discount)
        value_loss = self.value_loss(feat, returns, weights)
        metrics.update(actor_loss=actor_loss, value_loss=value_loss, actor_entropy=entropy,
                       imag_return=returns.mean(), imag_reward=reward.mean())
        return dict(model=model_loss, actor=actor_loss, value=value_loss), metrics

    def compile_parts(self) -> None:
        """The `compile` flag: torch.compile each network and the RSSM's step functions. The time
        loops stay in Python, so the three losses keep separate backward passes (compiling the
        whole update would fuse them into one backward graph)."""
        for module in (self.encoder, self.decoder, self.reward, self.discount_head, self.value,
                       self.actor.net):
            if module is not None:
                module.compile()
        torch._dynamo.config.recompile_limit = 32    # MLP.forward serves heads of many shapes
        self.rssm.img_step = torch.compile(self.rssm.img_step)
        self.rssm.obs_step = torch.compile(self.rssm.obs_step)

    @torch.no_grad()
    def openloop(self, obs, action, context: int = 5):
        """Open-loop prediction: filter the first `context` steps of a real sequence, then imagine
        the rest from the real actions alone. obs: preprocessed (T, B, ...), action (T, B, A).
        Returns the decoded predictions (T, B, ...): reconstructions for the first `context` steps,
        imagined observations after them."""
        post, _ = self.rssm.observe(self.encoder(obs[:context]), action[:context])
        state = {k: v[-1] for k, v in post.items()}
        feats = [self.rssm.feat(post)]
        for t in range(context, obs.shape[0]):
            state = self.rssm.img_step(state, action[t])
            feats.append(self.rssm.feat(state)[None])
        return self.decoder(torch.cat(feats)).float()

    # --- Acting (one environment step)
    @torch.no_grad()
    def policy_step(self, obs: torch.Tensor, state, explore: bool):
        """obs: (B, ...) one observation per env. state: (latent, previous action) or None.
        Returns (action (B, A), new state)."""
        if state is None:
            latent = self.rssm.initial(obs.shape[0], obs.device)
            prev_action = torch.zeros(obs.shape[0], self.action_size, device=obs.device)
        else:
            latent, prev_action = state
        embed = self.encoder(self.preprocess(obs))
        latent, _ = self.rssm.obs_step(latent, prev_action, embed)
        dist = self.actor(self.rssm.feat(latent))
        action = dist.rsample() if explore else dist.mode()
        if explore:
            action = self.explore(action)
        return action, (latent, action)

    def explore(self, action):
        """Exploration noise: additive Gaussian clipped to [-1, 1] (continuous) or epsilon-greedy
        with epsilon = action_noise (discrete)."""
        noise = self.cfg.action_noise
        if self.discrete:
            random_action = F.one_hot(torch.randint(0, self.action_size, action.shape[:-1],
                                                    device=action.device), self.action_size)
            use_random = torch.rand(action.shape[:-1], device=action.device)[..., None] < noise
            return torch.where(use_random, random_action.float(), action)
        return (action + noise * torch.randn_like(action)).clamp(-1, 1)

    # --- The seed page's convenience API
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def summary(self) -> dict:
        parts = dict(encoder=self.encoder, rssm=self.rssm, decoder=self.decoder,
                     reward=self.reward, discount=self.discount_head, actor=self.actor,
                     value=self.value)
        counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m}
        return dict(algo=self.cfg.algo, env=self.cfg.env_name, parameters=counts,
                    total_parameters=self.parameter_count())

    def save(self, path) -> None:
        """Weights (plus shapes) to `path` and the config to config.yaml beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(dict(algo=self.cfg.algo, config=self.cfg.to_dict(), obs_shape=list(self.obs_shape),
                        action_size=self.action_size, discrete=self.discrete,
                        model=self.state_dict()), buffer)
        atomic_write_bytes(path, buffer.getvalue())
        self.cfg.to_yaml(path.parent / "config.yaml")

    @classmethod
    def from_config(cls, config, obs_shape=None, action_size=None, discrete=None) -> "Dreamer":
        """Build from a DreamerConfig or YAML path; shapes are read from the env when not given."""
        cfg = config if isinstance(config, DreamerConfig) else DreamerConfig.from_yaml(config)
        cfg = cfg.resolve()
        if obs_shape is None:
            with make_env(cfg, seed=cfg.seed) as env:
                obs_shape, action_size, discrete = env_shapes(env, cfg)
        return cls(cfg, obs_shape, action_size, discrete)

    @classmethod
    def from_pretrained(cls, path, map_location="cpu") -> "Dreamer":
        """Load `path` (a file saved by `save`, a checkpoint, or their directory)."""
        file = find_weights(path)
        data = safe_torch_load(file, map_location)
        cfg = DreamerConfig.from_yaml(file.parent / "config.yaml") \
            if (file.parent / "config.yaml").exists() else DreamerConfig.from_dict(data["config"])
        check_algo(data, file)
        model = cls(cfg.resolve(), data["obs_shape"], data["action_size"], data["discrete"])
        load_state(model, data["model"], file)
        return model


def safe_torch_load(file, map_location="cpu") -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    try:
        if zipfile.is_zipfile(file):       # torch.load checks no CRC: flipped bytes would load
            with zipfile.ZipFile(file) as archive:
                damaged = archive.testzip()
            if damaged:
                raise ValueError(f"CRC-32 mismatch in {damaged}")
        data = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged, truncated or malicious
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint '{file}': {reason}") from None
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"'{file}' is not a Dreamer checkpoint (no 'model' entry)")
    return data


def check_algo(data: dict, file) -> None:
    if str(data.get("algo", "")).lower() != DreamerConfig.algo.lower():
        raise CheckpointError(f"checkpoint '{file}' is from algo {data.get('algo')!r}; "
                              f"allowed here: {DreamerConfig.algo!r}")


def load_state(module: nn.Module, state: dict, file) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = [line.strip() for line in str(err).splitlines() if line.strip()][1:2]
        raise CheckpointError(f"checkpoint '{file}' does not fit this model (different sizes?): "
                              f"{first[0] if first else err}") from None


def find_weights(path) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in ("model.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        ckpts = sorted(path.glob("ckpt-*.pt"))
        if ckpts:
            return ckpts[-1]
        raise CheckpointError(f"no model.pt or ckpt-*.pt in '{path}'")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    return path


def make_env(cfg: DreamerConfig, seed: int):
    options = {}
    if cfg.backend == "atari":
        options["grayscale"] = cfg.grayscale
    if cfg.backend == "dmc" and cfg.fast_render:
        options["fast_render"] = True
    return common.make_env(cfg.env_name, obs=cfg.obs, size=(cfg.image_size, cfg.image_size),
                           action_repeat=cfg.action_repeat, time_limit=cfg.time_limit or None,
                           seed=seed, **options)


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


def bf16_is_fast(device: torch.device) -> tuple[bool, str]:
    """(whether `device` computes bf16 natively, why not). GPUs from Ampere on and CPUs with bf16
    matrix instructions (x86 AVX-512 BF16 or AMX, ARM BF16) do; elsewhere bf16 is emulated in
    software, which is slower than fp32."""
    try:
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported(including_emulation=False), "this GPU has no native bf16"
        if platform.machine().lower() in ("arm64", "aarch64"):
            return torch.ops.mkldnn._is_mkldnn_bf16_supported(), "this CPU has no native bf16"
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):  # a torch build without these checks
        native = False
    return native, "this CPU has no native bf16 (AVX-512 BF16 or AMX)"


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with NaN/Inf losses or gradients."""


class DreamerAgent:
    """Environment, replay, model and optimisers, and the training loop (V1 paper, Algorithm 1)."""

    def __init__(self, cfg: DreamerConfig, logdir=None, resume: bool = False):
        self.cfg = cfg = cfg.resolve()
        self.device = pick_device(cfg.device)
        fast, why = bf16_is_fast(self.device)
        if cfg.precision == 16 and not fast:  # said once; config.yaml records what runs
            print(f"note: precision 16 runs as precision 32: {why}, and emulated bf16 is "
                  f"slower than fp32", file=sys.stderr)
            cfg.precision = 32
        self.logdir = Path(logdir or cfg.logdir or default_logdir(cfg))
        prepare_logdir(self.logdir, resume)
        if resume:                    # left by a run killed while writing (atomic_write_bytes)
            for stale in self.logdir.rglob(".*.tmp[0-9]*"):
                print(f"warning: removing half-written file {stale}", file=sys.stderr)
                stale.unlink()
        seed_everything(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = make_env(cfg, seed=cfg.seed)
        self.eval_env = None
        obs_shape, action_size, discrete = env_shapes(self.env, cfg)
        self.dreamer = Dreamer(cfg, obs_shape, action_size, discrete).to(self.device)
        d = self.dreamer
        self.optimizers = dict(
            model=self._adam([p for m in d.world_model for p in m.parameters()],
                             cfg.model_learning_rate),
            actor=self._adam(d.actor.parameters(), cfg.actor_learning_rate),
            value=self._adam(d.value.parameters(), cfg.value_learning_rate))
        self.replay = ReplayBuffer(self.logdir / "episodes", cfg.replay_capacity,
                                   cfg.train_seq_len, self.rng, cfg.prioritize_ends)  # V2
        self.counters = dict(env_steps=0, agent_steps=0, episodes=0, updates=0, evals=0,
                             pretrained=0, last_train=0, last_eval=0, last_log=0, last_ckpt=0,
                             nonfinite_updates=0, consecutive_nonfinite=0, pending_updates=0)
        self.best_eval = -math.inf
        self.logger = Logger(self.logdir, cfg)
        if cfg.compile:
            self.dreamer.compile_parts()
        self._stop_signal = None
        if resume:
            self.load_checkpoint(latest_checkpoint(self.logdir))
        cfg.to_yaml(self.logdir / "config.yaml")

    def _adam(self, params, lr):
        # Decoupled weight decay shrinks each kernel (weights of rank >= 2; not biases or norms)
        # by (1 - weight_decay) per step, as the official V2 optimiser does; AdamW multiplies
        # its weight_decay by lr, hence the division.
        params = list(params)
        decay = self.cfg.weight_decay / lr
        groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=decay),
                  dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
        kwargs = dict(fused=True) if self.device.type == "cuda" else {}
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, lr=lr, eps=self.cfg.adam_eps, **kwargs)

    # --- The update: world model, then actor, then value (V1 paper, Algorithm 1: "dynamics learning" and
    #     "behaviour learning")
    def update(self, batch: dict) -> dict:
        d = self.dreamer
        with self.autocast():
            losses, metrics = d.losses(batch)
        # Each optimiser steps only its own parameters. The actor's gradient runs back through
        # the world model, so the world model steps last, after every graph that reads it.
        finite = [self.optimize("actor", losses["actor"], [d.actor]),
                  self.optimize("value", losses["value"], [d.value]),
                  self.optimize("model", losses["model"], d.world_model)]
        metrics = {k: float(v.detach()) for k, v in metrics.items()}
        metrics["finite"] = float(all(finite))
        return metrics

    def autocast(self):
        enabled = self.cfg.precision == 16      # bf16 autocast; weights and losses stay fp32
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def optimize(self, name: str, loss: torch.Tensor, modules: list[nn.Module]) -> bool:
        """One optimiser step with gradient-norm clipping. A NaN/Inf loss or gradient never
        reaches the weights: the step is skipped (and counted by the caller). Returns finite."""
        opt = self.optimizers[name]
        params = [p for m in modules for p in m.parameters()]
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=params)          # gradients for these parameters only
        norm = nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        finite = bool(torch.isfinite(loss) & torch.isfinite(norm))
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return finite

    def train_batch(self) -> dict:
        batch = self.replay.sample(self.cfg.batch_size)
        batch = {k: torch.as_tensor(v, device=self.device).transpose(0, 1)
                 for k, v in batch.items() if k in ("image", "state", "action", "reward", "discount")}
        if self.counters["updates"] % self.cfg.slow_target_update == 0:  # V2: slow critic (Sec. 2.2)
            self.dreamer.slow_value.load_state_dict(self.dreamer.value.state_dict())
        metrics = self.update(batch)
        self.counters["updates"] += 1
        if metrics.pop("finite"):
            self.counters["consecutive_nonfinite"] = 0
        else:
            self.counters["nonfinite_updates"] += 1
            self.counters["consecutive_nonfinite"] += 1
            if self.counters["consecutive_nonfinite"] >= self.cfg.max_nonfinite_updates:
                raise NonFiniteError(
                    f"training stopped: {self.counters['consecutive_nonfinite']} consecutive "
                    f"updates had NaN/Inf losses or gradients (skipped, weights untouched). Try a "
                    f"lower learning rate (--model_learning_rate 1e-4) or tighter clipping "
                    f"(--grad_clip 10).")
        metrics["nonfinite_updates"] = self.counters["nonfinite_updates"]
        return metrics

    # --- Acting in the environment
    def act(self, obs: dict, state, explore: bool):
        x = torch.as_tensor(np.ascontiguousarray(obs[self.dreamer.obs_key][None]), device=self.device)
        with self.autocast():
            action, state = self.dreamer.policy_step(x, state, explore)
        return action[0].float().cpu().numpy(), state

    def random_action(self):
        if self.dreamer.discrete:
            return np.eye(self.dreamer.action_size, dtype=np.float32)[
                self.rng.integers(self.dreamer.action_size)]
        return self.rng.uniform(-1, 1, self.dreamer.action_size).astype(np.float32)

    # --- V1 paper, Algorithm 1: prefill, then alternate collecting and training until total_steps
    def train(self) -> dict:
        cfg, c = self.cfg, self.counters
        with self.stop_on_signals():
            while c["env_steps"] < cfg.total_steps and not self._stop_signal:
                self.run_episode()
            self.save_checkpoint()
        self.logger.write(c["env_steps"])
        plot_curves(self.logdir)
        if self._stop_signal:
            print(f"stopped by {self._stop_signal} at env step {c['env_steps']}; checkpoint saved. "
                  f"Continue with: python {Path(__file__).name} --resume {self.logdir}")
        self.logger.close()
        return dict(env_steps=c["env_steps"], episodes=c["episodes"], updates=c["updates"],
                    best_eval=self.best_eval)

    def run_episode(self) -> None:
        """One training episode: act (randomly during the prefill), train every `train_every`
        env steps, evaluate, log and checkpoint on their schedules, and store the episode. An
        interruption (signal or total_steps) stores the partial episode, so nothing is lost."""
        cfg, c = self.cfg, self.counters
        obs, _ = self.env.reset(seed=episode_seed(cfg.seed, c["episodes"]))
        episode = [transition(obs, np.zeros(self.dreamer.action_size, np.float32), 0.0, False)]
        state, score, done = None, 0.0, False
        while not done and not self._stop_signal and c["env_steps"] < cfg.total_steps:
            if c["env_steps"] < cfg.seed_steps:
                action = self.random_action()
            else:
                action, state = self.act(obs, state, explore=True)
            obs, reward, terminated, truncated, info = self.env.step(action)
            done = terminated or truncated
            ends = terminated or (cfg.life_loss_discount and info.get("life_loss", False))  # V2
            episode.append(transition(obs, action, reward, ends))
            score += reward
            if done:              # logged before this step's metrics line is written
                self.logger.scalar("train_return", score)
                self.logger.scalar("train_length", len(episode) - 1)
            c["env_steps"] += cfg.action_repeat
            c["agent_steps"] += 1
            self.maybe_train()
            if c["env_steps"] - c["last_eval"] >= cfg.eval_every and c["env_steps"] >= cfg.seed_steps:
                c["last_eval"] = c["env_steps"]
                self.evaluate()
            if c["env_steps"] - c["last_log"] >= cfg.scalar_freq:
                c["last_log"] = c["env_steps"]
                self.logger.write(c["env_steps"])
            if c["env_steps"] - c["last_ckpt"] >= cfg.checkpoint_interval:
                c["last_ckpt"] = c["env_steps"]
                self.save_checkpoint()
        if len(episode) > 1:
            self.replay.add({k: np.stack([step[k] for step in episode]) for k in episode[0]})
        if done:
            c["episodes"] += 1

    def maybe_train(self) -> None:
        cfg, c = self.cfg, self.counters
        if c["env_steps"] < cfg.seed_steps or not self.replay.can_sample():
            return
        if not c["pretrained"]:                  # once, right after the prefill
            c["pretrained"], c["last_train"] = 1, c["env_steps"]
            c["pending_updates"] += cfg.pretrain_steps
        elif c["env_steps"] - c["last_train"] >= cfg.train_every:
            c["last_train"] += cfg.train_every
            c["pending_updates"] += cfg.train_steps
        # Counted down in the checkpoint: updates cut short by a stop are made after --resume.
        while c["pending_updates"] > 0 and not self._stop_signal:
            for k, v in self.train_batch().items():
                self.logger.scalar(k, v)
            c["pending_updates"] -= 1

    @torch.no_grad()
    def evaluate(self, episodes: int | None = None) -> float:
        """Mean return over evaluation episodes with the actor's mode (no exploration noise)."""
        cfg, c = self.cfg, self.counters
        if self.eval_env is None:
            self.eval_env = make_env(cfg, seed=cfg.seed + 1)
        returns = []
        for i in range(episodes if episodes is not None else cfg.eval_episodes):
            obs, _ = self.eval_env.reset(seed=episode_seed(cfg.seed + 1, c["evals"] * 1000 + i))
            state, score, done = None, 0.0, False
            while not done and not self._stop_signal:
                action, state = self.act(obs, state, explore=False)
                obs, reward, terminated, truncated, _ = self.eval_env.step(action)
                score += reward
                done = terminated or truncated
            if done:
                returns.append(score)
        c["evals"] += 1
        plot_curves(self.logdir)                # the curves so far, redrawn at each evaluation
        if not returns:
            return float("nan")
        mean = float(np.mean(returns))
        self.logger.scalar("eval_return", mean)
        if mean > self.best_eval:
            self.best_eval = mean
            self.dreamer.save(self.logdir / "ckpts" / "best" / "model.pt")
        if self.replay.can_sample():
            self.openloop_report()
        return mean

    @torch.no_grad()
    def openloop_report(self, context: int = 5, horizons=(1, 5, 15)) -> None:
        """Open-loop predictions of 8 replay sequences (`Dreamer.openloop`), drawn with a generator
        of their own so that evaluation never changes the training batches. The mean squared
        error at imagined steps 1, 5 and 15 measures how fast imagination drifts from reality; from
        pixels, 4 of the sequences are also written as a GIF."""
        cfg, d = self.cfg, self.dreamer
        batch = self.replay.sample(8, np.random.default_rng([cfg.seed, self.counters["evals"]]))
        obs = d.preprocess(torch.as_tensor(batch[d.obs_key], device=self.device).transpose(0, 1))
        model = d.openloop(obs, torch.as_tensor(batch["action"], device=self.device).transpose(0, 1),
                           context)
        error = ((model - obs) ** 2).flatten(2).mean((1, 2))                # (T,)
        for k in horizons:
            if context + k - 1 < len(error):
                self.logger.scalar(f"openloop_mse_{k}", error[context + k - 1])
        if cfg.video and d.obs_key == "image":
            self.logger.video(obs[:, :4], model[:, :4], self.counters["env_steps"])

    # --- Checkpoints: everything needed to continue the same run
    def save_checkpoint(self) -> Path:
        c = self.counters
        path = self.logdir / "ckpts" / f"ckpt-{c['env_steps']:010d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = dict(
            algo=self.cfg.algo, config=self.cfg.to_dict(), obs_shape=list(self.dreamer.obs_shape),
            action_size=self.dreamer.action_size, discrete=self.dreamer.discrete,
            model=self.dreamer.state_dict(),
            optimizers={k: o.state_dict() for k, o in self.optimizers.items()},
            counters=dict(c), best_eval=self.best_eval,
            rng=dict(torch=torch.get_rng_state(), numpy=self.rng.bit_generator.state,
                     cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     python=list(random.getstate()[1]), python_version=random.getstate()[0]))
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        for old in sorted(path.parent.glob("ckpt-*.pt"))[:-self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def load_checkpoint(self, path) -> None:
        data = safe_torch_load(path, self.device)
        check_algo(data, path)
        load_state(self.dreamer, data["model"], path)
        for k, opt in self.optimizers.items():
            opt.load_state_dict(data["optimizers"][k])
        self.counters.update(data["counters"])
        self.best_eval = data["best_eval"]
        torch.set_rng_state(data["rng"]["torch"].cpu())
        if data["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in data["rng"]["cuda"]])
        self.rng.bit_generator.state = data["rng"]["numpy"]
        random.setstate((data["rng"]["python_version"], tuple(data["rng"]["python"]), None))
        print(f"resumed {self.logdir} at env step {self.counters['env_steps']} from {path}")

    @contextlib.contextmanager
    def stop_on_signals(self):
        """SIGINT/SIGTERM end the run cleanly: the loop notices, stores the partial episode and
        writes a final checkpoint."""
        def handler(signum, _frame):
            self._stop_signal = signal.Signals(signum).name
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # --- The seed page's convenience API
    def summary(self) -> dict:
        return self.dreamer.summary()

    @classmethod
    def from_config(cls, config, seed: int | None = None, **overrides) -> "DreamerAgent":
        cfg = config if isinstance(config, DreamerConfig) else DreamerConfig.from_yaml(config)
        for key, value in overrides.items():
            setattr(cfg, key, value)
        if seed is not None:
            cfg.seed = seed
        return cls(cfg)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "DreamerAgent":
        """An agent (env, replay in a new run directory) with the weights saved at `path`."""
        file = find_weights(path)
        model = Dreamer.from_pretrained(file)
        cfg = model.cfg
        cfg.logdir = ""                      # a new run directory, never the one the weights came from
        for key, value in overrides.items():
            setattr(cfg, key, value)
        agent = cls(cfg)
        load_state(agent.dreamer, model.state_dict(), file)
        return agent

    def close(self) -> None:
        for env in (self.env, self.eval_env):
            if env is not None:
                env.close()


def transition(obs: dict, action, reward: float, terminated: bool) -> dict:
    """One replay step: the observation, the action that led to it, the reward received on the
    way and the discount (0 after a true terminal state, 1 otherwise)."""
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


def default_logdir(cfg: DreamerConfig) -> Path:
    name = cfg.env_name.replace("/", "-")
    return Path("runs") / f"{cfg.algo.lower()}-{name}-{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_logdir(logdir: Path, resume: bool) -> None:
    if not resume and any((logdir / "ckpts").glob("ckpt-*.pt")):
        raise ConfigError(f"--logdir '{logdir}' already holds a run; allowed: a new directory, "
                          f"or continue it with --resume {logdir}")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"--logdir '{logdir}' is not writable: {err.strerror}; "
                          f"allowed: a directory you can write to") from None


def latest_checkpoint(logdir: Path) -> Path:
    """The newest checkpoint that loads; damaged ones are skipped with a warning naming them."""
    if not logdir.is_dir():
        raise CheckpointError(f"--resume '{logdir}' does not exist; allowed: a run directory")
    ckpts = sorted((logdir / "ckpts").glob("ckpt-*.pt"))
    for path in reversed(ckpts):
        try:
            safe_torch_load(path)
            return path
        except CheckpointError as err:
            print(f"warning: skipping damaged checkpoint {path}: {err}", file=sys.stderr)
    raise CheckpointError(f"--resume '{logdir}' has no usable checkpoint in ckpts/")


# =================================================================================================
# 8. Logging: metrics.jsonl, console line, PNG curves, open-loop prediction GIF; then the CLI.
# =================================================================================================

def progress(step: int, total: int, fps: float, width: int = 20) -> str:
    """The console's progress bar: '[#####---------------]  25%      5000/20000 eta 0:12:30'."""
    done = min(max(step / max(total, 1), 0.0), 1.0)
    filled = round(done * width)
    eta = "-"
    if fps > 0 and step < total:
        seconds = int((total - step) / fps)
        eta = f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"[{'#' * filled}{'-' * (width - filled)}] {100 * done:3.0f}% {step:>9d}/{total} eta {eta}"


class Logger:
    """Averages scalars between writes; appends to metrics.jsonl (never overwrites)."""

    def __init__(self, logdir: Path, cfg: DreamerConfig):
        self.logdir, self.cfg = logdir, cfg
        path = logdir / "metrics.jsonl"
        if path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as f:        # a line torn by a crash: start on a new line
                f.write("\n")
        self.values: dict[str, list] = {}
        self.start, self.start_step = time.time(), None
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("config field 'tensorboard' is true but the tensorboard package "
                                  "is missing; allowed: false, or `pip install tensorboard`") from None
            self.tb = SummaryWriter(str(logdir / "tb"))
        if cfg.enable_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("config field 'enable_wandb' is true but wandb is missing; "
                                  "allowed: false, or `pip install wandb`") from None
            self.wandb = wandb.init(project="dreamer", config=cfg.to_dict(), dir=str(logdir))

    def scalar(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(float(value))

    def write(self, step: int) -> dict | None:
        if not self.values:
            return None
        now = time.time()
        if self.start_step is None:
            self.start_step = step
        record = {"step": step, **{k: float(np.mean(v)) for k, v in self.values.items()}}
        record["fps"] = (step - self.start_step) / max(now - self.start, 1e-9)
        record["time"] = now
        self.values = {}
        path = self.logdir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, a read-only or vanished run directory
            raise CheckpointError(f"cannot append to '{path}': {err.strerror or err}") from None
        shown = " ".join(f"{k} {record[k]:.3g}" for k in
                         ("train_return", "eval_return", "model_loss", "actor_loss", "value_loss", "fps")
                         if k in record)
        print(f"{progress(step, self.cfg.total_steps, record['fps'])} {shown}", flush=True)
        if self.tb:
            for k, v in record.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(record, step=step)
        return record

    def video(self, truth, model, step: int) -> Path:
        """The open-loop GIF: truth (T, B, 64, 64, C) and model predictions in [-0.5, 0.5]. Rows:
        truth, model, error; one column per sequence."""
        model = model.clamp(-0.5, 0.5)
        error = (model - truth + 1) / 2 - 0.5
        frames = torch.cat([truth, model, error], 2)                    # (T, B, 3H, W, C)
        frames = torch.cat(list(frames.transpose(0, 1)), 2)             # (T, 3H, B*W, C)
        frames = ((frames + 0.5) * 255).clamp(0, 255).byte().cpu().numpy()
        return save_gif(self.logdir / "videos" / f"openloop-{step:010d}.gif", frames)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def save_gif(path: Path, frames: np.ndarray) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[-1] == 1:
        frames = frames[..., 0]
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_metrics(logdir) -> list[dict]:
    path = Path(logdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            with contextlib.suppress(json.JSONDecodeError):   # a line torn by a crash: skipped
                records.append(json.loads(line))
    return records


def plot_curves(logdir, keys=("train_return", "eval_return", "model_loss", "kl",
                              "actor_loss", "value_loss")) -> Path | None:
    """curves.png: one panel per metric against env steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(logdir)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    path = Path(logdir) / "curves.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (no usage dump), reported by main()."""

    def error(self, message):
        raise ConfigError(f"command line: {message} (see `python {Path(__file__).name} --help`)")


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def glue_negative_numbers(argv: list[str]) -> list[str]:
    """argparse takes a value such as '-1e-4' for a flag: write it as '--flag=-1e-4'."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_NUMBER.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config fields (CLI flags override it)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    parser.add_argument("--eval_only", metavar="CKPT", help="evaluate a checkpoint and exit")
    for f in fields(DreamerConfig):
        parser.add_argument(f"--{f.name}", default=None, metavar=f.type.upper(),
                            help=f"default: {f.default!r}")
    for alias, name in ALIASES.items():      # the seed page's and the official code's names
        parser.add_argument(f"--{alias}", dest=name, default=None, help=f"= --{name}")
    return parser


def given_fields(args) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(DreamerConfig)
            if getattr(args, f.name) is not None}


def config_from_args(args) -> DreamerConfig:
    given = given_fields(args)
    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise CheckpointError(f"--resume '{run}' is not a run directory (no config.yaml); "
                                  f"allowed: a directory written by a previous run")
        cfg = DreamerConfig.from_yaml(run / "config.yaml")
        given["logdir"] = str(run)
    elif args.config:
        cfg = DreamerConfig.from_yaml(args.config)
    else:
        cfg = DreamerConfig()
    for key, value in given.items():
        setattr(cfg, key, value)
    return cfg


def main(argv=None) -> int:
    agent = None
    try:
        argv = glue_negative_numbers([str(a) for a in (sys.argv[1:] if argv is None else argv)])
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            flag = next((a for a in unknown if a.startswith("-")), unknown[0])
            raise ConfigError(f"unknown argument {flag!r}: "
                              + unknown_key_message(flag.lstrip("-").split("=")[0]))
        if args.eval_only:
            agent = DreamerAgent.from_pretrained(args.eval_only, **given_fields(args))
            score = agent.evaluate(episodes=max(1, agent.cfg.eval_episodes))
            print(f"eval_return {score:.2f} over {max(1, agent.cfg.eval_episodes)} episode(s)")
            return 0
        agent = DreamerAgent(config_from_args(args), resume=bool(args.resume))
        precision = "bf16 autocast" if agent.cfg.precision == 16 else "fp32"
        print(f"run directory: {agent.logdir}  device: {agent.device}  precision: {precision}  "
              f"parameters: {agent.dreamer.parameter_count():,}")
        agent.train()
        return 0
    except (ConfigError, CheckpointError, common.EnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (set-up, --eval_only): nothing to save
        print("error: interrupted outside the training loop; nothing was lost (checkpoints and "
              "episodes are as last written)", file=sys.stderr)
        return 130
    except NonFiniteError as err:
        agent.save_checkpoint()
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if agent is not None:
            agent.close()


if __name__ == "__main__":
    sys.exit(main())
