"""Does the world model predict the returns the simulator gives? python results/imagination_check.py RUN

For a run on dm_control cartpole from states (`--obs state`): from start states drawn from the run's
own replay, the model filters the episode up to the start (the posterior), then imagines
`--horizon` agent steps under constant actions (-1, 0, +1) and under the actor (its mode), summing
the reward predictor's means. The same start state is set into a fresh dm_control cartpole (cart
position and velocity, pole angle and angular velocity, read back from the stored observation and
checked) and stepped with the same actions, `action_repeat` physics steps per agent step, for the
true return. Under the actor, the real rollout feeds the real observations to the policy as an
episode does. A model that imagines much higher returns for an action than the simulator gives is
what an actor that exploits the model would learn from.

Prints a markdown table: imagined and true mean return per action, and their mean absolute
difference over the start states.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def set_cartpole_state(physics, state: np.ndarray) -> None:
    """dm_control cartpole's observation is [cart x, cos, sin, cart velocity, angular velocity]."""
    x, cos, sin, xdot, thetadot = state[:5]
    with physics.reset_context():
        physics.data.qpos[:] = [x, np.arctan2(sin, cos)]
        physics.data.qvel[:] = [xdot, thetadot]


def true_return(env, state, actions_or_policy, horizon: int, repeat: int) -> float:
    """The simulator's return of `horizon` agent steps from `state`: a constant action, or a
    function obs -> action called once per agent step."""
    env.reset()
    set_cartpole_state(env.physics, state)
    observation = np.concatenate([np.ravel(v) for v in env.task.get_observation(env.physics).values()])
    if not np.allclose(observation, state, atol=1e-4):
        raise RuntimeError(f"the simulator's state {observation} does not match the stored {state}")
    total = 0.0
    for _ in range(horizon):
        action = actions_or_policy(observation) if callable(actions_or_policy) else actions_or_policy
        for _ in range(repeat):
            step = env.step(np.asarray([action], np.float64).reshape(-1))
            total += step.reward or 0.0
        observation = np.concatenate([np.ravel(v) for v in step.observation.values()])
    return total


class ClosedLoop:
    """The actor's mode in the simulator: it filters each real observation, as in an episode."""

    def __init__(self, model, state):
        self.model, self.state = model, state

    def __call__(self, obs) -> float:
        action, self.state = self.model.policy_step(torch.as_tensor(obs, dtype=torch.float32)[None],
                                                    self.state, False)
        return float(action[0, 0])


@torch.no_grad()
def check(model, episodes: list[dict], starts: int, horizon: int, seed: int) -> list[dict]:
    from dm_control import suite
    cfg, wm = model.cfg, model.world_model
    task = cfg.env.split("/", 1)[1].split("-", 1)[1]
    env = suite.load("cartpole", task, task_kwargs={"random": seed, "time_limit": float("inf")})
    rng, rows = np.random.default_rng(seed), []
    usable = [ep for ep in episodes if len(ep["reward"]) > 10]
    for _ in range(starts):
        ep = usable[rng.integers(len(usable))]
        t = int(rng.integers(5, len(ep["reward"])))
        obs = torch.as_tensor(ep["state"][: t + 1, None], dtype=torch.float32)          # (T, 1, 5)
        action = torch.as_tensor(ep["action"][: t + 1, None], dtype=torch.float32)
        post, _ = wm.rssm.observe(wm.encoder(wm.preprocess(obs)), action)
        start = {k: v[-1] for k, v in post.items()}                # the posterior at t
        before = {k: v[-2] for k, v in post.items()}               # at t - 1: the policy filters o_t
        row = {"t": t}
        for name, const in (("-1", -1.0), ("0", 0.0), ("+1", 1.0), ("actor", None)):
            state, feat, imagined = start, wm.rssm.feat(start), 0.0
            for _ in range(horizon):
                act = (model.actor_critic.actor(feat).mode() if const is None
                       else torch.full((1, model.action_size), const))
                state = wm.rssm.img_step(state, act)
                feat = wm.rssm.feat(state)
                reward = wm.reward_mean(feat) if hasattr(wm, "reward_mean") else wm.reward(feat)  # V2 / V1
                imagined += float(reward.reshape(-1)[0])
            actions = const if const is not None else ClosedLoop(model, (before, action[-1]))
            row[name] = (imagined, true_return(env, ep["state"][t], actions, horizon, cfg.action_repeat))
        rows.append(row)
    return rows


def table(rows: list[dict], horizon: int) -> str:
    lines = [f"| actions ({horizon} agent steps) | imagined return | true return | mean abs difference |",
             "| --- | --- | --- | --- |"]
    for name in ("-1", "0", "+1", "actor"):
        imagined, real = np.array([r[name] for r in rows]).T
        lines.append(f"| {name} | {imagined.mean():.2f} | {real.mean():.2f} | {np.abs(imagined - real).mean():.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (its newest checkpoint is read)")
    parser.add_argument("--starts", type=int, default=32)
    parser.add_argument("--horizon", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    if not str(config.get("env", "")).startswith("dmc/cartpole-") or config.get("obs") != "state":
        fail(f"{args.run} is a run of {config.get('env')} from {config.get('obs')}; "
             f"allowed: a dmc/cartpole-* run with --obs state")
    script = __import__("dreamer_v1" if str(config.get("algo")).lower().endswith("v1") else "dreamer_v2")
    model = script.Dreamer.from_pretrained(args.run)
    episodes = [script.load_episode(p) for p in sorted((args.run / "episodes").glob("*.npz"))]
    print(table(check(model, episodes, args.starts, args.horizon, args.seed), args.horizon))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
