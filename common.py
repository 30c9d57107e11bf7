"""Environments for the Dreamer scripts: one entry point, `make_env(name, ...)`.

Every backend returns an object with the gymnasium API and the same observation format:

    env = make_env("dmc/walker-walk", obs="pixels", seed=0)   # or "atari/Pong", "gym/Pendulum-v1", ...
    obs, info = env.reset()        # obs = {"image": uint8 (64, 64, C), "is_first": True}
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

- `obs` is a dict: "image" (uint8, H x W x C; C=1 for grayscale Atari) when obs is "pixels" or
  "both", "state" (float32 vector) when obs is "state" or "both", and "is_first" (True only on the
  observation returned by `reset`).
- `reward` is a float summed over the action repeats. `terminated` is a true end of the episode
  (the agent's discount target is 0); `truncated` is the time limit (bootstrap from the value).
- Discrete actions: `action_space` is `OneHot(n)`; `step` takes a one-hot vector (argmax is used,
  so any score vector works) or an int. Continuous actions: `Box(-1, 1, (n,))`, rescaled here to
  the environment's real bounds; values outside [-1, 1] are clipped.
- Step units: `action_repeat` and `time_limit` count *environment* steps (frames), as the papers'
  plots do: an Atari episode of 108,000 frames is 27,000 agent steps with action repeat 4.

Backends (`name` is "backend/task"):

| backend | example | action repeat | time limit (env steps) | install |
| --- | --- | --- | --- | --- |
| dmc     | dmc/walker-walk            | 2 | 1000                      | requirements.txt |
| atari   | atari/Pong (PongNoFrameskip-v4, ALE/Pong-v5) | 4 | 108000 | requirements.txt |
| gym     | gym/Pendulum-v1            | 1 | gymnasium's registered    | requirements.txt |
| mujoco  | mujoco/Hopper-v5 (-v4)     | 1 | gymnasium's registered    | requirements.txt |
| procgen | procgen/coinrun            | 1 | none (procgen's own)      | requirements-optional.txt |
| brax    | brax/ant                   | 1 | 1000                      | requirements-optional.txt |
| dmlab   | dmlab/rooms_collect_good_objects_train | 4 | none (level's own) | build from source |
| unity   | unity/path/to/env.x86_64   | 1 | none (Unity's max_step)   | requirements-optional.txt + a Unity build |

Rendering MuJoCo (dmc, mujoco) without a display needs EGL: MUJOCO_GL defaults to "egl" below,
before anything imports MuJoCo; set MUJOCO_GL=osmesa yourself to use OSMesa instead.
"""

import os

# Must be set before dm_control / gymnasium's MuJoCo envs are imported (they read it on import);
# unset, MuJoCo falls back to GLFW and fails without a display. Backends import lazily below.
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame (classic-control rendering), headless

import dataclasses
import difflib
import re

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["make_env", "EnvError", "OneHot", "BACKENDS"]

NO_LIMIT = 10**9  # `time_limit` of backends that end episodes themselves (procgen, dmlab, unity)


class EnvError(ValueError):
    """A user mistake (unknown backend, task or option) or a missing install, said in one message."""


GL_HELP = (
    "MuJoCo could not start headless OpenGL (MUJOCO_GL={gl}): {err}. Install the EGL libraries with "
    "`apt-get install -y libegl1 libgl1-mesa-dri libopengl0`, or use OSMesa: "
    "`apt-get install -y libosmesa6` and set MUJOCO_GL=osmesa."
)


def _gl_error(err):
    return EnvError(GL_HELP.format(gl=os.environ.get("MUJOCO_GL"), err=f"{type(err).__name__}: {err}"))


def _missing(package, install):
    return EnvError(f"this backend needs the package `{package}`, which is not installed: {install}")


# ----------------------------------------------------------------------------------------------
# The one-hot action space: the agent's actor outputs one-hot vectors for discrete actions.
# ----------------------------------------------------------------------------------------------


class OneHot(spaces.Space):
    """`n` discrete actions as one-hot float32 vectors of shape (n,)."""

    def __init__(self, n, seed=None):
        self.n = int(n)
        super().__init__((self.n,), np.float32, seed)

    def sample(self, mask=None, probability=None):
        vector = np.zeros(self.n, np.float32)
        vector[self.np_random.integers(self.n)] = 1.0
        return vector

    def contains(self, x):
        x = np.asarray(x)
        return x.shape == (self.n,) and bool(np.all((x == 0) | (x == 1))) and x.sum() == 1

    @property
    def is_np_flattenable(self):
        return True

    def __repr__(self):
        return f"OneHot({self.n})"

    def __eq__(self, other):
        return isinstance(other, OneHot) and other.n == self.n


# ----------------------------------------------------------------------------------------------
# The shared part of every backend: actions, action repeat, time limit, step counting, errors.
# ----------------------------------------------------------------------------------------------


