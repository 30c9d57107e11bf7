"""common.make_env against the real environments (no mocks): each property of the wrapper is checked
against a brute-force loop over the raw environment (dm_control, ale-py, gymnasium) or against a
rule stated in common.py's docstring. Optional backends run where installed and check their
'not installed' message everywhere.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

from common import EnvError, OneHot, make_env

PROCGEN = importlib.util.find_spec("procgen") is not None     # optional (requirements-optional.txt)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rollout(env, actions):
    """Step `env` through `actions` (stops at an episode end); returns the per-step tuples."""
    steps = []
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        steps.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            break
    return steps


def check_obs(env, obs, is_first):
    assert set(obs) == set(env.observation_space.spaces) | {"is_first"}
    assert obs["is_first"] is is_first
    if "image" in obs:
        space = env.observation_space["image"]
        assert obs["image"].dtype == np.uint8 and obs["image"].shape == space.shape
        assert obs["image"].std() > 0, "a blank frame: rendering is broken"
    if "state" in obs:
        space = env.observation_space["state"]
        assert obs["state"].dtype == np.float32 and obs["state"].shape == space.shape


# ---------------------------------------------------------------------------------------------
# The action space.
# ---------------------------------------------------------------------------------------------


def test_onehot_space_samples_one_hot_vectors_and_is_seedable():
    a, b = OneHot(5, seed=3), OneHot(5, seed=3)
    samples = [a.sample() for _ in range(200)]
    assert all(s.dtype == np.float32 and s.shape == (5,) and s.sum() == 1 and a.contains(s) for s in samples)
    assert np.array_equal(np.stack(samples), np.stack([b.sample() for _ in range(200)]))
    assert len({int(s.argmax()) for s in samples}) == 5
    assert not a.contains(np.array([1, 1, 0, 0, 0], np.float32)) and not a.contains(np.zeros(4))
    assert OneHot(5) == OneHot(5) != OneHot(4)


# ---------------------------------------------------------------------------------------------
# dmc
# ---------------------------------------------------------------------------------------------


def test_dmc_pixels_and_state_match_the_raw_suite_with_rewards_summed_over_repeats():
    from dm_control import suite

    env = make_env("dmc/walker-walk", obs="both", seed=4, fast_render=True, time_limit=40)
    assert (env.name, env.action_repeat, env.discrete, env.action_size) == ("dmc/walker-walk", 2, False, 6)
    assert env.action_space == gym.spaces.Box(-1, 1, (6,), np.float32)
    assert env.observation_space["image"].shape == (64, 64, 3) and env.observation_space["state"].shape == (24,)
    obs, info = env.reset()
    check_obs(env, obs, True)

    raw = suite.load("walker", "walk", task_kwargs={"random": 4})
    time_step = raw.reset()
    flat = lambda ts: np.concatenate([np.asarray(v, np.float32).ravel() for v in ts.observation.values()])
    assert np.array_equal(obs["state"], flat(time_step))

    actions = np.random.default_rng(0).uniform(-1.5, 1.5, (30, 6))  # beyond [-1, 1]: clipped
    steps = rollout(env, actions)
    assert len(steps) == 20  # time_limit 40 env steps / action repeat 2
    for k, (obs, reward, terminated, truncated, info) in enumerate(steps):
        check_obs(env, obs, False)
        expected = 0.0
        for _ in range(2):
            time_step = raw.step(np.clip(actions[k], -1, 1))  # walker's real bounds are [-1, 1]
            expected += time_step.reward
        assert reward == pytest.approx(expected, abs=1e-6) and isinstance(reward, float)
        assert np.allclose(obs["state"], flat(time_step))
        assert terminated is False  # DMC has no true terminal states
        assert truncated is (k == 19)
    assert env.episode_steps == 40
    with pytest.raises(EnvError, match="call reset"):
        env.step(actions[0])
    env.close()


def test_dmc_default_episode_is_1000_env_steps_and_never_terminates():
    with make_env("dmc/cartpole-balance", obs="state", seed=0) as env:
        assert (env.time_limit, env.action_repeat) == (1000, 2)
        env.reset()
        steps = rollout(env, [env.action_space.sample() for _ in range(600)])
        assert len(steps) == 500 and env.episode_steps == 1000
        assert [s[3] for s in steps] == [False] * 499 + [True]
        assert not any(s[2] for s in steps)


def test_dmc_seed_reproduces_and_camera_defaults():
    def trajectory(seed):
        with make_env("dmc/cartpole-swingup", obs="both", seed=seed, fast_render=True) as env:
            first, _ = env.reset()
            actions = np.linspace(-1, 1, 10)[:, None]
            return [first] + [s[0] for s in rollout(env, actions)]

    a, b, c = trajectory(1), trajectory(1), trajectory(2)
    assert all(np.array_equal(x["image"], y["image"]) and np.array_equal(x["state"], y["state"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["state"], c[0]["state"])
    with make_env("dmc/quadruped-walk", obs="state") as env:
        assert env._camera == 2
    with make_env("dmc/cartpole-swingup", obs="state", camera=1) as env:
        assert env._camera == 1


def test_dmc_fast_render_keeps_the_image_meaningful():
    images = {}
    for fast in (False, True):
        with make_env("dmc/walker-walk", seed=0, fast_render=fast) as env:
            images[fast] = env.reset()[0]["image"].astype(np.float32)
    # same scene, same camera: close on average, and not identical (shadows/multisampling are off)
    assert abs(images[True].mean() - images[False].mean()) < 15
    assert np.abs(images[True] - images[False]).mean() < 20 and not np.array_equal(images[True], images[False])


# ---------------------------------------------------------------------------------------------
# atari
# ---------------------------------------------------------------------------------------------


def raw_atari(game="Pong", sticky=0.0, obs_type="grayscale"):
    import ale_py

    gym.register_envs(ale_py)
    return gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=sticky, obs_type=obs_type,
                    max_num_frames_per_episode=None)


def resize(frame):
    """The test's own 64x64 area resize (PIL BOX), channel last."""
    image = np.asarray(Image.fromarray(frame).resize((64, 64), Image.Resampling.BOX))
    return image[..., None] if image.ndim == 2 else image


