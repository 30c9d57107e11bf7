"""Shared test helpers: a tiny Dreamer configuration that trains in seconds on a 2-core CPU.

The sizes are far below the paper's (units 400, deter 200, batch 50 x 50, horizon 15): the tests
check that the real code runs end to end and that its math is right, not that it learns fast.
"""

import pytest
from helpers import to_cli

# Field -> value of the tiny configuration (the same field names in dreamer_v1.py and dreamer_v2.py).
TINY = dict(
    num_units=32, deter_size=32, stoch_size=8, hidden_size=32,  # networks
    cnn_depth=8, obs_embed_size=128,                               # conv stack at depth 8: 256 features
    batch_size=3, train_seq_len=10, imagine_horizon=4,             # one update takes ~50 ms
    seed_steps=100, train_every=100, train_steps=3, pretrain_steps=3,
    time_limit=100, fast_render=True,                              # 100-step episodes, cheap DMC renders
    eval_every=200, scalar_freq=100, checkpoint_interval=100,
    total_steps=300, device="cpu",
)


@pytest.fixture(scope="session")
def tiny_fields():
    """Factory: the tiny configuration's fields as a dict, with `overrides` applied."""
    def make(**overrides):
        return {**TINY, **overrides}
    return make


@pytest.fixture
def tiny_config(tmp_path, tiny_fields):
    """Factory: a tiny `dreamer_v1.DreamerConfig` whose run directory is inside `tmp_path`."""
    def make(**overrides):
        import dreamer_v1
        return dreamer_v1.DreamerConfig(**tiny_fields(logdir=str(tmp_path / "run"), **overrides))
    return make


@pytest.fixture(scope="session")
def cli():
    """helpers.to_cli as a fixture."""
    return to_cli
