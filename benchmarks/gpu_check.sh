#!/usr/bin/env bash
# One-off GPU check for issue 6 (about 6-9 minutes on one H100 with 16 CPU cores).
# Run from anywhere; results (JSON per measurement + gpu_check.log + machine.txt) go to $OUT:
#   OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# 1. ResNet-152, 224², bf16, channels-last: natural vs SPROUT at the largest batch that fits
#    (256, else 192, 128, 96, 64): the SPEC §8 target SPROUT/natural images/s >= 0.95.
# 2. The same batch: natural vs PGD-AT vs TRADES, fewer steps (each is ~8-12 natural steps).
# 3. Decode + augment throughput from Parquet shards with the node's 16 cores
#    (per-core rate => cores per GPU needed to feed step 1's natural images/s).
# 4. If time is left: natural vs SPROUT with torch.compile (inductor), bounded by a timeout.
# torch is installed (torch==2.14.1 torchvision==0.29.1, the project's pins) only if missing.
# A CPU smoke test of the plumbing (tiny sizes, minutes):
#   OUT=/tmp/smoke MODEL=resnet50 SIZE=32 BATCHES="4" STEPS=1 ADV_STEPS=1 IMAGES=64 DECODE_SECONDS=1 \
#     COMPILE=0 bash benchmarks/gpu_check.sh
set -uo pipefail
MODEL="${MODEL:-resnet152}"; SIZE="${SIZE:-224}"; BATCHES="${BATCHES:-256 192 128 96 64}"
STEPS="${STEPS:-15}"; ADV_STEPS="${ADV_STEPS:-2}"; IMAGES="${IMAGES:-16384}"; DECODE_SECONDS="${DECODE_SECONDS:-10}"
COMPILE="${COMPILE:-1}"
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
echo "== gpu_check.sh start $(date -u +%FT%TZ) in $PWD"

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "== torch missing: installing torch==2.14.1 torchvision==0.29.1 into /tmp/sprout-venv"
  if "$PY" -m venv --system-site-packages /tmp/sprout-venv; then PY=/tmp/sprout-venv/bin/python; fi
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 || { echo "torch install failed"; exit 1; }
fi
for mod in pyarrow PIL tqdm numpy; do
  "$PY" -c "import $mod" 2>/dev/null || MISSING="${MISSING:-} $mod"
done
if [ -n "${MISSING:-}" ]; then
  echo "== installing:${MISSING}"
  "$PY" -m pip install -q pyarrow pillow tqdm numpy
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%FT%TZ)"; uname -a; nproc
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>/dev/null
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Thread|MHz" || true
} | tee "$OUT/machine.txt"

# --- 1. natural vs SPROUT, largest batch that fits ------------------------------------------
BATCH=""
for B in $BATCHES; do
  echo "== [$(elapsed)s] $MODEL bf16 channels-last natural,sprout batch $B"
  timeout 300 "$PY" benchmarks/imagenet_step.py --model "$MODEL" --image-size "$SIZE" --batch-size "$B" --bf16 \
    --channels-last --methods natural,sprout --steps "$STEPS" --rounds 3 --warmup 3 \
    --out "$OUT/${MODEL}_bf16_cl_natural_sprout_b$B.json"
  rc=$?
  if [ $rc -eq 0 ]; then BATCH=$B; break; fi
  if [ $rc -ne 3 ]; then echo "imagenet_step.py failed with exit code $rc"; break; fi
done
[ -n "$BATCH" ] || BATCH="${B:-64}"

# --- 2. adversarial baselines at the same batch (halved once if TRADES' two graphs do not fit) ----
for B in "$BATCH" $((BATCH / 2)); do
  echo "== [$(elapsed)s] $MODEL bf16 channels-last natural,sprout,pgd_at,trades batch $B"
  timeout 240 "$PY" benchmarks/imagenet_step.py --model "$MODEL" --image-size "$SIZE" --batch-size "$B" --bf16 \
    --channels-last --methods natural,sprout,pgd_at,trades --steps 4 --adv-steps "$ADV_STEPS" --rounds 2 --warmup 1 \
    --out "$OUT/${MODEL}_bf16_cl_all_b$B.json"
  rc=$?
  [ $rc -eq 3 ] || break
done

# --- 3. decode + augment throughput with all cores ----------------------------------------------
NAT=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['results']; print(next(x['images_per_s'] for x in r if x['method']=='natural'))" \
  "$OUT/${MODEL}_bf16_cl_natural_sprout_b$BATCH.json" 2>/dev/null || echo 1000)
RAYFLAG=""
"$PY" -c "import ray.data" 2>/dev/null && RAYFLAG="--ray"
echo "== [$(elapsed)s] decode throughput, $(nproc) processes ${RAYFLAG} (natural images/s to feed: $NAT)"
# 16384 JPEGs (~1.6 GB): Ray Data decodes one <=128 MB block per task, so the Ray stage needs
# at least one block per core to use them all
timeout 300 "$PY" benchmarks/decode_throughput.py --images "$IMAGES" --processes "$(nproc)" $RAYFLAG \
  --seconds "$DECODE_SECONDS" --gpu-images-per-s "$NAT" --workdir "$OUT.decode_work" --out "$OUT/decode_throughput.json"
rm -rf "$OUT.decode_work"

# --- 4. torch.compile, only with time to spare ----------------------------------------------------
LEFT=$(( 540 - $(elapsed) ))
if [ "$COMPILE" = 1 ] && [ "$LEFT" -gt 150 ]; then
  echo "== [$(elapsed)s] $MODEL bf16 channels-last compile natural,sprout batch $BATCH (limit ${LEFT}s)"
  timeout "$LEFT" "$PY" benchmarks/imagenet_step.py --model "$MODEL" --image-size "$SIZE" --batch-size "$BATCH" \
    --bf16 --channels-last --compile --methods natural,sprout --steps "$STEPS" --rounds 3 --warmup 3 \
    --out "$OUT/${MODEL}_bf16_cl_compile_natural_sprout_b$BATCH.json" || echo "compile run did not finish (rc $?)"
else
  echo "== [$(elapsed)s] skipping the torch.compile run (COMPILE=$COMPILE, ${LEFT}s left of the 540s plan)"
fi
echo "== done in $(elapsed)s; results in $OUT"
ls -l "$OUT"
