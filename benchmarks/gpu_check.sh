#!/usr/bin/env bash
# benchmarks/gpu_check.sh: what this repository checks on a GPU, as one command for a lent GPU
# machine (NVIDIA H200/H100, python3 3.12 with CUDA torch, no network), done within --budget
# seconds (480 by default), everything it returns written under $OUT:
#   (a) installs the carried bundle: .gl/*.deb (EGL/OpenGL loaders) and .whl/*.whl (gymnasium,
#       ale-py, dm_control, mujoco) into /tmp/site, as ../shared/tools/device-wheels.sh says;
#   (b) runs tests/test_cuda.py (bf16 and compile agree with eager fp32; the policy step on CUDA);
#   (c) runs benchmarks/train_step.py --device cuda at the official sizes (v1-dmc, v2-atari,
#       v2-dmc; eager, bf16, compile, bf16+compile; policy step; end-to-end Pong frames/s) and
#       appends its table to a copy of benchmarks/RESULTS.md in $OUT;
#   (d) with the time left, trains dreamer_v2.py on dmc/walker-walk (pixels, the official dmc
#       preset, total_steps 100000, eval_every 10000, eval_episodes 10) in runs/gpu-walker (ignored
#       by git, outside $OUT: it stays on a warm machine), stops it with SIGINT before the deadline
#       (it writes a checkpoint), and copies metrics.jsonl, config.yaml, curves.png and the newest
#       open-loop GIF to $OUT/walker/. The next call on the same warm machine resumes it (--resume).
#
# HOW TO CALL IT, from a session whose task is lent a GPU (the device tool's `status` says so):
#   1. Here, in the repository root, right before the call (rerun it after any commit or edit):
#        bash benchmarks/gpu_check.sh --prepare
#      It builds .whl/ and .gl/ with ../shared/tools/device-wheels.sh if they are missing, writes
#      COMMIT (the commit the benchmark records: .git does not travel, so the benchmark reads it
#      from this file there), keeps COMMIT out of git (.git/info/exclude) and prints the sizes.
#   2. The device tool:
#        run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gl", "COMMIT"], timeout_s=540)
#      The script ends by itself within 480 s (--budget); the 60 s more are a safety margin.
#      The reply's output_tail ends with the summary; the files come back under files_at.
#   3. At once (a machine stays warm only 30 s after a call), to train the walker on:
#        run(command="bash benchmarks/gpu_check.sh --only walker --budget 180",
#            carry=[".whl", ".gl", "COMMIT"], timeout_s=240)
#      with --budget at most status's budget_left_s minus 90 and timeout_s = budget + 60;
#      then give_back(). On a fresh (not warm) machine that call starts a new walker run.
#   $OUT gets 8 files at most (the tool returns no more): gpu_check.log (everything printed, the
#   summary last), pytest-cuda.log, RESULTS.md, walker/walker.log, walker/metrics.jsonl,
#   walker/config.yaml, walker/curves.png, walker/openloop-<step>.gif.
#
# Here, on a CPU:  bash benchmarks/gpu_check.sh --dry-run
#   The same steps at tiny sizes in about 1.5 minutes: no install, the CUDA tests collected and
#   skipped, train_step.py --small --device cpu (eager and bf16: compiling takes minutes on a CPU),
#   a tiny walker run with --fast_render true, stopped by SIGINT at its first logged update
#   rather than at the deadline, so that its result does not depend on the machine's speed.
#   $OUT defaults to a new temp dir. tests/test_gpu_check.py runs it.
#
# Options: --dry-run | --prepare | --only tests,bench,walker (default: all three) |
#          --budget SECONDS (default 480; dry run 900, a hang guard only)
# Environment: OUT, PYTHON (python3), WALKER_DIR (runs/gpu-walker; dry run runs/gpu-walker-dry),
#   RESULTS_MD (benchmarks/RESULTS.md: the file copied to $OUT), COMMIT_FILE (COMMIT),
#   BENCH_ARGS (more train_step.py flags, e.g. "--modes compile bf16+compile"), TESTS_S (150).
# Exit status: 0 when every phase that ran passed (the walker stopped by SIGINT counts as passed).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
T0=$(date +%s)
DRY=0 PREPARE=0 ONLY="tests,bench,walker" BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --prepare) PREPARE=1 ;;
    --only) ONLY=${2:?--only needs a list: tests,bench,walker}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for phase in ${ONLY//,/ }; do
  case $phase in tests|bench|walker) ;; *) echo "error: --only: unknown phase '$phase' (tests, bench, walker)" >&2; exit 2 ;; esac
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
COMMIT_FILE=${COMMIT_FILE:-$ROOT/COMMIT}

