"""The official code's evaluation episodes: return and how often the actor's mode sits at a bound.

python eval_actions.py LOGDIR  (the official run's --logdir; reads LOGDIR/eval_episodes/*.npz)

One row per stored evaluation episode, oldest first: its file's time stamp, return, the share of
its actions with |a| > 0.95 and its mean action. The official code stores each episode's actions
with a leading zero action for the reset step, which is left out. Its first evaluation episode
is taken during the prefill with random actions.
"""

import sys
from pathlib import Path

import numpy as np

print("| episode | return | share of actions with abs(a) > 0.95 | mean action |")
print("| --- | --- | --- | --- |")
for path in sorted(Path(sys.argv[1], "eval_episodes").glob("*.npz")):
    with np.load(path) as episode:
        action, reward = episode["action"][1:], episode["reward"]
    print(f"| {path.name.split('-')[0]} | {reward.sum():.1f} | {(np.abs(action) > 0.95).mean():.3f} | {action.mean():+.3f} |")