class Env:
    """Base of the backends. A backend sets `action_space`, `observation_space` (and for continuous
    actions `_low`, `_high`: the real bounds) and implements four methods:

    `_reset(seed)` starts an episode; `_step(action)` advances ONE environment step and returns
    `(reward, terminated, truncated)`; `_observe()` returns the obs dict without "is_first";
    `_info()` returns the info dict of the agent step just finished. `_close()` is optional.
    """

    backend = ""
    default_action_repeat = 1
    default_time_limit = NO_LIMIT

    def __init__(self, name, obs, size, action_repeat, time_limit, seed):
        self.name, self.obs_type, self.size, self.seed = name, obs, tuple(size), seed
        self.action_repeat = int(action_repeat or self.default_action_repeat)
        self.time_limit = int(time_limit or self.default_time_limit)
        if self.action_repeat < 1 or self.time_limit < 1:
            raise EnvError(f"action_repeat and time_limit must be >= 1, got {action_repeat}, {time_limit}")
        self.episode_steps = 0  # environment steps (frames) taken in this episode
        self._seeded = False  # the constructor's seed is used by the first reset() only
        self._done = True

    # The properties the agent reads.
    @property
    def discrete(self):
        return isinstance(self.action_space, OneHot)

    @property
    def action_size(self):
        return int(self.action_space.shape[0])

    def _obs_space(self, image_channels=None, state_size=None):
        """The observation space for the requested obs type (image and/or state Boxes)."""
        entries = {}
        if self.obs_type in ("pixels", "both"):
            entries["image"] = spaces.Box(0, 255, (*self.size, image_channels), np.uint8)
        if self.obs_type in ("state", "both"):
            entries["state"] = spaces.Box(-np.inf, np.inf, (state_size,), np.float32)
        return spaces.Dict(entries)

    def _continuous(self, low, high):
        self._low = np.asarray(low, np.float64)
        self._high = np.asarray(high, np.float64)
        return spaces.Box(-1.0, 1.0, self._low.shape, np.float32)

    def _convert(self, action):
        """Agent action -> backend action: an int index, or a float vector in the real bounds."""
        if self.discrete:
            if isinstance(action, (int, np.integer)) or np.ndim(action) == 0:
                index = int(action)
            else:
                action = np.asarray(action)
                if action.shape != (self.action_size,):
                    raise EnvError(f"{self.name}: expected a one-hot action of shape ({self.action_size},), got {action.shape}")
                index = int(np.argmax(action))
            if not 0 <= index < self.action_size:
                raise EnvError(f"{self.name}: action index {index} outside [0, {self.action_size})")
            return index
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (self.action_size,):
            raise EnvError(f"{self.name}: expected an action of shape ({self.action_size},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise EnvError(f"{self.name}: action has NaN or inf entries: {action}")
        action = np.clip(action, -1.0, 1.0)
        return self._low + (action + 1.0) / 2.0 * (self._high - self._low)

    def _call(self, step, fn, *args):
        """Run a backend call; report an exception with the env name and the step, never swallow it."""
        try:
            return fn(*args)
        except EnvError:
            raise
        except Exception as err:
            raise RuntimeError(f"env {self.name} raised at step {step}: {err}") from err

    # The gymnasium API.
    def reset(self, seed=None):
        if seed is None and not self._seeded:
            seed = self.seed
        if seed is not None:
            self.action_space.seed(int(seed))
        self._seeded = True
        self.episode_steps = 0
        self._call(0, self._reset, seed)
        self._done = False
        obs = self._call(0, self._observe)
        self._call(0, self._info)  # clear per-step flags (e.g. Atari's life loss during no-ops)
        return {**obs, "is_first": True}, {}

    def step(self, action):
        if self._done:
            raise EnvError(f"{self.name}: step() called on a finished episode (or before reset()): call reset()")
        action = self._convert(action)
        reward, terminated, truncated = 0.0, False, False
        for _ in range(self.action_repeat):
            r, terminated, truncated = self._call(self.episode_steps + 1, self._step, action)
            reward += float(r)
            self.episode_steps += 1
            if self.episode_steps >= self.time_limit:
                truncated = True
            if terminated or truncated:
                break
        truncated = truncated and not terminated  # a true end wins over the time limit
        self._done = terminated or truncated
        obs = self._call(self.episode_steps, self._observe)
        info = self._call(self.episode_steps, self._info)
        return {**obs, "is_first": False}, reward, bool(terminated), bool(truncated), info

    def _info(self):
        return {}

    def close(self):
        if hasattr(self, "_env") and self._env is not None:
            try:
                self._close()
            finally:
                self._env = None

    def _close(self):
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name} obs={self.obs_type} action_repeat={self.action_repeat} "
                f"time_limit={self.time_limit} action_space={self.action_space}>")


