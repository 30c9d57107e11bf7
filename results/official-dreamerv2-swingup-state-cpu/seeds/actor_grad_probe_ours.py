"""dreamer_v2.py's CLI with a print per update: the actor's raw-output statistics over the imagined
states its loss used (as the official XPROBE print) and the actor's, critic's and world model's
gradient norms before clipping (the official actor_grad_norm / critic_grad_norm / model_grad_norm)."""
import sys, torch
sys.path.insert(0, sys.argv.pop(1))
import dreamer_v2 as d

orig_loss, orig_step, orig_update = d.ActorCritic.loss, d.Optimizer.step, d.Dreamer.update
line = {}

def loss(self, traj):
    out = orig_loss(self, traj)
    with torch.no_grad():
        x, s = self.actor.net(traj.feat[:-2].detach().flatten(0, 1).float()).float().chunk(2, -1)
        x, s = x.reshape(-1), s.reshape(-1)
        ax = x.abs().sort().values
        n = ax.numel()
        line.update(mean_x=f"{ax.mean():.3f}", median_x=f"{ax[n // 2]:.3f}",
                    frac_pos=f"{(x > 0).float().mean():.3f}",
                    at_bound=f"{(torch.tanh(x).abs() > 0.95).float().mean():.3f}",
                    std=f"{(2 * torch.sigmoid(s / 2) + 0.1).mean():.5f}", median_s=f"{s.median():.2f}",
                    ent=f"{float(out[2]['actor_entropy']):.4f}")
    return out

def step(self, loss):
    self.opt.zero_grad(set_to_none=True)
    loss.backward(inputs=self.params, retain_graph=True)
    norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
    line[getattr(self, "probe_name", "?") + "_gnorm"] = f"{float(norm):.6f}"
    return orig_step(self, loss)

def update(self, batch):
    for n, o in self.optimizers.items():
        o.probe_name = n
    out = orig_update(self, batch)
    print("XPROBE", update.count, " ".join(f"{k} {v}" for k, v in line.items()), flush=True)
    update.count += 1
    return out
update.count = 0

d.ActorCritic.loss, d.Optimizer.step, d.Dreamer.update = loss, step, update
sys.exit(d.main(sys.argv[1:]))
