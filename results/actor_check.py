"""Where does the actor act? python results/actor_check.py RUN [--weights CKPT] [--episodes 3]

For a run with continuous actions (V1 or V2, states or pixels): the run's last `--episodes` stored
episodes are filtered by the world model as the policy filters them (the posterior at every step),
and the actor's distribution is read at each of those states. Both actors squash a Gaussian mean
with tanh: V2's truncated normal has its mean at tanh(x), V1's tanh-normal samples tanh(u) with u
around x. Once |x| is large the slope of tanh, 1 - tanh(x)^2, is about 0: the mode sits at the
action bound and no gradient moves it back, while sampled actions can still be small. Evaluation
takes the mode, so this is how a run whose training episodes score well can evaluate poorly.

Prints one markdown table row per weights file: the share of action dimensions whose mode has
|a| > 0.95, the mean std, the mean |a| of sampled actions, the median |x| and tanh's slope there.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

HEADER = ("| weights | states | mode at a bound (\\|mode\\| > 0.95) | std | mean \\|sampled a\\| "
          "| median \\|x\\| | tanh slope at the median |\n| --- | --- | --- | --- | --- | --- | --- |")


def fail(message: str):
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@torch.no_grad()
def actor_stats(model, episodes: list[dict], seed: int = 0) -> dict:
    """The actor's statistics over every state of `episodes` (dicts of arrays, as replay stores
    them), each filtered from its first step by the posterior."""
    torch.manual_seed(seed)                        # the samples (and V1's sampled mode) repeat
    cfg, wm, actor = model.cfg, model.world_model, model.actor_critic.actor
    modes, stds, samples, xs = [], [], [], []
    for ep in episodes:
        obs = wm.preprocess(torch.as_tensor(ep[wm.obs_key][:, None]))             # (T, 1, ...)
        post, _ = wm.rssm.observe(wm.encoder(obs), torch.as_tensor(ep["action"][:, None]).float())
        feat = wm.rssm.feat(post)
        dist = actor(feat)
        if getattr(cfg, "actor_dist", "tanh_normal") == "trunc_normal":
            # V2: the mean is tanh(x); x itself is the network's output (atanh of a saturated
            # mean would be inf), so the network runs once more for it.
            x, std = actor.net(feat).float().chunk(2, -1)[0], dist.std
        else:                                          # V1: a = tanh(u), u ~ N(x, std)
            x, std = dist.normal.mean, dist.normal.scale
        modes.append(dist.mode().flatten())
        stds.append(std.flatten())
        samples.append(dist.rsample().flatten())
        xs.append(x.flatten())
    mode, std, sample, x = (torch.cat(v) for v in (modes, stds, samples, xs))
    median = float(x.abs().median())
    return dict(states=sum(len(ep["reward"]) for ep in episodes),
                mode_at_bound=float((mode.abs() > 0.95).float().mean()), std=float(std.mean()),
                sampled_abs=float(sample.abs().mean()), median_abs_x=median,
                slope_at_median=1.0 - float(np.tanh(median)) ** 2)


def row(name: str, stats: dict) -> str:
    return (f"| {name} | {stats['states']} | {100 * stats['mode_at_bound']:.0f}% | {stats['std']:.3f} "
            f"| {stats['sampled_abs']:.2f} | {stats['median_abs_x']:.2f} | {stats['slope_at_median']:.4f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory: its config.yaml and episodes/")
    parser.add_argument("--weights", type=Path, nargs="*", help="checkpoint files or directories "
                        "(ckpts/best: the best evaluation's); default: the run's newest checkpoint")
    parser.add_argument("--episodes", type=int, default=3, help="the run's last N stored episodes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        fail(f"'{args.run}' is not a run directory (no config.yaml); allowed: a directory written by a run")
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    script = __import__("dreamer_v1" if str(config.get("algo")).lower().endswith("v1") else "dreamer_v2")
    paths = sorted((args.run / "episodes").glob("*.npz"))[-args.episodes:] if args.episodes > 0 else []
    episodes = [ep for ep in map(script.load_episode, paths) if ep is not None]
    if not episodes:
        fail(f"'{args.run}' has no stored episode in episodes/; allowed: a run that has collected one")
    print(HEADER)
    for weights in args.weights or [args.run]:
        try:
            model = script.Dreamer.from_pretrained(weights)
        except script.CheckpointError as err:
            fail(str(err))
        if model.discrete:
            fail(f"'{weights}' is an actor of discrete actions; allowed: a run with continuous actions")
        print(row(str(weights), actor_stats(model, episodes, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