def _resize(image, size):
    """Area-average (PIL's BOX filter, like OpenCV's INTER_AREA) resize of an (H, W, C) or (H, W)
    uint8 image to (h, w, C)."""
    from PIL import Image

    image = np.asarray(image, np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[:2] == tuple(size):
        return np.ascontiguousarray(image)
    channels = [image] if image.shape[-1] == 3 else [image[..., c] for c in range(image.shape[-1])]
    resized = [np.asarray(Image.fromarray(c).resize(size[::-1], Image.Resampling.BOX)) for c in channels]
    return np.ascontiguousarray(resized[0] if image.shape[-1] == 3 else np.stack(resized, -1))


def _flat_state(values):
    """Concatenate observation arrays (a dict in its own key order, or one array) to float32."""
    if isinstance(values, dict):
        values = list(values.values())
    else:
        values = [values]
    return np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in values])


# ----------------------------------------------------------------------------------------------
# dmc: DeepMind Control Suite (dm_control).
# ----------------------------------------------------------------------------------------------


class DMC(Env):
    """`dmc/<domain>-<task>`, e.g. dmc/walker-walk, dmc/ball_in_cup-catch.

    Pixels come from `physics.render` at `size` from `camera` (quadruped: 2, else 0, as Dreamer).
    `state` is the suite's observation dict flattened in the suite's own key order. Our time limit
    is the authority: the suite is loaded with time_limit=inf and we truncate after 1000 env steps.
    DMC tasks have no true terminal states, so `terminated` is always False here.
    `fast_render=True` turns off shadows, reflections and multisampling: about 7x faster on CPU
    (FACTS.md), images stay meaningful; paper reproductions keep the default look.
    """

    backend = "dmc"
    default_action_repeat = 2
    default_time_limit = 1000
    options = {"camera": None, "fast_render": False}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, camera, fast_render):
        super().__init__(f"dmc/{task}", obs, size, action_repeat, time_limit, seed)
        try:
            from dm_control import suite
        except ModuleNotFoundError as err:
            raise _missing(err.name, "pip install -r requirements.txt") from err
        except Exception as err:  # dm_control starts the MUJOCO_GL backend on import
            raise _gl_error(err) from err
        domain, _, task_name = task.partition("-")
        if (domain, task_name) not in suite.ALL_TASKS:
            known = sorted(f"{d}-{t}" for d, t in suite.ALL_TASKS)
            close = difflib.get_close_matches(task, known, n=3)
            raise EnvError(f"unknown dmc task {task!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                           + f"; the suite has: {', '.join(known)}")
        self._env = suite.load(domain, task_name, task_kwargs={"random": seed, "time_limit": float("inf")})
        self._camera = camera if camera is not None else (2 if domain == "quadruped" else 0)
        self._render_flags = None
        if fast_render:
            self._env.physics.model.vis.quality.offsamples = 0  # no multisampling
            self._render_flags = {"shadow": False, "reflection": False}
        spec = self._env.action_spec()
        self.action_space = self._continuous(spec.minimum, spec.maximum)
        state_size = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
        self.observation_space = self._obs_space(3, state_size)
        self._time_step = None

    def _reset(self, seed):
        if seed is not None:
            self._env.task._random = np.random.RandomState(seed)  # the suite draws initial states from it
        self._time_step = self._env.reset()

    def _step(self, action):
        self._time_step = self._env.step(action)
        last = self._time_step.last()
        terminated = last and self._time_step.discount == 0  # does not happen in the suite's tasks
        return self._time_step.reward or 0.0, terminated, last and not terminated

    def _observe(self):
        obs = {}
        if "image" in self.observation_space.spaces:
            try:
                obs["image"] = self._env.physics.render(*self.size, camera_id=self._camera,
                                                        render_flag_overrides=self._render_flags)
            except Exception as err:
                raise _gl_error(err) from err
        if "state" in self.observation_space.spaces:
            obs["state"] = _flat_state(self._time_step.observation)
        return obs


# ----------------------------------------------------------------------------------------------
# atari: the Arcade Learning Environment (ale-py) with DreamerV2's preprocessing done here.
# ----------------------------------------------------------------------------------------------

# Seed-style ids ("PongNoFrameskip-v4", "Pong-v5", "ALE/Pong-v5", "Pong-ramDeterministic-v4") name
# a game; we map them to our wrapper with the paper's settings (sticky actions 0.25, no-ops, max-pool,
# 108k frames), NOT the settings that id has in gymnasium (e.g. PongNoFrameskip-v4 has no sticky
# actions). Pass options (e.g. sticky_actions=0.0) to change them.
_ATARI_ID = re.compile(r"^(?:ALE/)?([A-Za-z0-9_]+?)(?:-ram)?(?:NoFrameskip|Deterministic)?(?:-v\d+)?$")


def _atari_games():
    import ale_py

    gym.register_envs(ale_py)
    return sorted(k[4:-3] for k in gym.registry if k.startswith("ALE/") and k.endswith("-v5") and "-ram" not in k)


class Atari(Env):
    """`atari/<Game>`, e.g. atari/Pong, atari/Breakout (also PongNoFrameskip-v4 style ids).

    ALE runs with frameskip 1 and sticky actions inside ALE; here: action repeat 4 with a max over
    the last two raw frames (removes sprite flicker), area resize 210x160 -> 64x64, grayscale by
    default, 1..noops random no-op steps at reset (count from the env's seeded RNG; not counted in
    the time limit), info["life_loss"] (True on the agent step that lost a life; not an episode end
    unless `terminal_on_life_loss`), 108,000-frame limit (27,000 agent steps), minimal action set.
    obs="state" gives the 128-byte RAM scaled to [0, 1].
    """

    backend = "atari"
    default_action_repeat = 4
    default_time_limit = 108_000
    options = {"grayscale": True, "sticky_actions": 0.25, "noops": 30, "full_action_space": False,
               "terminal_on_life_loss": False}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, grayscale, sticky_actions, noops,
                 full_action_space, terminal_on_life_loss):
        games = _atari_games()
        match = _ATARI_ID.match(task)
        by_key = {g.lower().replace("_", ""): g for g in games}
        game = by_key.get(match.group(1).lower().replace("_", "")) if match else None
        if game is None:
            close = difflib.get_close_matches(task, games, n=5, cutoff=0.5)
            raise EnvError(f"unknown atari game {task!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                           + f"; ale-py has {len(games)} games: {', '.join(games)}")
        super().__init__(f"atari/{game}", obs, size, action_repeat, time_limit, seed)
        self._env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=float(sticky_actions),
                             full_action_space=bool(full_action_space), obs_type="grayscale" if grayscale else "rgb",
                             max_num_frames_per_episode=None, max_episode_steps=None, disable_env_checker=True)
        self._ale = self._env.unwrapped.ale
        assert self._env.unwrapped.get_action_meanings()[0] == "NOOP"
        self._noops, self._terminal_on_life_loss = int(noops), bool(terminal_on_life_loss)
        self.action_space = OneHot(self._env.action_space.n)
        self.observation_space = self._obs_space(1 if grayscale else 3, 128)
        self._frames = [None, None]  # the last two raw frames, for the max-pool
        self._lives, self._life_loss = 0, False

    def _raw(self, action):
        frame, reward, terminated, truncated, _ = self._env.step(action)
        self._frames = [self._frames[1], frame]
        return reward, terminated, truncated

    def _reset(self, seed):
        frame, _ = self._env.reset(seed=seed)
        self._frames = [frame, frame]
        if self._noops > 0:
            for _ in range(self._env.unwrapped.np_random.integers(1, self._noops + 1)):
                _, terminated, truncated = self._raw(0)
                if terminated or truncated:
                    frame, _ = self._env.reset()
                    self._frames = [frame, frame]
        self._lives = self._ale.lives()

    def _step(self, action):
        reward, terminated, truncated = self._raw(action)
        lives = self._ale.lives()
        if lives < self._lives:
            self._life_loss = True
            terminated = terminated or self._terminal_on_life_loss
        self._lives = lives
        return reward, terminated, truncated

    def _observe(self):
        obs = {}
        if "image" in self.observation_space.spaces:
            obs["image"] = _resize(np.maximum(self._frames[0], self._frames[1]), self.size)
        if "state" in self.observation_space.spaces:
            obs["state"] = self._ale.getRAM().astype(np.float32) / 255.0
        return obs

    def _info(self):
        info = {"life_loss": self._life_loss, "lives": self._lives}
        self._life_loss = False
        return info


