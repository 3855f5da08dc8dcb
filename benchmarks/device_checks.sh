#!/usr/bin/env bash
# Every GPU check of the open issues (9-17) as ONE prepared run, for a session that is lent a GPU for a few
# minutes (see docs/benchmarks.md, "Running the GPU checks"). Sections run in order of importance, each under
# its own time limit and all under one overall budget, so that a cut-short run still returns what it finished.
#
#   bash benchmarks/device_checks.sh                      # on the GPU machine, from the repository root
#   bash benchmarks/device_checks.sh --only pytest,training --budget 300
#   bash benchmarks/device_checks.sh --smoke              # here, on CPU: every section at tiny sizes
#
# Writes $OUT/results.json (every section's JSON, its exit status and seconds) and $OUT/log.txt (all output).
# OUT defaults to ./device_out. Without a GPU and without --smoke it refuses to start.
#
# The device image has no diffusers, megatron-core or torchao: carry them as wheels in .whl/ (git-ignored) and
# this script installs them into /tmp/site first. To make that folder here:
#   for spec in megatron-core==0.16.1 diffusers==0.42.1 torchao==0.18.0 importlib_metadata==8.7.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$spec"; done
# DALI (a 424 MB wheel) cannot travel, so the images/s section decodes with PIL on the device (stated in its JSON).
set -uo pipefail

SMOKE=0
ONLY="pytest,training,attention,fused,generate,images,metaquery,plan"
BUDGET=540
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) ONLY="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "device_checks.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-$ROOT/device_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/log.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
START=$(date +%s)

