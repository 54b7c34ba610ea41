#!/usr/bin/env bash
# GPU check for a lent device (workbench's `device` tool): measured versus predicted MFU for a
# CNN, a ViT and a Llama flavour in bf16 on one GPU, with NVML samples in the store.
# Usage on the device machine: bash benchmarks/gpu_check.sh   (writes under $OUT)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3.11 -m venv .venv-gpu && .venv-gpu/bin/pip install -q torch==2.13.0 -e . >/dev/null
export WORKBENCH_STORE="$OUT/store.db"
run() { .venv-gpu/bin/workbench run --device cuda --nproc 1 --steps 10 --json "$@"; }
run --model resnet50 --plan "mb=64,gbs=64" > "$OUT/resnet50.json"
run --model vit-b16 --plan "mb=64,gbs=64" > "$OUT/vit-b16.json"
run --model llama3-8b --set layers=4,seq=4096 --plan "mb=2,gbs=2,recompute=selective" > "$OUT/llama3-8b-4layers.json"
.venv-gpu/bin/python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    print(f"{f.stem:22s} measured MFU {100 * r['mfu']:5.1f}%  predicted {100 * r['predicted']['mfu']:5.1f}%  "
          f"step {r['step_time_s'] * 1e3:8.1f} ms (predicted {r['predicted']['step_time_s'] * 1e3:8.1f} ms)")
PY