# ----------------------------------------------------------------------------------------------
# gym and mujoco: any gymnasium environment.
# ----------------------------------------------------------------------------------------------


class Gym(Env):
    """`gym/<id>`: any gymnasium id, e.g. gym/Pendulum-v1, gym/CartPole-v1.

    Pixels: `render_mode="rgb_array"`, area-resized to `size`. State: the observation flattened to
    float32. Discrete(n) actions -> OneHot(n); Box actions -> [-1, 1]. Time limit: gymnasium's
    registered `max_episode_steps` (ours replaces its TimeLimit wrapper). `env_kwargs` go to gym.make.
    """

    backend = "gym"
    options = {"env_kwargs": None}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, env_kwargs, render_kwargs=None):
        try:
            spec = gym.spec(task)
        except gym.error.Error as err:
            known = sorted(gym.registry)
            close = difflib.get_close_matches(task, known, n=5)
            raise EnvError(f"unknown gymnasium id {task!r}: {err}" + (f"; did you mean {', '.join(close)}?" if close else "")
                           + " (gymnasium.pprint_registry() lists them)") from err
        self.default_time_limit = spec.max_episode_steps or NO_LIMIT
        super().__init__(f"{self.backend}/{spec.id}", obs, size, action_repeat, time_limit, seed)
        kwargs = dict(env_kwargs or {})
        if obs in ("pixels", "both"):
            kwargs.update(render_mode="rgb_array", **(render_kwargs or {}))
        # Make from a copy of the spec without max_episode_steps: no gymnasium TimeLimit wrapper, so
        # our `time_limit` is the only one (and `truncated` always means it).
        spec = dataclasses.replace(spec, max_episode_steps=None)
        self._env = gym.make(spec, disable_env_checker=True, **kwargs)
        act = self._env.action_space
        if isinstance(act, spaces.Discrete):
            self.action_space, self._start = OneHot(act.n), int(act.start)
        elif isinstance(act, spaces.Box) and np.all(np.isfinite(act.low)) and np.all(np.isfinite(act.high)):
            self.action_space = self._continuous(act.low.reshape(-1), act.high.reshape(-1))
            self._shape, self._dtype = act.shape, act.dtype
        else:
            raise EnvError(f"{self.name}: action space {act} is not supported (Discrete or bounded Box only)")
        self._obs_space_raw = self._env.observation_space
        self.observation_space = self._obs_space(3, int(spaces.flatdim(self._obs_space_raw)))
        self._obs = None

    def _reset(self, seed):
        self._obs, _ = self._env.reset(seed=seed)

    def _step(self, action):
        if self.discrete:
            action = action + self._start
        else:
            action = action.reshape(self._shape).astype(self._dtype)
        self._obs, reward, terminated, truncated, _ = self._env.step(action)
        return reward, terminated, truncated

    def _observe(self):
        obs = {}
        if "image" in self.observation_space.spaces:
            obs["image"] = _resize(self._render(), self.size)
        if "state" in self.observation_space.spaces:
            obs["state"] = spaces.flatten(self._obs_space_raw, self._obs).astype(np.float32)
        return obs

    def _render(self):
        return self._env.render()


