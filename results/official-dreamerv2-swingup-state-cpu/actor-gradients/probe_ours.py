"""Which part of the imagined return moves the actor? (a measurement, not part of the agent)
Per update, for J = the reward part and the value part of the lambda-return objective:
E[dJ/da * (a - mean)/std] (the location-scale gradient w.r.t. the std), E[dJ/da * sign(mean)]
(the push towards the mean's bound), and for the reward part the share of actions whose gradient
points towards that bound and the mean |dJ/da|. Usage: python probe_ours.py CODE_DIR ARGS..."""
import sys
import torch
sys.path.insert(0, sys.argv[1])
import dreamer_v2 as v2

SAMPLES = []                                      # (distribution, action) of the last imagination
rsample, imagine, loss = v2.TruncNormal.rsample, v2.WorldModel.imagine, v2.ActorCritic.loss


def recording_rsample(self, shape=()):
    action = rsample(self, shape)
    SAMPLES.append((self, action))
    return action


def recording_imagine(self, *args, **kwargs):
    SAMPLES.clear()
    return imagine(self, *args, **kwargs)


def project(grads, samples):
    n = sum(g.numel() for g in grads)
    std = sum((g * (a - d.mean) / d.std).sum().item() for g, (d, a) in zip(grads, samples))
    push = sum((g * torch.sign(d.mean)).sum().item() for g, (d, a) in zip(grads, samples))
    agree = sum((g * torch.sign(d.mean) > 0).sum().item() for g, (d, a) in zip(grads, samples))
    size = sum(g.abs().sum().item() for g in grads)
    return std / n * 1e6, push / n * 1e6, agree / n, size / n * 1e6


def probing_loss(self, traj):
    value = self.slow_value(traj.feat).float().squeeze(-1)
    zero = torch.zeros_like(value)
    weights = torch.cumprod(torch.cat([torch.ones_like(traj.discount[:1]), traj.discount[:-1]]), 0)
    samples = SAMPLES[:-1]                        # a_1 .. a_{H-1}, scored by returns[1:]
    parts = []
    for reward, val in ((traj.reward, zero), (zero, value)):   # G(r, v) = G(r, 0) + G(0, v)
        returns = v2.lambda_return(reward[:-1], val[:-1], traj.discount[:-1], val[-1], self.cfg.td_lambda)
        objective = (weights[:-2].detach() * returns[1:]).mean()
        parts.append(project(torch.autograd.grad(objective, [a for _, a in samples], retain_graph=True),
                             samples))
    (r_std, r_push, agree, size), (v_std, v_push, _, _) = parts
    with torch.no_grad():
        std = self.actor(traj.feat[:-2].detach()).std.mean().item()
    print("GRADS", probing_loss.calls, "reward: std %.3f push %.3f | value: std %.3f push %.3f"
          % (r_std, r_push, v_std, v_push), "| std %.3f" % std, "agree %.3f mag %.3f" % (agree, size),
          flush=True)
    probing_loss.calls += 1
    return loss(self, traj)


probing_loss.calls = 0
v2.TruncNormal.rsample, v2.WorldModel.imagine = recording_rsample, recording_imagine
v2.ActorCritic.loss = probing_loss
sys.exit(v2.main(sys.argv[2:]))