say() { echo "[device_checks +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# Wheels carried to a bare machine, and the repository importable without installing it (`kernels/` is
# installed as `chrysalis_kernels`: a link gives it that name).
SITE=/tmp/chrysalis_site
mkdir -p "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
  say "installing carried wheels: $(cd .whl && printf '%s ' ./*.whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    >>"$LOG" 2>&1 || say "wheel install failed (sections that need them will report it)"
fi
if ! "$PY" -c "import chrysalis_kernels" 2>/dev/null; then ln -sfn "$ROOT/kernels" "$SITE/chrysalis_kernels"; fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

if [[ $SMOKE == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device_checks.sh: no CUDA device here; use --smoke for the CPU dry run" >&2
  exit 2
fi
"$PY" - >"$WORK/env.json" 2>>"$LOG" <<'EOF'
import json, os, platform, torch
env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
       "load_average": os.getloadavg(), "cpus": os.cpu_count()}
try:
    import triton
    env["triton"] = triton.__version__
except ImportError as err:
    env["triton"] = f"missing: {err}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
for name in ("torchao", "diffusers", "megatron.core", "transformer_engine", "flash_attn", "nvidia.dali", "apex"):
    try:
        module = __import__(name, fromlist=["_"])
        env[name] = getattr(module, "__version__", "present")
    except Exception as err:  # noqa: BLE001 - recorded, not raised
        env[name] = f"missing: {type(err).__name__}"
print(json.dumps(env))
EOF
say "environment: $(cat "$WORK/env.json")"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1

STATUS="$WORK/status.tsv"
: >"$STATUS"
# run NAME SECONDS CMD...: the command under min(SECONDS, what is left of the budget); its status is recorded.
run() {
  local name=$1 limit=$2; shift 2
  if [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  if (( left < 20 )); then say "$name: skipped, budget spent"; printf '%s\tskipped\t0\n' "$name" >>"$STATUS"; return; fi
  (( limit > left )) && limit=$left
  say "$name: start (limit ${limit}s): $*"
  local t0
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 5
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$STATUS"
  say "$name: exit $rc after $(( $(date +%s) - t0 ))s"
}

if [[ $SMOKE == 1 ]]; then
  # Collects the GPU-only tests (they skip here), runs every benchmark's CPU dry run at tiny sizes.
  run pytest 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_attention.py \
      tests/test_kernels_attention_fp8.py tests/test_kernels_fused.py tests/test_attention.py \
      -k "gpu or cuda" --junitxml "$WORK/pytest.xml"
  run training 120 "$PY" benchmarks/gpu_training.py --smoke --out "$WORK/training"
  run attention 120 "$PY" benchmarks/kernels_attention.py --smoke --output-dir "$WORK/attention"
  run fused 120 "$PY" benchmarks/kernels_fused.py --smoke --output-dir "$WORK/fused"
  run generate 120 "$PY" benchmarks/generate_kv_cache.py --smoke --gpu --json "$WORK/generate.json"
  run images 120 "$PY" benchmarks/preprocess_images.py --encoder tiny-random --decoder pil --images 16 \
      --batch-size 8 --pairs 1 --json "$WORK/images.json"
  run metaquery 180 "$PY" benchmarks/metaquery_training.py --mode gpu --smoke --json "$WORK/metaquery.json"
  run plan 120 "$PY" benchmarks/plan_gpu_validation.py --allow-cpu --model-preset tiny --seq-length 256 --warmup 1 \
      --steps 2 --out "$WORK/plan.json" --calibration-out "$WORK/plan_calibration.json"
else
  # 1. correctness on the GPU first: the kernel tests at real sizes (seq 8192, 32 heads, head dim 128), the
  #    FlexAttention backward, the fused losses, the DALI nvJPEG path when DALI is there (it skips otherwise).
  run pytest 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_kernels_attention.py \
      tests/test_kernels_attention_fp8.py tests/test_kernels_fused.py tests/test_attention.py \
      tests/test_preprocess_dali.py --junitxml "$WORK/pytest.xml"
  # 2. issue 10: BF16 MFU, FP8 vs BF16, FP8 loss over 200 steps, packed vs unpacked (layers bounded for time).
  run training 200 "$PY" benchmarks/gpu_training.py --out "$WORK/training" --layers 4 \
      --checks bf16_mfu fp8_vs_bf16 packed_vs_unpacked fp8_loss
  # 3. issue 11: attention TFLOP/s (ours, SDPA flash/cuDNN, flex, varlen) and the fused kernels.
  run attention 100 "$PY" benchmarks/kernels_attention.py --output-dir "$WORK/attention" --rounds 5
  run fused 70 "$PY" benchmarks/kernels_fused.py --output-dir "$WORK/fused" --rounds 5
  # 4. issue 17: 1B bf16 decoding, compiled vs eager vs HF, HBM fraction.
  run generate 90 "$PY" benchmarks/generate_kv_cache.py --gpu --pairs 2 --json "$WORK/generate.json"
  # 5. issue 12: so400m-shaped encoder images/s (PIL decode: DALI does not travel), split and pipelined.
  run images 60 "$PY" benchmarks/preprocess_images.py --encoder so400m-random --decoder auto --batch-size 256 \
      --images 2048 --pairs 2 --json "$WORK/images.json"
  # 6. issues 14 and 13: MetaQuery samples/s at SD 1.5 512 px; the planner's peak memory and step time.
  run metaquery 60 "$PY" benchmarks/metaquery_training.py --mode gpu --pairs 2 --steps 3 --json "$WORK/metaquery.json"
  run plan 60 "$PY" benchmarks/plan_gpu_validation.py --out "$WORK/plan.json" --calibration-out "$WORK/plan_calibration.json"
  # Sections left out above (run them in a second call with --only if time is left): gpu_training's `memory`
  # and `compile` checks.
fi

# One results file: every JSON a section wrote, its exit status and seconds.
"$PY" - "$WORK" "$OUT/results.json" "$SMOKE" <<'EOF'
import json, pathlib, sys
work, out, smoke = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
results = {"smoke": smoke, "env": json.loads((work / "env.json").read_text() or "{}"), "sections": {}}
for line in (work / "status.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    results["sections"][name] = {"exit": rc, "seconds": int(seconds)}
for path in sorted(work.rglob("*.json")):
    if path.name == "env.json":
        continue
    key = str(path.relative_to(work))
    try:
        results.setdefault("figures", {})[key] = json.loads(path.read_text())
    except ValueError as err:
        results.setdefault("figures", {})[key] = f"unreadable: {err}"
if (work / "pytest.xml").exists():
    import xml.etree.ElementTree as ET
    suite = ET.parse(work / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    results["pytest"] = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps(results, indent=1, default=str))
tmp.replace(out)
print(json.dumps(results["sections"]))
EOF
say "done: $OUT/results.json, $LOG"
rm -rf "$WORK"