class MuJoCo(Gym):
    """`mujoco/<id>`: gymnasium's MuJoCo environments, e.g. mujoco/Hopper-v5, mujoco/Humanoid-v5.

    `-v4` ids are gymnasium's own (still registered) v4 environments, not mapped to v5; `-v2`/`-v3`
    need the retired mujoco-py and are refused; a bare name (mujoco/Hopper) means -v5. Pixels are
    rendered at `size` directly (width/height passed to the env), with the env's default camera or
    `env_kwargs={"camera_id": ...}`; `fast_render` as for dmc.
    """

    backend = "mujoco"
    options = {"env_kwargs": None, "fast_render": False}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, env_kwargs, fast_render):
        base, _, version = task.partition("-v")
        task = task if version else f"{base}-v5"
        # v2/v3 entry points are a function that raises "needs mujoco-py": match on "mujoco" in its name too
        mujoco_ids = sorted(k for k, s in gym.registry.items() if "mujoco" in str(s.entry_point))
        if task not in mujoco_ids:
            close = difflib.get_close_matches(task, mujoco_ids, n=3)
            raise EnvError(f"unknown mujoco id {task!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                           + f"; gymnasium has: {', '.join(i for i in mujoco_ids if i.endswith(('-v4', '-v5')))}")
        if version in ("2", "3"):
            raise EnvError(f"mujoco/{task} needs mujoco-py (retired, not installable here): use {base}-v5 (or -v4)")
        super().__init__(task, obs, size, action_repeat, time_limit, seed, env_kwargs,
                         render_kwargs={"width": size[1], "height": size[0]})
        self._fast_render = fast_render
        if fast_render:  # as dmc's fast_render; multisampling is fixed when the GL context is made
            self._env.unwrapped.model.vis.quality.offsamples = 0

    def _render(self):  # gymnasium starts GL at the first render
        try:
            if self._fast_render:  # gymnasium keeps one offscreen viewer: switch its scene flags off
                import mujoco

                scene = self._env.unwrapped.mujoco_renderer._get_viewer("rgb_array").scn
                scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            return self._env.render()
        except Exception as err:
            raise _gl_error(err) from err


# ----------------------------------------------------------------------------------------------
# Optional backends: procgen, brax, dmlab, unity (see requirements-optional.txt).
# ----------------------------------------------------------------------------------------------

PROCGEN_INSTALL = ("pip install --no-deps procgen2==0.10.7 gym3==0.3.3 gym==0.26.2 gym_notices cffi pycparser "
                   "(see requirements-optional.txt: procgen2 declares numpy<2, --no-deps keeps our numpy 2)")


class Procgen(Env):
    """`procgen/<game>`, e.g. procgen/coinrun: native 64x64 RGB, 15 discrete actions.

    Runs `procgen.ProcgenGym3Env(num=1)`. gym3 resets episodes by itself, so the observation after a
    terminal step is already the next episode's first frame (gym3 does not expose the last one);
    every episode end, including procgen's internal time-out, is reported as `terminated`.
    A reset() in the middle of an episode starts a fresh env with the next seed from our RNG.
    """

    backend = "procgen"
    options = {"num_levels": 0, "start_level": 0, "distribution_mode": "hard"}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, **kwargs):
        try:
            import procgen
        except ModuleNotFoundError as err:
            raise _missing("procgen (procgen2)", PROCGEN_INSTALL) from err
        if task not in procgen.env.ENV_NAMES:
            raise EnvError(f"unknown procgen game {task!r}; procgen has: {', '.join(procgen.env.ENV_NAMES)}")
        if obs != "pixels":
            raise EnvError(f"procgen/{task} has pixel observations only: use obs='pixels'")
        super().__init__(f"procgen/{task}", obs, size, action_repeat, time_limit, seed)
        self._procgen, self._task, self._kwargs = procgen, task, kwargs
        self._rng = np.random.default_rng(seed)
        self._env, self._fresh = None, False
        self._new_env()
        self.action_space = OneHot(self._env.ac_space.eltype.n)
        self.observation_space = self._obs_space(3)

    def _new_env(self):
        self._env = self._procgen.ProcgenGym3Env(num=1, env_name=self._task, num_threads=0,
                                                 rand_seed=int(self._rng.integers(2**31 - 1)), **self._kwargs)
        self._fresh = True

    def _reset(self, seed):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if seed is not None or not self._fresh:
            self._new_env()
        self._fresh = False

    def _step(self, action):
        self._env.act(np.array([action]))
        reward, _, first = self._env.observe()
        self._fresh = bool(first[0])  # gym3 already started the next episode
        return float(reward[0]), bool(first[0]), False

    def _observe(self):
        return {"image": _resize(self._env.observe()[1]["rgb"][0], self.size)}

    def _close(self):
        pass  # gym3 envs free themselves


