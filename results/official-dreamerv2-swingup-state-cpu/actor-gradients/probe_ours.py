"""Which part of the imagined return pushes the actor's std up? (a measurement, not part of the agent)
Per pre-training update: E[dJ/da * (a - mean)/std] (the location-scale gradient w.r.t. std) and
E[dJ/da * sign(mean)] (push towards the mean's bound), for J = reward part and value part of the
lambda-return objective."""
import sys, torch
sys.path.insert(0, sys.argv[1])
import dreamer_v2 as v2
KEEP = {}
orig_imagine = v2.RSSM.imagine
def imagine(self, start, actor, horizon):
    state, feats, actions, dists = start, [self.feat(start)], [], []
    for _ in range(horizon):
        d = actor(feats[-1].detach())
        action = d.rsample()
        state = self.img_step(state, action)
        feats.append(self.feat(state)); actions.append(action); dists.append(d)
    KEEP["actions"], KEEP["dists"] = actions, dists
    actions = [torch.zeros_like(actions[0])] + actions
    return torch.stack(feats), torch.stack(actions)
v2.RSSM.imagine = imagine
orig_loss = v2.ActorCritic.loss
calls = [0]
def loss(self, traj):
    cfg = self.cfg
    value = self.slow_value(traj.feat).float().squeeze(-1)
    z = torch.zeros_like(value)
    ret_r = v2.lambda_return(traj.reward[:-1], z[:-1], traj.discount[:-1], z[-1], cfg.td_lambda)
    ret_v = v2.lambda_return(z[:-1], value[:-1], traj.discount[:-1], value[-1], cfg.td_lambda)
    w = torch.cumprod(torch.cat([torch.ones_like(traj.discount[:1]), traj.discount[:-1]]), 0).detach()
    acts = KEEP["actions"][:-1]            # a_1 .. a_{H-1}, scored by returns[1:]
    out = []
    for ret in (ret_r, ret_v):
        J = (w[:-2] * ret[1:]).mean()
        g = torch.autograd.grad(J, acts, retain_graph=True)
        s_std = s_mean = n = 0.0
        for gi, a, d in zip(g, acts, KEEP["dists"][:-1]):
            s_std += (gi * (a - d.mean) / d.std).sum().item()
            s_mean += (gi * torch.sign(d.mean)).sum().item()
            n += gi.numel()
        out += [s_std / n * 1e6, s_mean / n * 1e6]
        if len(out) == 2:
            agree = sum((gi * torch.sign(d.mean) > 0).sum().item() for gi, d in zip(g, KEEP["dists"][:-1])) / n
            mag = sum(gi.abs().sum().item() for gi in g) / n * 1e6
    with torch.no_grad():
        d = self.actor(traj.feat[:-2].detach())
    print("GRADS", calls[0], "reward: std %.3f push %.3f | value: std %.3f push %.3f" % tuple(out),
          "| std %.3f" % d.std.mean().item(), "agree %.3f mag %.3f" % (agree, mag), flush=True)
    calls[0] += 1
    return orig_loss(self, traj)
v2.ActorCritic.loss = loss
sys.exit(v2.main(sys.argv[2:]))