def test_atari_max_pools_the_last_two_frames_and_sums_rewards_over_4_repeats():
    env = make_env("atari/Pong", seed=7, sticky_actions=0.0, noops=0)
    assert (env.name, env.action_repeat, env.time_limit, env.discrete) == ("atari/Pong", 4, 108000, True)
    assert env.action_space == OneHot(6) and env.observation_space["image"].shape == (64, 64, 1)
    obs, info = env.reset()
    check_obs(env, obs, True)
    raw = raw_atari()
    frame, _ = raw.reset(seed=7)
    assert np.array_equal(obs["image"], resize(frame))

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 6, 400)
    pooled_differs, total = 0, 0.0
    for k, index in enumerate(indices):
        action = np.eye(6, dtype=np.float32)[index] if k % 2 else int(index)  # both forms are accepted
        obs, reward, terminated, truncated, info = env.step(action)
        frames, expected = [], 0.0
        for _ in range(4):
            frame, r, *_ = raw.step(index)
            frames.append(frame)
            expected += r
        assert reward == expected
        assert np.array_equal(obs["image"], resize(np.maximum(frames[-2], frames[-1])))
        pooled_differs += not np.array_equal(obs["image"], resize(frames[-1]))
        total += reward
        assert info["life_loss"] is False and not terminated and not truncated
    assert total < 0  # random play loses points in 1600 frames: rewards are really compared
    assert pooled_differs > 10  # the max-pool is not a no-op on Pong (the moving ball)
    env.close()