class Brax(Env):
    """`brax/<env>`, e.g. brax/ant: brax on JAX (CPU or GPU), state observations, actions in [-1, 1].

    Runs one env with jit-compiled reset/step (the first call compiles: seconds). `terminated` is
    brax's `done`; our `time_limit` (default 1000, brax's episode length) truncates.
    """

    backend = "brax"
    default_time_limit = 1000
    options = {"backend": None}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, backend):
        try:
            import jax
            from brax import envs
        except ModuleNotFoundError as err:
            raise _missing("brax", "pip install brax==0.14.2 jax[cpu]==0.10.2 (see requirements-optional.txt)") from err
        known = sorted(envs._envs)
        if task not in known:
            raise EnvError(f"unknown brax env {task!r}; brax has: {', '.join(known)}")
        if obs != "state":
            raise EnvError(f"brax/{task} has state observations only: use obs='state'")
        super().__init__(f"brax/{task}", obs, size, action_repeat, time_limit, seed)
        self._jax = jax
        self._env = envs.create(task, episode_length=None, auto_reset=False,
                                **({"backend": backend} if backend else {}))
        self._reset_fn, self._step_fn = jax.jit(self._env.reset), jax.jit(self._env.step)
        self._key = jax.random.PRNGKey(seed or 0)
        self.action_space = self._continuous(-np.ones(self._env.action_size), np.ones(self._env.action_size))
        self.observation_space = self._obs_space(state_size=int(self._env.observation_size))
        self._state = None

    def _reset(self, seed):
        if seed is not None:
            self._key = self._jax.random.PRNGKey(seed)
        self._key, key = self._jax.random.split(self._key)
        self._state = self._reset_fn(key)

    def _step(self, action):
        self._state = self._step_fn(self._state, self._jax.numpy.asarray(action, np.float32))
        return float(self._state.reward), bool(self._state.done), False

    def _observe(self):
        return {"state": np.asarray(self._state.obs, np.float32).reshape(-1)}

    def _close(self):
        pass


DMLAB_INSTALL = ("DeepMind Lab has no wheel on PyPI: build it from source (github.com/deepmind/lab, "
                 "`bazel build -c opt //python/pip_package:build_pip_package`, then pip install the built "
                 "deepmind_lab wheel into this venv); see requirements-optional.txt")

