#!/usr/bin/env bash
# The numbers behind benchmarks/results/: the built-in suite in float32,
# float16 and bfloat16, then float32 again with TF32, then the deterministic
# backward in float32 and float16, on the GPU this runs on.
#
#   bash benchmarks/run_gpu.sh [extra cupydcn bench arguments, e.g. --quick]
#
# Writes NAME.json, NAME.csv, NAME.png and NAME.txt (the terminal table), and
# the same with -tf32 and -deterministic, into $OUT when set (the lent GPU machine's output
# folder), else benchmarks/results/; NAME is the GPU's short name (h100, h200)
# unless $NAME is set. Exit status: the first non-zero of the three runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python="${PYTHON:-python3}"
name="${NAME:-$("$python" -c '
import cupy
n = cupy.cuda.runtime.getDeviceProperties(0)["name"]
n = n.decode() if isinstance(n, bytes) else n
print((n.lower().replace("nvidia", "").split() or ["gpu"])[0])' 2>/dev/null || echo gpu)}"

"$python" -m cupydcn bench --json "$out/$name.json" --csv "$out/$name.csv" \
    --plot "$out/$name.png" "$@" | tee "$out/$name.txt"
first=${PIPESTATUS[0]}
"$python" -m cupydcn bench --tf32 --dtype float32 --json "$out/$name-tf32.json" \
    --csv "$out/$name-tf32.csv" --plot "$out/$name-tf32.png" "$@" | tee "$out/$name-tf32.txt"
second=${PIPESTATUS[0]}
# the cost of the deterministic backward (no floating-point atomics)
"$python" -m cupydcn bench --deterministic --dtype float32 --dtype float16 \
    --json "$out/$name-deterministic.json" --csv "$out/$name-deterministic.csv" "$@" \
    | tee "$out/$name-deterministic.txt"
third=${PIPESTATUS[0]}
for status in "$first" "$second" "$third"; do
    if [ "$status" -ne 0 ]; then exit "$status"; fi
done
exit 0