# ------------------------------------------------------------------------------------------------
# --prepare: here, before the device call
# ------------------------------------------------------------------------------------------------
if [ "$PREPARE" = 1 ]; then
  git rev-parse --show-toplevel >/dev/null 2>&1 || { echo "error: --prepare runs in the git checkout" >&2; exit 1; }
  if ! compgen -G ".whl/*.whl" >/dev/null || ! compgen -G ".gl/*.deb" >/dev/null; then
    wheels=${DEVICE_WHEELS:-}
    for candidate in "$ROOT/../shared/tools/device-wheels.sh" "$ROOT/shared/tools/device-wheels.sh"; do
      [ -z "$wheels" ] && [ -f "$candidate" ] && wheels=$candidate
    done
    [ -n "$wheels" ] || { echo "error: device-wheels.sh not found (set DEVICE_WHEELS)" >&2; exit 1; }
    echo "building .whl/ and .gl/ with $wheels"
    bash "$wheels" || exit 1
  fi
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/COMMIT' "$exclude" 2>/dev/null || echo '/COMMIT' >> "$exclude"
  # train_step.commit(): the short hash plus the benchmarked files with uncommitted changes.
  if ! env -u BENCH_COMMIT "$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import train_step; print(train_step.commit())' \
      > "$COMMIT_FILE" 2>/dev/null; then
    git rev-parse --short HEAD > "$COMMIT_FILE"
  fi
  echo "COMMIT: $(cat "$COMMIT_FILE")"
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  bundle=$(du -sbc .whl .gl "$COMMIT_FILE" | tail -n 1 | cut -f 1)
  echo "travels: working tree $((tree / 1048576)) MiB + .whl/.gl/COMMIT $((bundle / 1048576)) MiB" \
       "= $(((tree + bundle) / 1048576)) MiB (the limit is 64 MiB)"
  [ $((tree + bundle)) -lt $((62 * 1048576)) ] || echo "warning: close to or over the 64 MiB a call may carry"
  echo 'now: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gl", "COMMIT"], timeout_s=540)'
  exit 0
fi

# ------------------------------------------------------------------------------------------------
# Settings of the two modes
# ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  BUDGET=${BUDGET:-900}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  WALKER_DIR=${WALKER_DIR:-$ROOT/runs/gpu-walker-dry}
  BENCH=(--small --device cpu --threads 1 --presets v1-dmc v2-atari v2-dmc --modes eager bf16
         --repeats 2 --warmup 1 --e2e-prefill 1000 --e2e-updates 3 --e2e-warmup 1)
  WALKER_NEW=(--env dmc/walker-walk --obs pixels --device cpu --fast_render true
              --num_units 32 --deter_size 32 --hidden_size 32 --stoch_size 8 --num_categories 8
              --cnn_depth 8 --obs_embed_size 256 --batch_size 3 --train_seq_len 10 --imagine_horizon 4
              --seed_steps 100 --train_every 10 --pretrain_steps 2 --time_limit 100
              --total_steps 2000 --eval_every 200 --eval_episodes 1 --scalar_freq 100
              --checkpoint_interval 1000)
  STOP_GRACE=60 END_MARGIN=10 WALKER_MIN=20 BENCH_ROW=60
