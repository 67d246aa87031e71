#!/usr/bin/env bash
# Every GPU check in one command (for a lent GPU machine: `bash scripts/gpu_check.sh`), ending in a table.
# Where packages are missing, wheels in .whl/ are installed first: `bash scripts/gpu_wheels.sh` here
# downloads those the GPU image lacks (Python 3.12, x86-64; about 26 MB), to carry with this run.
set -uo pipefail
OUT=${OUT:-/tmp/segscale-gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py >"$OUT/gpu_tests.log" 2>&1; gpu_tests=$?
# The Trainer's CUDA path (device auto): exact resume, checkpoint fallback, preemption, launch checks.
# (Multi-worker tests need one GPU per worker: the `distributed` ones run on CPU machines.)
python3 -m pytest -q -p no:cacheprovider -m "not distributed" tests/test_train.py tests/test_fault_tolerance.py \
  tests/test_parallel.py >"$OUT/train_tests.log" 2>&1; train_tests=$?
# checks first (bf16 vs fp32, compiled vs eager, resident batches), then img/s and MFU per variant
python3 benchmarks/gpu.py --json "$OUT/gpu_bench.json" >"$OUT/gpu_bench.log" 2>&1; bench=$?
start=$(date +%s)
python3 -m segscale.cli demo --workers 1 --out /tmp/demo >"$OUT/demo.log" 2>&1; demo=$?
demo_s=$(( $(date +%s) - start ))
cp /tmp/demo/evaluation.json /tmp/demo/report.md /tmp/demo/overlays.png "$OUT/" 2>/dev/null
python3 -m segscale.cli demo --workers 2 --out /tmp/demo2 >"$OUT/two_workers.log" 2>&1; two=$?
dice=$(python3 -c "import json; print(round(json.load(open('/tmp/demo/evaluation.json'))['case_summary']['dice']['mean'], 4))" 2>/dev/null)
mlflow=$(python3 -c "import sqlite3; c = sqlite3.connect('/tmp/demo/mlflow.db'); print(c.execute('select status from runs').fetchall(), c.execute('select count(*) from metrics').fetchone()[0], 'metric rows')" 2>&1 | tail -1)
grep -i "warn" "$OUT/demo.log" | head -5
ips=$(python3 -c "import json; r=[json.loads(l) for l in open('/tmp/demo/run/metrics.jsonl')]; print(round(sum(x['images_per_second'] for x in r[1:])/max(1,len(r)-1), 1))" 2>/dev/null)

printf '\n| check | result |\n|---|---|\n'
printf '| pytest -m gpu (CUDA train + eval vs CPU eval, fork-server worker vs fresh interpreter, bf16/fp16 autocast) | rc=%s %s |\n' "$gpu_tests" "$(tail -1 "$OUT/gpu_tests.log")"
printf '| train/fault-tolerance/parallel tests on CUDA (not distributed) | rc=%s %s |\n' "$train_tests" "$(tail -1 "$OUT/train_tests.log")"
printf '| benchmarks/gpu.py (see gpu_bench.log for its table) | rc=%s |\n' "$bench"
printf '| demo, 1 GPU worker | rc=%s, %ss, per-case Dice %s, %s img/s |\n' "$demo" "$demo_s" "$dice" "$ips"
printf '| demo: MLflow run (the default tracker) | %s |\n' "$mlflow"
printf '| demo --workers 2 on 1 GPU (expect a clear error, rc=2) | rc=%s %s |\n' "$two" "$(tail -1 "$OUT/two_workers.log")"
[ -f "$OUT/gpu_bench.log" ] && sed -n '/^| variant/,$p' "$OUT/gpu_bench.log"
