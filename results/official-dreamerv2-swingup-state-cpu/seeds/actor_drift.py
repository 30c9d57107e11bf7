"""Which moves a stuck actor's std, its own weights or the world model's features? For
checkpoints A, B, ... of one run: the actor of each checkpoint read on the posterior features
that each checkpoint's world model gives the run's last 5 episodes (median s, mean std, median
|x|; s and x are the actor's outputs before the sigmoid and the tanh), and how far the actor's
weights moved between them. Read-only.

    python actor_drift.py CODE_DIR RUN_DIR STEP_A STEP_B ...
"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv.pop(1))          # the code directory
import torch, dreamer_v2 as d

run, ckpts = Path(sys.argv[1]), sys.argv[2:]
paths = sorted((run / "episodes").glob("*.npz"))[-5:]
eps = [d.load_episode(p) for p in paths]
models = {c: d.Dreamer.from_pretrained(run / "ckpts" / f"ckpt-{int(c):010d}.pt") for c in ckpts}

@torch.no_grad()
def feats(model):
    torch.manual_seed(0)                          # the posterior samples its stochastic state
    wm, out = model.world_model, []
    for ep in eps:
        obs = wm.preprocess(torch.as_tensor(ep[wm.obs_key][:, None]))
        post, _ = wm.rssm.observe(wm.encoder(obs), torch.as_tensor(ep["action"][:, None]).float())
        out.append(wm.rssm.feat(post).float().flatten(0, 1))
    return torch.cat(out)

F = {c: feats(m) for c, m in models.items()}
print(f"run {run.name}, {F[ckpts[0]].shape[0]} states of the last {len(eps)} episodes")
print("actor \\ features | " + " | ".join(ckpts))
for a in ckpts:
    row = []
    for f in ckpts:
        with torch.no_grad():
            x, s = models[a].actor_critic.actor.net(F[f]).float().chunk(2, -1)
        std = 2 * torch.sigmoid(s / 2) + 0.1
        row.append(f"s {s.median():.2f} std {std.mean():.5f} |x| {x.abs().median():.2f}")
    print(f"{a} | " + " | ".join(row))
# how much the actor's weights moved
for a, b in zip(ckpts, ckpts[1:]):
    pa, pb = dict(models[a].actor_critic.actor.named_parameters()), dict(models[b].actor_critic.actor.named_parameters())
    print(a, "->", b, "relative change per actor tensor:", " ".join(f"{k}:{((pb[k]-pa[k]).norm()/pa[k].norm()):.2e}" for k in pa))
    fa, fb = F[a], F[b]
    print("  feature change (relative norm, same replay states):", f"{((fb-fa).norm()/fa.norm()):.3f}")
