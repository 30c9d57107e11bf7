"""benchmarks/train_step.py: a CPU smoke test of the speed benchmark, and the check that
the `compile` mode computes the same update as eager (slow: compilation takes 20-60 s per model on
a 2-core CPU; run with `python -m pytest -m slow tests/test_benchmarks.py`)."""

import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "train_step.py"
ENV_SPEED = ("# Benchmark results\n\n## Environment speed\n\n<!-- env_speed:begin -->\n"
             "| env | obs |\n| --- | --- |\n| dmc/walker-walk | pixels |\n<!-- env_speed:end -->\n")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(results: Path, *flags, timeout=600) -> str:
    results.write_text(ENV_SPEED)
    cmd = [sys.executable, str(SCRIPT), "--small", "--device", "cpu", "--threads", "1",
           "--results", str(results), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert text.startswith(ENV_SPEED), "the Environment speed block must stay as it was"
    assert "\n## Train step\n" in text[len(ENV_SPEED):]
    return text


def table(text: str, first_header: str) -> list[dict]:
    """The rows of the markdown table whose header starts with `first_header`, as dicts."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def positive(cell: str) -> bool:
    try:
        value = float(cell.replace(",", ""))
    except ValueError:
        return False
    return math.isfinite(value) and value > 0


def test_train_step_small_cpu(tmp_path):
    """Every preset in eager and bf16 mode, plus a short real Pong run: every time is a finite,
    positive number (however fast the machine: small times keep 3 significant digits), bf16 runs
    where this CPU has native bf16 and is reported as skipped elsewhere, the speed-up over eager
    is given, and RESULTS.md's other section is untouched."""
    text = run_benchmark(tmp_path / "RESULTS.md", "--modes", "eager", "bf16", "--repeats", "2",
                         "--warmup", "1", "--e2e-updates", "3", "--e2e-warmup", "1")
    native = load_benchmark().bf16_native("cpu")
    rows = table(text, "preset")
    assert {(r["preset"], r["mode"]) for r in rows} == {
        (p, m) for p in ("v1-dmc", "v1-dmc-state", "v2-atari", "v2-dmc", "v2-dmc-state")
        for m in ("eager", "bf16")}
    for row in rows:
        if row["mode"] == "eager" or native:
            for column in ("update ms", "updates/s", "policy step ms", "act ms", "sample ms"):
                assert positive(row[column]), (row, column)
            assert row["vs eager"] == ("1.00x" if row["mode"] == "eager" else row["vs eager"])
            assert positive(row["vs eager"].rstrip("x")), row
        else:
            assert row["note"].startswith("skipped") and not row["update ms"], row
    e2e = {r["mode"]: r for r in table(text, "mode")}
    assert positive(e2e["eager"]["env frames/s"]), e2e
    if native:
        assert positive(e2e["bf16"]["env frames/s"]), e2e
    else:
        assert e2e["bf16"]["note"].startswith("skipped")
    assert "torch " + torch.__version__ in text and "Load average" in text and "Allocator: " in text


def test_write_appends_under_heading(tmp_path):
    """A second run's block goes under the same heading, after the first; the rest is kept."""
    bench = load_benchmark()
    path = tmp_path / "RESULTS.md"
    path.write_text(ENV_SPEED)
    bench.write("### run 1\n\n| a |", path)
    bench.write("### run 2\n\n| b |", path)
    text = path.read_text()
    assert text.startswith(ENV_SPEED)
    assert text.count("## Train step") == 1
    assert text.index("### run 1") < text.index("### run 2")
    path.write_text(text + "\n## Later section\n\nkept\n")
    bench.write("### run 3", path)
    text = path.read_text()
    assert text.index("### run 2") < text.index("### run 3") < text.index("## Later section")
    assert text.endswith("## Later section\n\nkept\n")


@pytest.mark.slow
def test_train_step_compile_small_cpu(tmp_path):
    """The compile mode runs and gives a finite positive time (compilation: ~20-60 s on 2 cores)."""
    text = run_benchmark(tmp_path / "RESULTS.md", "--modes", "compile", "--presets", "v2-atari",
                         "--repeats", "2", "--no-e2e")
    (row,) = table(text, "preset")
    assert positive(row["update ms"]) and positive(row["policy step ms"]), row


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["v1-dmc", "v2-atari"])
def test_compile_matches_eager(preset):
    """One update from the same weights, batch and seed: losses agree within 1e-4 (relative) and the
    weights after the three AdamW steps within 1e-5 (absolute; one step moves a weight by about the
    learning rate, 2e-4 to 8e-5). Inductor draws its own random numbers unless `fallback_random`,
    so the test turns that on; measured on CPU: losses equal to 5e-7, weights to 7e-7."""
    import torch._inductor.config as inductor_config
    bench = load_benchmark()
    results = {}
    for mode in ("eager", "compile"):
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as logdir, inductor_config.patch(fallback_random=True):
            agent, _ = bench.build_agent(preset, mode, True, "cpu", logdir)
            try:
                assert agent.cfg.compile == (mode == "compile")
                bench.fill_replay(agent)
                batch = bench.to_device(agent, agent.replay.sample(agent.cfg.batch_size))
                torch.manual_seed(123)
                metrics = agent.dreamer.update(batch)
                params = {k: v.detach().clone() for k, v in agent.dreamer.named_parameters()}
                results[mode] = metrics, params
            finally:
                agent.close()
    (m_eager, p_eager), (m_compiled, p_compiled) = results["eager"], results["compile"]
    assert m_eager["finite"] == m_compiled["finite"] == 1.0
    for key, value in m_eager.items():
        assert m_compiled[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for key, value in p_eager.items():
        torch.testing.assert_close(p_compiled[key], value, rtol=0, atol=1e-5, msg=key)


def test_env_speed_smoke(tmp_path):
    """benchmarks/env_speed.py on two backends for a moment each: every row measured, the table
    written between its markers and the rest of RESULTS.md left as it was."""
    results = tmp_path / "RESULTS.md"
    other = "\n## Train step\n\nearlier results\n"
    results.write_text(ENV_SPEED + other)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "env_speed.py"), "--seconds", "0.3",
           "--only", "gym", "atari", "--results", str(results)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert text.endswith(other) and text.count("<!-- env_speed:begin -->") == 1
    rows = table(text, "env")
    assert {row["env"] for row in rows} == {"gym/Pendulum-v1", "gym/CartPole-v1", "atari/Pong"}
    for row in rows:
        assert positive(row["agent steps/s"]) and positive(row["env steps/s"]), row
        frames = float(row["env steps/s"].replace(",", ""))
        agent = float(row["agent steps/s"].replace(",", ""))
        assert frames == pytest.approx(agent * int(row["action repeat"]), rel=0.01), row


def test_bf16_rows_run_bf16_where_the_scripts_would_run_fp32(tmp_path, monkeypatch):
    """Where bf16 is native but the scripts' speed check runs precision 16 as fp32, a bf16 row
    still measures bf16 (its autocast is on) and its note says so; an eager row stays fp32."""
    bench = load_benchmark()
    v2 = importlib.import_module("dreamer_v2")
    monkeypatch.setattr(v2, "bf16_is_fast", lambda device: (False, "bf16 is not faster than fp32"))
    for mode, precision in (("bf16", 16), ("eager", 32)):
        agent, note = bench.build_agent("v2-dmc-state", mode, True, "cpu", str(tmp_path / mode))
        try:
            assert agent.cfg.precision == precision
            assert ("bf16 forced" in note) == (mode == "bf16"), note
            with agent.dreamer.autocast():
                assert torch.is_autocast_enabled("cpu") == (mode == "bf16")
        finally:
            agent.close()