def test_atari_seed_style_ids_map_to_our_wrapper_with_paper_settings():
    for name in ["PongNoFrameskip-v4", "atari/PongNoFrameskip-v4", "ALE/Pong-v5", "atari/pong", "Pong-v4"]:
        with make_env(name, obs="pixels") as env:
            assert env.name == "atari/Pong"
            ale = env._env.unwrapped.ale
            assert ale.getFloat("repeat_action_probability") == pytest.approx(0.25)  # not v4's 0.0
            assert (env.action_repeat, env.time_limit) == (4, 108000)
    with make_env("atari/Pong", grayscale=False, full_action_space=True) as env:
        assert env.action_space == OneHot(18) and env.observation_space["image"].shape == (64, 64, 3)
        obs, _ = env.reset(seed=0)
        check_obs(env, obs, True)
    with make_env("atari/space_invaders", obs="both") as env:
        assert env.name == "atari/SpaceInvaders"
        obs, _ = env.reset(seed=0)
        check_obs(env, obs, True)  # state = the RAM
        assert obs["state"].shape == (128,) and 0 <= obs["state"].min() <= obs["state"].max() <= 1


def pong_frames(sticky, actions, seed=0):
    with make_env("atari/Pong", seed=seed, sticky_actions=sticky, noops=0) as env:
        env.reset()
        return np.stack([s[0]["image"] for s in rollout(env, actions)])


def test_atari_sticky_actions():
    rng = np.random.default_rng(1)
    actions = [int(a) for a in rng.integers(0, 6, 250)]
    noop = pong_frames(0.0, [0] * 250)
    # probability 1: ALE repeats the previous action forever, which starts as NOOP
    assert np.array_equal(pong_frames(1.0, actions), noop)
    plain, sticky = pong_frames(0.0, actions), pong_frames(0.25, actions)
    assert not np.array_equal(plain, noop)  # the actions matter
    assert not np.array_equal(sticky, plain)  # and 25% of the time the previous one is repeated
    assert np.array_equal(sticky, pong_frames(0.25, actions))  # deterministic given the seed
    # statistically: an agent action is ignored in a frame with probability 0.25, so with actions
    # that change every agent step, more of the frames differ from the non-sticky run.
    assert (sticky != plain).any(axis=(1, 2, 3)).mean() > 0.1


def test_atari_noops_at_reset_come_from_the_seeded_rng():
    def frame_number(seed, noops):
        with make_env("atari/Pong", seed=seed, noops=noops) as env:
            env.reset()
            return env._env.unwrapped.ale.getEpisodeFrameNumber()

    counts = [frame_number(seed, 30) for seed in range(8)]
    assert all(1 <= c <= 30 for c in counts) and len(set(counts)) > 2
    assert counts == [frame_number(seed, 30) for seed in range(8)]
    assert frame_number(0, 0) == 0


def test_atari_time_limit_counts_frames():
    with make_env("atari/Pong", time_limit=102, seed=0) as env:
        env.reset()
        steps = rollout(env, [0] * 100)
        assert len(steps) == 26 and env.episode_steps == 102  # 25 x 4 frames + 2 frames
        assert steps[-1][3] is True and not any(s[2] for s in steps)
        assert not any(s[3] for s in steps[:-1])


def test_atari_life_loss_on_breakout():  # ale-py 0.12.1 ships the Breakout ROM
    rng = np.random.default_rng(0)
    with make_env("atari/Breakout", seed=0) as env:
        obs, _ = env.reset()
        lives, losses = 5, 0
        for _ in range(3000):
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_size)))
            assert info["life_loss"] is (info["lives"] < lives)
            losses += info["life_loss"]
            lives = info["lives"]
            if terminated:
                break
        assert losses == 5 and terminated and lives == 0  # life loss is not an episode end by default
    with make_env("atari/Breakout", seed=0, terminal_on_life_loss=True) as env:
        env.reset()
        for _ in range(3000):
            obs, reward, terminated, truncated, info = env.step(int(rng.integers(env.action_size)))
            if terminated:
                break
        assert terminated and info["life_loss"] and info["lives"] == 4


