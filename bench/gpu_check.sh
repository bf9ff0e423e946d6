#!/usr/bin/env bash
# One GPU session's checks of the Triton backend (issue 17), in one command, everything under $OUT.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine (PYTHONPATH=. is set here; no pip)
#   bash bench/gpu_check.sh --dry-run                # rehearsal on a CPU: TRITON_INTERPRET=1, toy sizes (~2-3 min)
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh          # the same
#
# Sections, in this order (each logged, its exit code and seconds recorded; a failing section does not stop
# the others): env -> correctness (bench/gpu_correctness.py) -> pytest -m "gpu and not slow" -n 8 (with
# PECM_TRITON_CONFIG=pinned) -> ceilings -> timings (+ the JIT's register/spill dump) -> regs (cuobjdump of
# the Triton cache) -> k1000 (under timeout) -> summary (printed last; $OUT/summary.md and summary.json).
#
# What comes back from $OUT (at most 8 files): summary.md, summary.json, gpu_check.log (every section's log,
# concatenated), results.tar.gz (the per-section JSON and logs, the register dumps).
#
# Budget on the H200 machine (estimate; bench/gpu_notes.md has the table). PECM_TRITON_CONFIG=pinned: one config per
# kernel variant, so one compile per specialisation; compile seconds from kernels/aot_check.py with Triton 3.6 on a
# 2-core CPU: 1-3 s per KT = 64 variant (raw top-k up to 11 s), 74-174 s for KT = 1024 float16 top-k.
#   env             ~10 s   (python + torch import, nvidia-smi)                                        cap  20 s
#   correctness     ~100 s  (3 dtypes x 3 ops x (B = 1, 3, 64 prepared + B = 3 raw) = 36 compiles x ~2.5 s;
#                            float64 reference at N = 2000 ~15 s; planted winner, 4.4 GB, 3 compiles ~15 s)  cap 135 s
#   pytest          ~90 s   (-n 8 workers, each compiles what its tests need)                          cap 100 s
#   ceilings        ~10 s   (512 MB copy, 8192^3 GEMM fp32/fp16/bf16)                                 cap  30 s
#   timings         ~80 s   (~11 compiles ~30 s; 13 GB of data drawn on the GPU ~5 s; top-k B = 1024 over
#                            N = 32768 ~1 s a call x ~20 with the peer; the rest is milliseconds)     cap 120 s
#   regs            ~5 s                                                                               cap  20 s
#   k1000           70-150 s (KT = 1024 float16 compile, then 7 calls)                                 cap 150 s
#   summary         ~3 s                                                                               cap  15 s
#   total           ~6.5 min expected (<= 8 min); caps 590 s: run it with the device tool's timeout_s=600.
set -uo pipefail   # not -e: every section runs; its rc is recorded and summarised

cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export PECM_TRITON_CONFIG=pinned
export TRITON_CACHE_DIR="$WORK/triton_cache"
LOG="$OUT/gpu_check.log"
: >"$LOG"
: >"$WORK/sections.tsv"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  DRYF=--dry
  NW=2
  CORR_ARGS=(--device cpu --dtypes fp32,fp16,bf16 --b 1,3,8 --n 40 --k 3 --d 20 --m 12 --raw-b 3 --no-big)
else
  unset TRITON_INTERPRET
  DRYF=
  NW=8
  CORR_ARGS=(--device cuda --dtypes fp32,fp16,bf16 --b 1,3,64 --n 2000 --m 300 --raw-b 3 --big)
fi

# section NAME CAP_SECONDS CMD...: runs CMD under `timeout`, logs to $WORK/NAME.log and $LOG, records rc
section() {
  local name=$1 cap=$2
  shift 2
  local t0=$SECONDS rc
  echo "=== [$name] start $(date -u +%H:%M:%S) cap ${cap}s: $*" | tee -a "$LOG"
  timeout --kill-after=10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  [ "$rc" = 124 ] && echo "=== [$name] TIMED OUT after ${cap}s" | tee -a "$LOG"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/sections.tsv"
  echo "=== [$name] rc=$rc $((SECONDS - t0))s" | tee -a "$LOG"
  tail -n 3 "$WORK/$name.log"
}

env_section() {
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2) ($(nproc) cores)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo +dirty)"
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PY" bench/gpu_check.py env --json "$WORK/env.json" >/dev/null
}

regs_section() {
  local cuobj
  cuobj=$("$PY" -c "import triton, pathlib; p = pathlib.Path(triton.__file__).parent / 'backends/nvidia/bin/cuobjdump'; print(p if p.is_file() else '')")
  [ -z "$cuobj" ] && cuobj=$(command -v cuobjdump || true)
  local n=0
  while IFS= read -r -d '' f; do
    n=$((n + 1))
    echo "--- $(basename "$(dirname "$f")")/$(basename "$f")"
    [ -n "$cuobj" ] && "$cuobj" --dump-resource-usage "$f" 2>&1 | grep -E "Function|REG" || true
  done < <(find "$TRITON_CACHE_DIR" -name '*.cubin' -print0 2>/dev/null)
  echo "cubins in the Triton cache: $n (cuobjdump: ${cuobj:-none})"
  [ "$DRY" = 1 ] && echo "(dry run: the interpreter compiles nothing)"
  return 0
}

export -f env_section regs_section
export PY WORK DRY
section env 20 bash -c env_section
section correctness 135 "$PY" bench/gpu_correctness.py "${CORR_ARGS[@]}" --json "$WORK/correctness.json"
section pytest 100 "$PY" -m pytest -m "gpu and not slow" -n "$NW" -q -p no:cacheprovider tests
section ceilings 30 "$PY" bench/gpu_check.py ceilings $DRYF --json "$WORK/ceilings.json"
section timings 120 "$PY" bench/gpu_check.py timings $DRYF --json "$WORK/timings.json" \
  --regs-json "$WORK/regs.json" --ceilings "$WORK/ceilings.json"
section regs 20 bash -c regs_section
section k1000 150 "$PY" bench/gpu_check.py k1000 $DRYF --json "$WORK/k1000.json"
section summary 15 "$PY" bench/gpu_check.py summary --work "$WORK" --out "$OUT"
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude triton_cache . 2>/dev/null
rm -rf "$WORK"
echo
cat "$OUT/summary.md"
