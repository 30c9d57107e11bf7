"""What a person sees running the scripts: runs that would do nothing say so, finished runs say how to
go on, mistakes leave nothing behind, Ctrl-C in Python raises after the checkpoint, the console
speaks at least every 30 s, and the pictures carry their labels."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import VARIANTS, module, one_error_line, run_main, tiny, to_cli


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_that_would_train_nothing_says_so_before_it_starts(variant, tmp_path, capsys):
    rc, out, err = run_main(variant, to_cli(tiny(variant, seed_steps=100, total_steps=60,
                                                 logdir=tmp_path / "run")), capsys)
    assert rc == 0
    assert "warning: total_steps (60) is below seed_steps (100)" in err
    assert "trains nothing; raise --total_steps" in err
    assert err.index("warning: total_steps") < len(err) and "phase: prefill" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_resuming_a_finished_run_says_it_is_complete_and_how_to_extend_it(variant, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(variant, to_cli(tiny(variant, total_steps=200, logdir=run)), capsys)[0] == 0
    rc, out, _ = run_main(variant, ["--resume", run], capsys)
    assert rc == 0
    assert f"this run is complete (total_steps 200); to train on, resume it with a larger total: " \
           f"--resume {run} --total_steps 400" in out
    assert "phase: " not in out                                   # nothing left to do, none named
    rc, out, _ = run_main(variant, ["--resume", run, "--total_steps", 300], capsys)
    assert rc == 0 and "is complete" not in out and "phase: training" in out
    assert module(variant).load_torch(sorted((run / "ckpts").glob("ckpt-*.pt"))[-1])["counters"]["env_steps"] == 300


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_mistyped_env_is_one_line_with_the_close_match_and_leaves_nothing(variant, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                          # the default run directory would be here
    rc, _, err = run_main(variant, ["--env", "dmc/walker_walk"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "walker_walk" in line and "walker-walk" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_ctrl_c_in_python_writes_the_checkpoint_then_raises(variant, tmp_path, capsys, monkeypatch):
    """agent.train() in a script: SIGINT during an update writes the final checkpoint, prints the
    --resume line, then raises KeyboardInterrupt, so the rest of the script does not run on a
    barely trained model."""
    mod = module(variant)
    agent = mod.DreamerAgent(mod.DreamerConfig(**tiny(variant, total_steps=400, logdir=tmp_path / "run")))
    train_batch = mod.DreamerAgent.train_batch

    def interrupted(self):
        if self.updates == 3:
            os.kill(os.getpid(), signal.SIGINT)          # through the script's own handler
        return train_batch(self)

    monkeypatch.setattr(mod.DreamerAgent, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        agent.train()
    out, err = capsys.readouterr()
    assert err.strip() == "SIGINT: stopping after this step; writing a checkpoint"
    ckpt = sorted((tmp_path / "run" / "ckpts").glob("ckpt-*.pt"))[-1]
    assert f"stopped by SIGINT at env step {agent.step}; checkpoint saved" in out
    assert f"--resume {tmp_path / 'run'}" in out and ckpt.name == f"ckpt-{agent.step:010d}.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is restored
    agent.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_console_prints_a_line_at_least_every_30_seconds(variant, tmp_path, capsys, monkeypatch):
    mod = module(variant)
    agent = mod.DreamerAgent(mod.DreamerConfig(**tiny(variant, logdir=tmp_path / "run")))
    clock = [1000.0]
    monkeypatch.setattr(mod.time, "time", lambda: clock[0])
    agent.console.start(agent)
    capsys.readouterr()
    for seconds, expect_line in ((29.0, False), (30.5, True), (10.0, False), (25.0, True)):
        clock[0] += seconds
        agent.console.tick(agent)
        printed = capsys.readouterr().out
        assert bool(printed) == expect_line, (seconds, printed)
        if expect_line:
            assert printed.startswith("[") and "%" in printed and "/300" in printed
    agent.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_open_loop_gif_has_row_labels_dividers_and_marks_imagination(variant):
    mod = module(variant)
    T, B, context = 8, 3, 5
    truth = torch.zeros(T, B, 64, 64, 1) - 0.5                   # black frames
    frames = mod.openloop_frames(truth, truth.clone(), context)
    assert len(frames) == T
    first = np.asarray(frames[0].convert("RGB"))
    assert first.shape == (14 + 3 * 66, 48 + B * 66, 3)
    label_column = first[14:, :46]
    for row in range(3):                                          # truth / model / error: text in each
        band = label_column[row * 66:(row + 1) * 66]
        assert (band < 128).any(), row
    dividers = first[14:, [48 + 64 + b * 66 for b in range(B - 1)]]
    assert (dividers == 255).all()                                # white columns between samples
    red = lambda image: ((image[..., 0] > 200) & (image[..., 1] < 80)).sum()  # noqa: E731
    assert red(first) == 0                                        # context: no red frame yet
    imagined = np.asarray(frames[context].convert("RGB"))
    assert red(imagined) > 2 * 64                                 # the model row framed in red
    big = mod.openloop_frames(truth, truth.clone(), context, scale=2)[0]
    assert big.size == (2 * frames[0].size[0], 2 * frames[0].size[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_curves_have_a_title_readable_ticks_the_prefill_and_the_evaluations(variant, tmp_path):
    mod = module(variant)
    cfg = mod.DreamerConfig(env="dmc/walker-walk", seed=3, seed_steps=5000)
    run = tmp_path / "myrun"
    run.mkdir()
    cfg.to_yaml(run / "config.yaml")
    lines = [dict(step=s, model_loss=1.0, kl=2.0, train_return=float(s), **(
        {"eval_return": 2.0 * s} if s % 50_000 == 0 else {})) for s in range(10_000, 260_000, 10_000)]
    (run / "metrics.jsonl").write_text("".join(f"{__import__('json').dumps(r)}\n" for r in lines))
    fig = mod.curves_figure(run)
    title = fig._suptitle.get_text()
    assert mod.ALGO in title and "dmc/walker-walk" in title and "seed 3" in title and "myrun" in title
    returns = fig.axes[0]
    fig.canvas.draw()
    ticks = [t.get_text() for t in returns.get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith(("k", "M")) or t == "0" for t in ticks), ticks
    formatter = returns.xaxis.get_major_formatter()
    assert [formatter(x, 0) for x in (0, 500, 1e5, 2.5e6)] == ["0", "500", "100k", "2.5M"]
    assert any(p.get_label() == "prefill" for p in returns.patches)
    evals = [line for line in returns.get_lines() if line.get_label() == "eval return"]
    assert evals and evals[0].get_marker() == "o" and len(evals[0].get_xdata()) == 5
    assert mod.plot_curves(run) == run / "curves.png" and (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("variant", VARIANTS)
def test_actor_mean_at_bound_is_the_share_of_action_dims_past_095(variant):
    """The actor's output layer set to a constant mean per action dimension: raw 3.0 squashes past
    0.95 (V2: tanh(3) = 0.995; V1: tanh(5 tanh(3 / 5)) = 0.991), raw 0.5 does not (0.46, 0.46),
    raw -3.0 is past the lower bound: so two of the three dimensions count, in every state."""
    mod = module(variant)
    cfg = mod.DreamerConfig(env="gym/Pendulum-v1", obs="state", stoch_size=4, deter_size=16,
                            hidden_size=16, num_units=24, imagine_horizon=3,
                            **({"num_categories": 3} if variant == "dreamer_v2" else {}))
    model = mod.Dreamer(cfg, (5,), 3, False)
    ac, feat_size = model.actor_critic, model.world_model.feat_size
    out = ac.actor.net.net[-1]
    with torch.no_grad():
        out.weight.zero_()
        out.bias.copy_(torch.tensor([3.0, 0.5, -3.0, 0.0, 0.0, 0.0]))       # means, then stds
    gen = torch.Generator().manual_seed(0)
    traj = mod.Imagined(feat=torch.randn(4, 6, feat_size, generator=gen),
                        action=torch.rand(4, 6, 3, generator=gen) * 2 - 1,
                        reward=torch.randn(4, 6, generator=gen), discount=torch.full((4, 6), 0.99))
    *_, metrics = ac.loss(traj)
    assert float(metrics["actor_mean_at_bound"]) == pytest.approx(2 / 3)
    discrete = mod.Dreamer(cfg, (5,), 3, True)
    *_, metrics = discrete.actor_critic.loss(traj)
    assert "actor_mean_at_bound" not in metrics                  # one-hot actions have no bound