def test_atari_seed_reproduces_with_sticky_actions_and_noops():
    actions = [int(a) for a in np.random.default_rng(5).integers(0, 6, 150)]
    a, b = pong_frames(0.25, actions, seed=3), pong_frames(0.25, actions, seed=3)
    assert np.array_equal(a, b)
    with make_env("atari/Pong", seed=3) as x, make_env("atari/Pong", seed=3) as y:
        x.reset(), y.reset()
        assert np.array_equal(np.stack([x.action_space.sample() for _ in range(20)]),
                              np.stack([y.action_space.sample() for _ in range(20)]))


# ---------------------------------------------------------------------------------------------
# gym and mujoco
# ---------------------------------------------------------------------------------------------


def test_gym_pendulum_rescales_actions_and_truncates_at_its_registered_limit():
    env = make_env("gym/Pendulum-v1", obs="both", seed=2, action_repeat=3)
    assert (env.time_limit, env.action_repeat, env.action_size, env.discrete) == (200, 3, 1, False)
    obs, _ = env.reset()
    check_obs(env, obs, True)
    raw = gym.make("Pendulum-v1")
    state, _ = raw.reset(seed=2)
    assert np.allclose(obs["state"], state)
    actions = np.random.default_rng(0).uniform(-1.5, 1.5, (100, 1))
    steps = rollout(env, actions)
    assert len(steps) == 67 and env.episode_steps == 200  # ceil(200 / 3)
    for k, (obs, reward, terminated, truncated, _) in enumerate(steps):
        check_obs(env, obs, False)
        expected = 0.0
        for _ in range(3 if k < 66 else 2):
            state, r, *_ = raw.step(2.0 * np.clip(actions[k], -1, 1))  # Pendulum's torque is in [-2, 2]
            expected += r
        assert reward == pytest.approx(expected, rel=1e-5) and np.allclose(obs["state"], state, atol=1e-5)
        assert terminated is False and truncated is (k == 66)
    env.close()


def test_gym_cartpole_terminates_and_takes_one_hot_or_int_actions():
    env = make_env("gym/CartPole-v1", obs="both", seed=0)
    assert env.action_space == OneHot(2) and env.time_limit == 500
    obs, _ = env.reset()
    check_obs(env, obs, True)
    raw = gym.make("CartPole-v1")
    state, _ = raw.reset(seed=0)
    assert np.array_equal(obs["state"], state)
    rng = np.random.default_rng(0)
    for k in range(500):
        index = int(rng.integers(2))
        action = [index, np.eye(2, dtype=np.float32)[index], np.array([0.1, 0.7]) if index else np.array([2.0, -1.0])][k % 3]
        obs, reward, terminated, truncated, _ = env.step(action)
        state, r, raw_terminated, *_ = raw.step(index)
        check_obs(env, obs, False)
        assert reward == r and np.array_equal(obs["state"], state) and terminated == raw_terminated
        if terminated:
            break
    assert terminated and not truncated and k < 100  # random CartPole falls quickly
    with make_env("gym/CartPole-v1", obs="state", time_limit=5) as short:
        short.reset(seed=0)
        steps = rollout(short, [0, 1, 0, 1, 0, 1])
        assert len(steps) == 5 and steps[-1][3] and not steps[-1][2]
    env.close()


def test_gym_seed_reproduces():
    def trajectory():
        with make_env("gym/CartPole-v1", obs="state", seed=11) as env:
            first, _ = env.reset()
            actions = [env.action_space.sample() for _ in range(30)]
            return np.stack([first["state"]] + [s[0]["state"] for s in rollout(env, actions)])

    a, b = trajectory(), trajectory()
    assert a.shape[0] > 5 and np.array_equal(a, b)


