"""The pitfalls of the original documentation page that the console names: the rule on hand-made
metrics records, a deliberately broken real run that shows the right warning once, and the recorded
learning runs under results/ on which no warning fires."""

from pathlib import Path

import pytest
import yaml
from helpers import VARIANTS, module, read_jsonl, run_main, tiny, to_cli

ROOT = Path(__file__).resolve().parent.parent


def records(floors, updates_per_record=100, **extra):
    """Metrics lines as a run writes them: one per scalar_freq, `updates` counted so far."""
    return [dict(step=1000 * (i + 1), kl_at_floor=f, kl=0.5, post_entropy=3.0, prior_entropy=4.0,
                 updates=updates_per_record * (i + 1), **extra) for i, f in enumerate(floors)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_floor_needs_every_update_of_the_last_500_at_the_floor(variant):
    mod = module(variant)
    cfg = mod.DreamerConfig(env="dmc/walker-walk")
    n = mod.PITFALL_UPDATES
    assert n == 500
    assert mod.pitfalls(records([1.0] * 4), cfg) == {}                          # 400 updates: not yet
    assert set(mod.pitfalls(records([1.0] * 5), cfg)) == {"kl_floor"}            # 500 updates
    assert "500 updates" in mod.pitfalls(records([1.0] * 5), cfg)["kl_floor"]
    # One record with a single update above the floor (0.99) restarts the count.
    assert mod.pitfalls(records([1.0] * 6 + [0.99] + [1.0] * 4), cfg) == {}
    assert "500 updates" in mod.pitfalls(records([0.99] + [1.0] * 5), cfg)["kl_floor"]
    # A healthy run: the KL is at the floor in a third of the updates.
    assert mod.pitfalls(records([0.3] * 50), cfg) == {}
    assert set(mod.pitfalls(records([0.3] * 3, nonfinite_updates=2), cfg)) == {"nan"}


def test_free_nats_far_above_the_kl_is_named_once(tmp_path, capsys, monkeypatch):
    """A real run with free_nats 100 (the KL is a few nats): the KL term never sends a gradient.
    With the threshold lowered to 40 updates so the run stays short, the console names it once."""
    mod = module("dreamer_v2")
    monkeypatch.setattr(mod, "PITFALL_UPDATES", 40)
    fields = tiny("dreamer_v2", free_nats=100.0, train_steps=20, total_steps=400, logdir=tmp_path / "run")
    rc, _, err = run_main("dreamer_v2", to_cli(fields), capsys)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: the KL has been below free_nats (100)")]
    assert len(warnings) == 1, err
    assert "lower --free_nats" in warnings[0] and "When it does not learn" in warnings[0]

    # The same run without free nats: the KL is never at its floor, and nothing is said.
    healthy = tiny("dreamer_v2", free_nats=0.0, train_steps=20, total_steps=400, logdir=tmp_path / "free0")
    rc, _, err = run_main("dreamer_v2", to_cli(healthy), capsys)
    assert rc == 0 and "warning: the KL" not in err, err


def recorded_runs():
    """Every recorded run, those drawn side by side in one figure (results/<run>/<label>/) too;
    not the official code's runs kept beside ours for comparison (results/<run>/official/)."""
    return sorted(p.parent for p in (ROOT / "results").rglob("metrics.jsonl") if p.parent.name != "official")


@pytest.mark.parametrize("run", recorded_runs(), ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_no_pitfall_warning_fires_on_the_recorded_runs(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    variant = "dreamer_v1" if str(config.get("algo", "Dreamerv1")).lower().endswith("v1") else "dreamer_v2"
    mod = module(variant)
    fields = {k: v for k, v in config.items() if k in mod.FIELDS}
    history = []
    for record in read_jsonl(run / "metrics.jsonl"):
        history.append(record)
        assert mod.pitfalls(history, mod.DreamerConfig(**fields)) == {}, record["step"]
