"""dreamer_v2.py's CLI with a print after every update: the actor's, the critic's and the world
model's gradient norms before clipping (the official code logs actor_grad_norm and the like).

    python gradnorm_ours.py CODE_DIR --resume RUN [--total_steps N]"""
import sys, torch
sys.path.insert(0, sys.argv.pop(1))
import dreamer_v2 as d

orig_step, count = d.Optimizer.step, [0]
def step(self, loss):
    self.opt.zero_grad(set_to_none=True)
    loss.backward(inputs=self.params, retain_graph=True)
    norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
    name = getattr(self, "probe_name", "?")
    print("GNORM", count[0], name, f"{float(norm):.6f}", flush=True)
    if name == "model":
        count[0] += 1
    return orig_step(self, loss)
d.Optimizer.step = step
orig_init = d.Dreamer.__init__
def init(self, *a, **k):
    orig_init(self, *a, **k)
    for n, o in self.optimizers.items():
        o.probe_name = n
d.Dreamer.__init__ = init
sys.exit(d.main(sys.argv[1:]))