def test_mujoco_hopper_state_matches_gymnasium_and_renders_a_frame():
    env = make_env("mujoco/Hopper-v5", obs="state", seed=1)
    assert (env.name, env.time_limit, env.action_size) == ("mujoco/Hopper-v5", 1000, 3)
    obs, _ = env.reset()
    raw = gym.make("Hopper-v5")
    state, _ = raw.reset(seed=1)
    assert np.allclose(obs["state"], state)
    low, high = raw.action_space.low, raw.action_space.high
    rng = np.random.default_rng(0)
    for k in range(1000):
        action = rng.uniform(-1, 1, 3)
        obs, reward, terminated, truncated, _ = env.step(action)
        state, r, raw_terminated, *_ = raw.step(low + (action + 1) / 2 * (high - low))
        assert reward == pytest.approx(r) and np.allclose(obs["state"], state, atol=1e-5)
        assert terminated == raw_terminated and not truncated
        if terminated:
            break
    assert terminated  # random Hopper falls: an unhealthy state is a true end
    env.close()
    images = []
    for fast in (False, True):
        with make_env("mujoco/Hopper", obs="pixels", seed=0, fast_render=fast) as env:  # bare name: -v5
            assert env.name == "mujoco/Hopper-v5"
            obs, _ = env.reset()
            check_obs(env, obs, True)
            assert obs["image"].shape == (64, 64, 3)
            images.append(obs["image"].astype(np.float32))
    assert np.abs(images[0] - images[1]).mean() < 20 and not np.array_equal(images[0], images[1])
    with make_env("mujoco/Hopper-v4", obs="state") as env:
        assert env.name == "mujoco/Hopper-v4"  # gymnasium's own v4, not mapped


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, message", [
    ("foo/bar", {}, r"unknown env backend 'foo'.*backends: dmc, atari, gym, mujoco, procgen, brax, dmlab, unity"),
    ("dcm/walker-walk", {}, r"did you mean 'dmc'"),
    ("walker-walk", {}, r"must look like 'backend/task'"),
    ("dmc/walker-run_fast", {}, r"unknown dmc task 'walker-run_fast'.*walker-run.*the suite has: .*cartpole-swingup"),
    ("atari/Pongg", {}, r"unknown atari game 'Pongg' \(did you mean Pong.*ale-py has \d+ games"),
    ("gym/Pendulum-v9", {}, r"unknown gymnasium id 'Pendulum-v9'.*Pendulum-v1"),
    ("mujoco/Hoper-v5", {}, r"unknown mujoco id 'Hoper-v5' \(did you mean Hopper-v5"),
    ("mujoco/Hopper-v3", {}, r"needs mujoco-py.*Hopper-v5"),
    ("procgen/coinrunn", {}, r"unknown procgen game 'coinrunn'; procgen has: .*coinrun" if PROCGEN
     else r"needs the package `procgen \(procgen2\)`, which is not installed: pip install --no-deps procgen2"),
    ("gym/CartPole-v1", {"obs": "rgb"}, r"obs must be one of pixels, state, both, got 'rgb'"),
    ("atari/Pong", {"sticky": 0.1}, r"unknown option\(s\) sticky for backend 'atari'; allowed .*sticky_actions=0.25"),
    ("dmc/walker-walk", {"grayscale": True}, r"unknown option\(s\) grayscale .*camera=None, fast_render=False"),
    ("unity/does/not/exist.x86_64", {}, r"no Unity build at 'does/not/exist.x86_64'"),
])
def test_user_mistakes_raise_env_error_listing_what_exists(name, kwargs, message):
    with pytest.raises(EnvError, match=message):
        make_env(name, **kwargs)


def test_bad_actions_and_stepping_before_reset():
    with make_env("gym/CartPole-v1", obs="state") as env:
        with pytest.raises(EnvError, match="call reset"):
            env.step(0)
        env.reset(seed=0)
        with pytest.raises(EnvError, match=r"one-hot action of shape \(2,\)"):
            env.step(np.zeros(3))
        with pytest.raises(EnvError, match="outside"):
            env.step(5)
    with make_env("gym/Pendulum-v1", obs="state") as env:
        env.reset(seed=0)
        with pytest.raises(EnvError, match="NaN"):
            env.step(np.array([np.nan]))