else
  BUDGET=${BUDGET:-480}
  WALKER_DIR=${WALKER_DIR:-$ROOT/runs/gpu-walker}
  BENCH=(--device cuda --presets v1-dmc v2-atari v2-dmc --modes eager bf16 compile bf16+compile)
  WALKER_NEW=(--env dmc/walker-walk --obs pixels --device cuda --total_steps 100000
              --eval_every 10000 --eval_episodes 10)
  # SIGINT to exit: the current step, the partial episode, a checkpoint, curves.png (~10 s); the
  # script goes on as soon as the run has exited, STOP_GRACE is only the most it waits.
  STOP_GRACE=30 END_MARGIN=15 WALKER_MIN=60 BENCH_ROW=45
fi
# shellcheck disable=SC2206
BENCH+=(${BENCH_ARGS:-})
RESULTS_MD=${RESULTS_MD:-$ROOT/benchmarks/RESULTS.md}
TESTS_S=${TESTS_S:-150}
has() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# Deadlines, in seconds since the epoch, all from the start T0: everything is over by FINAL; the
# walker gets SIGINT at WALKER_STOP; the benchmark starts no row after BENCH_SOFT and is
# interrupted (it still writes its table) at BENCH_HARD, which leaves the walker WALKER_MIN s.
END=$((T0 + BUDGET)); FINAL=$((END - END_MARGIN))
if has walker; then WALKER_STOP=$((FINAL - STOP_GRACE)); WORK_END=$((WALKER_STOP - WALKER_MIN))
else WALKER_STOP=$FINAL; WORK_END=$FINAL; fi
BENCH_HARD=$WORK_END; BENCH_SOFT=$((BENCH_HARD - BENCH_ROW))

if [ -z "${OUT:-}" ]; then OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-out.XXXXXX"); fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-work.XXXXXX")

say() { printf '[gpu_check %4ds] %s\n' $(($(date +%s) - T0)) "$*"; }
declare -A STATUS=()
PHASES=()
status() { PHASES+=("$1"); STATUS[$1]=$2; say "$1: $2"; }
left() { echo $(($1 - $(date +%s))); }

