"""dreamer_v2.py's own command line with a print added: after every update, statistics of the
actor's raw outputs over the imagined states the actor loss used (the same numbers as
official-actor-probe.diff prints for the official code). Training is unchanged.

    python actor_probe_ours.py CODE_DIR --env dmc/cartpole-swingup --obs state --device cpu \
        --total_steps 5000 --eval_episodes 2 --seed 2 --logdir RUN > log

CODE_DIR holds dreamer_v2.py. Printed per update: mean, median, 90th percentile and max of |x|
(the mean's pre-tanh output), the share of x > 0, the share of tanh(x) past +-0.95, the mean std
(2 sigmoid(s / 2) + 0.1), the median of s (the std's pre-sigmoid output) and the actor entropy.
"""
import sys

import torch

sys.path.insert(0, sys.argv.pop(1))
import dreamer_v2  # noqa: E402

unprobed_loss = dreamer_v2.ActorCritic.loss
updates = [0]


def probed_loss(self, traj):
    out = unprobed_loss(self, traj)
    with torch.no_grad():
        raw = self.actor.net(traj.feat[:-2].detach().flatten(0, 1)).float()
        x, s = (v.reshape(-1) for v in raw.chunk(2, -1))
        std = 2 * torch.sigmoid(s / 2) + 0.1
        ax = x.abs().sort().values
        n = ax.numel()
        print('XPROBE', updates[0], 'mean|x|', f'{ax.mean():.4f}', 'median|x|', f'{ax[n // 2]:.4f}',
              'p90|x|', f'{ax[n * 9 // 10]:.4f}', 'max|x|', f'{ax[-1]:.4f}',
              'frac_pos', f'{(x > 0).float().mean():.4f}',
              'at_bound', f'{(torch.tanh(x).abs() > 0.95).float().mean():.4f}',
              'std', f'{std.mean():.5f}', 'median_s', f'{s.median():.2f}',
              'ent', f'{out[2]["actor_entropy"]:.4f}', flush=True)
    updates[0] += 1
    return out


dreamer_v2.ActorCritic.loss = probed_loss
sys.exit(dreamer_v2.main(sys.argv[1:]))