class FailingEnv(gym.Env):
    """A real gymnasium env whose simulator breaks at its 5th step."""

    observation_space = gym.spaces.Box(-1, 1, (2,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == 5:
            raise FloatingPointError("simulator diverged")
        return np.zeros(2, np.float32), 1.0, False, False, {}


def test_exception_inside_the_env_is_reported_with_name_and_step():
    if "FailingEnv-v0" not in gym.registry:
        gym.register("FailingEnv-v0", entry_point=FailingEnv, max_episode_steps=100)
    with make_env("gym/FailingEnv-v0", obs="state", action_repeat=2) as env:
        env.reset()
        env.step(0), env.step(1)
        with pytest.raises(RuntimeError, match=r"env gym/FailingEnv-v0 raised at step 5: simulator diverged") as err:
            env.step(2)
        assert isinstance(err.value.__cause__, FloatingPointError)


@pytest.mark.parametrize("module, name, kwargs, message", [
    ("procgen", "procgen/coinrun", {}, r"pip install --no-deps procgen2==0.10.7 .*requirements-optional.txt"),
    ("brax", "brax/ant", {"obs": "state"}, r"pip install brax==0.14.2 jax\[cpu\]==0.10.2"),
    ("deepmind_lab", "dmlab/rooms_collect_good_objects_train", {}, r"no wheel on PyPI: build it from source \(github.com/deepmind/lab"),
    ("mlagents_envs", "unity/{build}", {}, r"pip install mlagents_envs==0.28.0 protobuf==3.20.3"),
])
def test_missing_optional_package_says_what_to_install(module, name, kwargs, message, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail as if not installed
    build = tmp_path / "env.x86_64"
    build.write_text("")
    with pytest.raises(EnvError, match=message):
        make_env(name.format(build=build), **kwargs)


def test_gl_failure_names_the_apt_packages():
    """With MUJOCO_GL=osmesa and no libosmesa6 (as on the CI machine) the error says what to install."""
    code = textwrap.dedent("""
        from common import make_env
        env = make_env("dmc/cartpole-swingup")
        env.reset()
        print("rendered")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"})
    if result.returncode == 0:
        pytest.skip("OSMesa is installed here: no GL failure to provoke")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("common.EnvError: MuJoCo could not start headless OpenGL (MUJOCO_GL=osmesa)")
    assert "apt-get install -y libegl1 libgl1-mesa-dri libopengl0" in last


# ---------------------------------------------------------------------------------------------
# Optional backends, where installed (see requirements-optional.txt)
# ---------------------------------------------------------------------------------------------


def test_procgen_coinrun():
    pytest.importorskip("procgen", reason="procgen2 is optional (requirements-optional.txt)")
    env = make_env("procgen/coinrun", seed=0)
    assert env.action_space == OneHot(15) and env.observation_space["image"].shape == (64, 64, 3)
    obs, _ = env.reset()
    check_obs(env, obs, True)
    actions = [env.action_space.sample() for _ in range(1200)]
    steps = rollout(env, actions)
    assert steps[-1][2] and not steps[-1][3]  # coinrun ends within 1000 steps
    first = [obs] + [s[0] for s in steps[:50]]
    env.close()
    with make_env("procgen/coinrun", seed=0) as again:
        again_first = [again.reset()[0]] + [s[0] for s in rollout(again, actions[:50])]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, again_first))
    with pytest.raises(EnvError, match="pixel observations only"):
        make_env("procgen/coinrun", obs="state")


def test_brax_ant():
    pytest.importorskip("brax", reason="brax is optional (requirements-optional.txt)")
    env = make_env("brax/ant", obs="state", seed=0, time_limit=6)
    assert env.observation_space["state"].shape == (27,) and env.action_space.shape == (8,)
    obs, _ = env.reset()
    check_obs(env, obs, True)
    steps = rollout(env, [np.zeros(8)] * 10)
    assert len(steps) == 6 and steps[-1][3] and not steps[-1][2]
    check_obs(env, steps[-1][0], False)
    with pytest.raises(EnvError, match="state observations only"):
        make_env("brax/ant", obs="pixels")