# ------------------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------------------
machine_info() {
  say "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU, tiny sizes)' || echo 'GPU'); budget ${BUDGET} s;" \
      "phases: $ONLY; OUT=$OUT; walker run: $WALKER_DIR"
  say "host: $(uname -srm); $(getconf _NPROCESSORS_ONLN) cores; $(date -u '+%Y-%m-%d %H:%M UTC')"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem,temperature.gpu \
      --format=csv 2>&1 | sed 's/^/    /'
  fi
  "$PY" -c 'import sys, torch; print(f"    python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}; "
                              f"CUDA {torch.version.cuda}; cuda available: {torch.cuda.is_available()}"
                              + (f"; {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))' 2>&1
  # The commit train_step.py records: git's where this is a checkout, else the COMMIT file's.
  if [ -n "${BENCH_COMMIT:-}" ]; then
    say "commit: BENCH_COMMIT=$BENCH_COMMIT (from the caller)"
  elif git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
    say "commit: read by train_step.py from git ($(git -C "$ROOT" rev-parse --short HEAD))"
  elif [ -s "$COMMIT_FILE" ]; then
    export BENCH_COMMIT="$(head -n 1 "$COMMIT_FILE"), from the COMMIT file written before the call"
    say "commit: not a git checkout here; BENCH_COMMIT=$BENCH_COMMIT"
  else
    export BENCH_COMMIT="unknown: no git checkout here and no COMMIT file (bash benchmarks/gpu_check.sh --prepare writes it)"
    say "commit: $BENCH_COMMIT"
  fi
}

install_bundle() {   # (a), on the GPU machine only; then the import and render check (both modes)
  if [ "$DRY" = 0 ]; then
    if [ -f /tmp/site/.gpu_check_installed ]; then
      say "install: already in /tmp/site (a warm machine)"
    else
      if compgen -G ".gl/*.deb" >/dev/null; then
        for f in .gl/*.deb; do dpkg -x "$f" / || { status install "FAILED: dpkg -x $f"; return; }; done
        ldconfig
      else
        say "install: warning: no .gl/*.deb carried (MuJoCo may not find libEGL)"
      fi
      if ! compgen -G ".whl/*.whl" >/dev/null; then
        status install "FAILED: no .whl/*.whl carried: run 'bash benchmarks/gpu_check.sh --prepare' here and carry .whl"
        return
      fi
      if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        status install "FAILED: pip install of .whl/*.whl"
        return
      fi
      touch /tmp/site/.gpu_check_installed
    fi
    export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH} MUJOCO_GL=egl
  else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi
  local check='
import os, time; t = time.time()
os.environ.setdefault("MUJOCO_GL", "egl")   # as common.py does
import ale_py, dm_control, gymnasium, mujoco
from dm_control import suite
env = suite.load("walker", "walk", task_kwargs={"random": 0}); env.reset()
image = env.physics.render(64, 64, camera_id=0)
print(f"    gymnasium {gymnasium.__version__}, ale-py {ale_py.__version__}, mujoco {mujoco.__version__}; "
      f"dm_control walker rendered {image.shape} (mean {image.mean():.1f}) in {time.time() - t:.1f} s")'
  if "$PY" -c "$check" 2>&1 | tail -n 3; then
    status install "ok"
    return
  fi
  local vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  if [ "$DRY" = 0 ] && [ -f "$vendor" ]; then
    say "install: rendering failed; again with __EGL_VENDOR_LIBRARY_FILENAMES=$vendor"
    export __EGL_VENDOR_LIBRARY_FILENAMES=$vendor
    [ -f "$icd" ] && export VK_DRIVER_FILES=$icd
    if "$PY" -c "$check" 2>&1 | tail -n 3; then status install "ok (with NVIDIA's EGL vendor file)"; return; fi
  fi
  status install "FAILED: the envs do not import or MuJoCo does not render (see above)"
}

tests_phase() {      # (b)
  local until=$WORK_END
  has bench && until=$((BENCH_SOFT - 60))
  local cap=$(left "$until")
  [ "$cap" -gt "$TESTS_S" ] && cap=$TESTS_S
  if [ "$cap" -lt 20 ]; then status tests "skipped: only ${cap} s left for them"; return; fi
  say "tests: pytest tests/test_cuda.py (at most $cap s) > \$OUT/pytest-cuda.log"
  timeout --foreground -s INT -k 15 "$cap" "$PY" -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py \
    > "$OUT/pytest-cuda.log" 2>&1
  local rc=$?
  grep -E '^(PASSED|FAILED|SKIPPED|ERROR)|^CUDA |relative difference' "$OUT/pytest-cuda.log" | head -n 40 | sed 's/^/    /'
  local summary
  summary=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest-cuda.log" | tail -n 1)
  case $rc in
    0) status tests "ok: $summary" ;;
    124) status tests "FAILED: stopped after $cap s: $summary" ;;
    *) status tests "FAILED (pytest exit $rc): $summary" ;;
  esac
}

bench_phase() {      # (c)
  local soft hard
  soft=$(left "$BENCH_SOFT"); hard=$(left "$BENCH_HARD")
  if [ "$hard" -lt 60 ]; then status bench "skipped: only ${hard} s left"; return; fi
  [ "$soft" -lt 10 ] && soft=10
  if [ -f "$RESULTS_MD" ]; then cp "$RESULTS_MD" "$OUT/RESULTS.md"; else printf '# Benchmark results\n' > "$OUT/RESULTS.md"; fi
  local before
  before=$(grep -c '^### ' "$OUT/RESULTS.md")
  say "bench: train_step.py ${BENCH[*]} --time-budget $soft (interrupted at $hard s) --results \$OUT/RESULTS.md"
  timeout --foreground -s INT -k 30 "$hard" "$PY" benchmarks/train_step.py "${BENCH[@]}" \
    --time-budget "$soft" --results "$OUT/RESULTS.md" 2>&1 | tee "$WORK/train_step.out"
  local rc=${PIPESTATUS[0]}
  sed -n '/^### /,/^appended to/p' "$WORK/train_step.out" | sed '/^appended to/d' > "$WORK/bench_block.md"
  local after failed skipped
  after=$(grep -c '^### ' "$OUT/RESULTS.md")
  failed=$(grep -c '| failed: ' "$WORK/bench_block.md")
  skipped=$(grep -cE '\| (skipped|interrupted)' "$WORK/bench_block.md")
  if [ "$after" -le "$before" ]; then
    status bench "FAILED (exit $rc): no table was appended to \$OUT/RESULTS.md"
  elif [ "$failed" -gt 0 ]; then
    status bench "FAILED: $failed row(s) failed (see their notes); table appended to \$OUT/RESULTS.md"
  elif [ "$rc" -ne 0 ]; then
    status bench "FAILED (exit $rc) after appending its table"
  else
    status bench "ok: table appended to \$OUT/RESULTS.md ($skipped row(s) skipped or interrupted)"
  fi
}

loss_lines() { local n; n=$(grep -c '"model_loss"' "$WALKER_DIR/metrics.jsonl" 2>/dev/null); echo "${n:-0}"; }
newest() { compgen -G "$1" | sort | tail -n 1; }
WALKER_PID=""

walker_phase() {     # (d)
  local room
  room=$(left "$WALKER_STOP")
  if [ "$room" -lt "$WALKER_MIN" ]; then
    status walker "skipped: ${room} s left before the stop time (under ${WALKER_MIN} s); a next call with --only walker starts it"
    return
  fi
  mkdir -p "$OUT/walker" "$(dirname "$WALKER_DIR")"
  local args what
  if compgen -G "$WALKER_DIR/ckpts/ckpt-*.pt" >/dev/null; then
    args=(--resume "$WALKER_DIR")
    what="resuming from $(basename "$(newest "$WALKER_DIR/ckpts/ckpt-*.pt")")"
  else
    if [ -e "$WALKER_DIR" ]; then
      mv "$WALKER_DIR" "$WALKER_DIR.stale-$T0"
      say "walker: $WALKER_DIR held no checkpoint: moved aside to $WALKER_DIR.stale-$T0"
    fi
    args=("${WALKER_NEW[@]}" --logdir "$WALKER_DIR")
    what="a new run"
  fi
  local lines0
  lines0=$(loss_lines)
  say "walker: $what: $PY dreamer_v2.py ${args[*]}"
  say "walker: SIGINT at +$((WALKER_STOP - T0)) s$([ "$DRY" = 1 ] && echo ', or at its first logged update (dry run)'); console > \$OUT/walker/walker.log"
  "$PY" dreamer_v2.py "${args[@]}" > "$OUT/walker/walker.log" 2>&1 &
  WALKER_PID=$!
  local reason=""
  while kill -0 "$WALKER_PID" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$WALKER_STOP" ]; then reason="the stop time"; break; fi
    if [ "$DRY" = 1 ] && [ "$(loss_lines)" -gt "$lines0" ]; then reason="its first logged update"; break; fi
    sleep 0.5
  done
  local signalled=""
  if kill -0 "$WALKER_PID" 2>/dev/null; then
    say "walker: SIGINT (reached $reason)"
    kill -INT "$WALKER_PID"
    signalled=INT
    local give_up=$(($(date +%s) + STOP_GRACE))
    while kill -0 "$WALKER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$give_up" ]; do sleep 0.5; done
    if kill -0 "$WALKER_PID" 2>/dev/null; then
      say "walker: still running $STOP_GRACE s after SIGINT: SIGTERM"
      kill -TERM "$WALKER_PID"; signalled=TERM
      give_up=$(($(date +%s) + 10))
      while kill -0 "$WALKER_PID" 2>/dev/null && [ "$(date +%s)" -lt "$give_up" ]; do sleep 0.5; done
      kill -0 "$WALKER_PID" 2>/dev/null && { say "walker: SIGKILL"; kill -KILL "$WALKER_PID"; signalled=KILL; }
    fi
  fi
  wait "$WALKER_PID"
  local rc=$?
  WALKER_PID=""
  tail -n 4 "$OUT/walker/walker.log" | sed 's/^/    /'
  local f gif
  for f in metrics.jsonl config.yaml curves.png; do
    [ -f "$WALKER_DIR/$f" ] && cp "$WALKER_DIR/$f" "$OUT/walker/"
  done
  gif=$(newest "$WALKER_DIR/videos/openloop-*.gif")
  [ -n "$gif" ] && cp "$gif" "$OUT/walker/"
  local progress
  progress=$("$PY" - "$WALKER_DIR/metrics.jsonl" 2>/dev/null <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = rows[-1] if rows else {}
evals = [r["eval_return"] for r in rows if "eval_return" in r]
print(f"env step {last.get('step', 0):,}, {len(rows)} metrics lines"
      + (f", last eval_return {evals[-1]:.1f} ({len(evals)} evaluations)" if evals else ", no evaluation yet")
      + (f", model_loss {last['model_loss']:.4g}" if "model_loss" in last else ""))
EOF
)
  local ckpt
  ckpt=$(newest "$WALKER_DIR/ckpts/ckpt-*.pt")
  ckpt=${ckpt:+$(basename "$ckpt")}
  # dreamer_v2.py prints "stopped by SIG...; checkpoint saved" once its checkpoint is written.
  local saved=""
  grep -q "^stopped by SIG$signalled at env step .*checkpoint saved" "$OUT/walker/walker.log" && saved=1
  if [ "$rc" -eq 130 ] && [ "$signalled" = INT ] && [ -n "$saved" ]; then
    status walker "ok: stopped by SIGINT at ${progress:-?}; checkpoint $ckpt; a next call on this warm machine resumes it (--only walker)"
  elif [ "$rc" -eq 143 ] && [ "$signalled" = TERM ] && [ -n "$saved" ]; then
    status walker "ok: stopped by SIGTERM (SIGINT did not stop it in $STOP_GRACE s) at ${progress:-?}; checkpoint $ckpt"
  elif [ "$rc" -eq 0 ] && [ -z "$signalled" ]; then
    status walker "ok: ran to total_steps: ${progress:-?}; checkpoint ${ckpt:-none}"
  else
    status walker "FAILED: exit $rc${signalled:+ after SIG$signalled}; ${progress:-no metrics}; checkpoint ${ckpt:-none} (see \$OUT/walker/walker.log)"
  fi
}

summary() {
  echo
  echo "================================ gpu_check summary ================================"
  if [ -s "$WORK/bench_block.md" ]; then
    cat "$WORK/bench_block.md"
    echo
  fi
  local phase ok=0
  for phase in "${PHASES[@]}"; do
    printf '%-8s %s\n' "$phase" "${STATUS[$phase]}"
    case ${STATUS[$phase]} in FAILED*) ok=1 ;; esac
  done
  local files
  files=$(find "$OUT" -type f | wc -l)
  echo "files under \$OUT ($files; the device tool returns 8 at most):"
  (cd "$OUT" && find . -type f -printf '  %P  %s bytes\n' | sort)
  [ "$files" -le 8 ] || echo "warning: more than 8 files under \$OUT"
  find "$OUT" -type f -size +16M -printf 'warning: %P is over 16 MiB: it will not come back\n'
  say "done in $(($(date +%s) - T0)) s (budget $BUDGET s); exit $ok"
  return $ok
}

cleanup() {
  if [ -n "$WALKER_PID" ] && kill -0 "$WALKER_PID" 2>/dev/null; then kill -INT "$WALKER_PID"; fi
  rm -rf "$WORK"
}

main() {
  trap cleanup EXIT
  machine_info
  if [ "$DRY" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    status cuda "FAILED: torch.cuda.is_available() is False: use --dry-run on a machine without a GPU"
    summary
    return 1
  fi
  install_bundle
  # Without the envs the tests and the benchmark still run (on stand-in envs of the same shapes,
  # noted in their rows); the walker run needs dm_control and MuJoCo's rendering.
  has tests && tests_phase
  has bench && bench_phase
  if has walker; then
    case ${STATUS[install]} in
      FAILED*) status walker "skipped: the install or render check failed (see install)" ;;
      *) walker_phase ;;
    esac
  fi
  summary
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