# The IMPALA action set (Espeholt et al., 2018) over DMLab's 7 integer action axes:
# (look left/right, look up/down, strafe left/right, forward/backward, fire, jump, crouch).
DMLAB_ACTIONS = np.array([
    (0, 0, 0, 1, 0, 0, 0),    # forward
    (0, 0, 0, -1, 0, 0, 0),   # backward
    (0, 0, -1, 0, 0, 0, 0),   # strafe left
    (0, 0, 1, 0, 0, 0, 0),    # strafe right
    (-20, 0, 0, 0, 0, 0, 0),  # look left
    (20, 0, 0, 0, 0, 0, 0),   # look right
    (-20, 0, 0, 1, 0, 0, 0),  # look left + forward
    (20, 0, 0, 1, 0, 0, 0),   # look right + forward
    (0, 0, 0, 0, 1, 0, 0),    # fire
], dtype=np.intc)


class DMLab(Env):
    """`dmlab/<level>`, e.g. dmlab/rooms_collect_good_objects_train: DeepMind Lab via `deepmind_lab`.

    RGB_INTERLEAVED frames rendered at `size`, the 9-action IMPALA action set as OneHot(9), action
    repeat 4; the level ends the episode (`terminated`) when `is_running()` turns False.
    """

    backend = "dmlab"
    default_action_repeat = 4
    options = {"renderer": "software"}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, renderer):
        try:
            import deepmind_lab
        except ModuleNotFoundError as err:
            raise _missing("deepmind_lab", DMLAB_INSTALL) from err
        if obs != "pixels":
            raise EnvError(f"dmlab/{task}: only obs='pixels' is wrapped")
        super().__init__(f"dmlab/{task}", obs, size, action_repeat, time_limit, seed)
        config = {"width": str(size[1]), "height": str(size[0]), "logLevel": "WARN"}
        self._env = deepmind_lab.Lab(task, ["RGB_INTERLEAVED"], config=config, renderer=renderer)
        self._rng = np.random.default_rng(seed)
        self.action_space = OneHot(len(DMLAB_ACTIONS))
        self.observation_space = self._obs_space(3)
        self._last = None

    def _reset(self, seed):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._env.reset(seed=int(self._rng.integers(2**31 - 1)))
        self._last = self._env.observations()["RGB_INTERLEAVED"]

    def _step(self, action):
        reward = self._env.step(DMLAB_ACTIONS[action], num_steps=1)
        running = self._env.is_running()
        if running:  # observations() is not available after the episode ended: keep the last frame
            self._last = self._env.observations()["RGB_INTERLEAVED"]
        return reward, not running, False

    def _observe(self):
        return {"image": _resize(self._last, self.size)}


UNITY_INSTALL = ("pip install mlagents_envs==0.28.0 protobuf==3.20.3 (the newest mlagents_envs for Python 3.11; "
                 "see requirements-optional.txt)")


class Unity(Env):
    """`unity/<path to a Unity build>`, e.g. unity/builds/3DBall.x86_64, via `mlagents_envs`.

    The first behavior's first agent is driven. Visual observations (float in [0, 1]) become the
    image (the first one, resized); vector observations are concatenated into `state`. Actions:
    continuous (Unity's [-1, 1]) or one discrete branch (OneHot). An agent reaching Unity's
    max_step (`interrupted`) is `truncated`; other episode ends are `terminated`.
    """

    backend = "unity"
    options = {"worker_id": 0, "no_graphics": None, "timeout_wait": 60}

    def __init__(self, task, obs, size, action_repeat, time_limit, seed, worker_id, no_graphics, timeout_wait):
        if not os.path.exists(task):
            raise EnvError(f"no Unity build at {task!r}: build your environment with the Unity editor (ML-Agents "
                           f"toolkit, 'File > Build' for Linux) and pass its path, e.g. unity/builds/3DBall.x86_64")
        try:
            from mlagents_envs.base_env import ActionTuple
            from mlagents_envs.environment import UnityEnvironment
        except ModuleNotFoundError as err:
            raise _missing("mlagents_envs", UNITY_INSTALL) from err
        super().__init__(f"unity/{task}", obs, size, action_repeat, time_limit, seed)
        self._ActionTuple = ActionTuple
        if no_graphics is None:
            no_graphics = obs == "state"
        self._env = UnityEnvironment(file_name=task, seed=seed or 0, worker_id=worker_id,
                                     no_graphics=no_graphics, timeout_wait=timeout_wait)
        self._env.reset()
        self._behavior = list(self._env.behavior_specs)[0]
        spec = self._env.behavior_specs[self._behavior]
        shapes = [tuple(o.shape) for o in spec.observation_specs]
        self._visual = [i for i, s in enumerate(shapes) if len(s) == 3]
        self._vector = [i for i, s in enumerate(shapes) if len(s) == 1]
        if obs in ("pixels", "both") and not self._visual:
            raise EnvError(f"{self.name} has no visual observation: use obs='state'")
        if obs in ("state", "both") and not self._vector:
            raise EnvError(f"{self.name} has no vector observation: use obs='pixels'")
        action_spec = spec.action_spec
        if action_spec.continuous_size > 0 and not action_spec.discrete_branches:
            self.action_space = self._continuous(-np.ones(action_spec.continuous_size), np.ones(action_spec.continuous_size))
        elif action_spec.continuous_size == 0 and len(action_spec.discrete_branches) == 1:
            self.action_space = OneHot(action_spec.discrete_branches[0])
        else:
            raise EnvError(f"{self.name}: only a continuous or a single discrete action branch is wrapped, got {action_spec}")
        channels = shapes[self._visual[0]][-1] if self._visual else None
        self.observation_space = self._obs_space(channels, sum(shapes[i][0] for i in self._vector))
        self._obs, self._agent = None, None

    def _read(self, steps, agent):
        return [np.asarray(o[steps.agent_id_to_index[agent]]) for o in steps.obs]

    def _reset(self, seed):
        self._env.reset()
        decision, _ = self._env.get_steps(self._behavior)
        self._agent = decision.agent_id[0]
        self._obs = self._read(decision, self._agent)

    def _step(self, action):
        if self.discrete:
            act = self._ActionTuple(discrete=np.array([[action]], np.int32))
        else:
            act = self._ActionTuple(continuous=np.asarray(action, np.float32)[None])
        self._env.set_action_for_agent(self._behavior, self._agent, act)
        self._env.step()
        decision, terminal = self._env.get_steps(self._behavior)
        if self._agent in terminal.agent_id_to_index:
            self._obs = self._read(terminal, self._agent)
            interrupted = bool(terminal.interrupted[terminal.agent_id_to_index[self._agent]])
            reward = terminal.reward[terminal.agent_id_to_index[self._agent]]
            return float(reward), not interrupted, interrupted
        self._obs = self._read(decision, self._agent)
        return float(decision.reward[decision.agent_id_to_index[self._agent]]), False, False

    def _observe(self):
        obs = {}
        if "image" in self.observation_space.spaces:
            image = np.clip(self._obs[self._visual[0]] * 255.0, 0, 255).astype(np.uint8)
            obs["image"] = _resize(image, self.size)
        if "state" in self.observation_space.spaces:
            obs["state"] = _flat_state([self._obs[i] for i in self._vector])
        return obs


# ----------------------------------------------------------------------------------------------
# The entry point.
# ----------------------------------------------------------------------------------------------

BACKENDS = {"dmc": DMC, "atari": Atari, "gym": Gym, "mujoco": MuJoCo, "procgen": Procgen, "brax": Brax,
            "dmlab": DMLab, "unity": Unity}
OBS_TYPES = ("pixels", "state", "both")


def _split_name(name):
    """"backend/task" -> (backend, task); seed-style Atari ids ("PongNoFrameskip-v4", "ALE/Pong-v5")
    -> ("atari", id)."""
    if not isinstance(name, str) or not name:
        raise EnvError(f"env name must be a string 'backend/task', got {name!r}")
    backend, slash, task = name.partition("/")
    if backend == "ALE":
        return "atari", name
    if not slash and re.fullmatch(r"[A-Za-z0-9]+(-ram)?(NoFrameskip|Deterministic)?-v[045]", name):
        return "atari", name
    if not slash or not task:
        raise EnvError(f"env name {name!r} must look like 'backend/task' (e.g. dmc/walker-walk, atari/Pong); "
                       f"backends: {', '.join(BACKENDS)}")
    return backend, task


def make_env(name, obs="pixels", size=(64, 64), action_repeat=None, time_limit=None, seed=None, **options):
    """Make the environment `name` ("backend/task"); see the module docstring for the interface.

    obs: "pixels", "state" or "both". size: (height, width) of images. action_repeat / time_limit:
    in environment steps; None means the backend's default. seed: seeds the first reset() and the
    action space (two envs made with the same seed give the same trajectory under the same actions).
    options: backend options, e.g. atari grayscale=True, sticky_actions=0.25, noops=30,
    full_action_space=False, terminal_on_life_loss=False; dmc camera=None, fast_render=False.
    """
    backend, task = _split_name(name)
    if backend not in BACKENDS:
        close = difflib.get_close_matches(backend, BACKENDS, n=1)
        raise EnvError(f"unknown env backend {backend!r} in {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; backends: {', '.join(BACKENDS)}")
    if obs not in OBS_TYPES:
        raise EnvError(f"obs must be one of {', '.join(OBS_TYPES)}, got {obs!r}")
    cls = BACKENDS[backend]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        allowed = ", ".join(f"{k}={v!r}" for k, v in cls.options.items()) or "none"
        raise EnvError(f"unknown option(s) {', '.join(unknown)} for backend {backend!r}; allowed (with defaults): {allowed}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise EnvError(f"size must be (height, width), got {size}")
    return cls(task, obs, size, action_repeat, time_limit, seed, **{**cls.options, **options})
