#!/usr/bin/env bash
# The GPU checks of a session that is lent a GPU machine (docs/contributing.md, "GPU
# checks"), prepared to run in one call of the device tool: the `cuda` tests and the
# device step-time benchmark (benchmarks/device_step.py), each under its own time limit,
# logs and results in $OUT, a summary at the end. A piece that fails or runs out of time
# is recorded and the next one runs; the script itself exits 0 only if all passed.
#
# On the GPU machine (torch there, no network; the missing packages come as the wheels
# that `pip download ... -d .gpu-wheels` put here, carried with the tree):
#   bash tools/gpu_check.sh
# Here, on the CPU, to try the script itself (tiny sizes, --device cpu):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_FORCE_WHEELS=1 GPU_CHECK_SITE=$(mktemp -d) \
#       OUT=$(mktemp -d) bash tools/gpu_check.sh
#
# Environment: OUT (required: where logs and results go), GPU_CHECK_DEVICE (cuda, or cpu
# for the tiny CPU try), GPU_CHECK_ARGS (the benchmark's arguments instead of the sized
# ones below), GPU_CHECK_SITE (where wheels are installed; /tmp/site),
# GPU_CHECK_FORCE_WHEELS=1 (install every carried wheel, not only those whose module is
# missing), PYTHON (python3). .gpu-wheels/COMMIT, if there, names the commit of the tree
# (the copy on the GPU machine has no .git).
set -u
: "${OUT:?set OUT to the folder for the logs and results}"
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WHEELS=.gpu-wheels
mkdir -p "$OUT"
failures=()

# Sized for about 8 minutes on one H100 or H200: the cuda tests within 150 s, the
# benchmark within 300 s (rows that would start after 240 s are not run; the results are
# rewritten after every problem, so a run cut short keeps what it measured).
if [ "$DEVICE" = cpu ]; then
    BENCH_ARGS=(--batch-sizes 32 --intervals 2 --methods adam,sgd,kfac --windows 1
                --floor-rounds 1 --resnet-batch 0 --threads 1)
    TEST_LIMIT=120 BENCH_LIMIT=120 BUDGET=60
else
    BENCH_ARGS=(--batch-sizes 1000,8192 --intervals 10,100 --resnet-batch 128 --windows 5
                --methods adam,sgd,kfac,kfac-host-checks,kfac-overlap,ekfac,kpsvd,diag,exact-ng)
    TEST_LIMIT=150 BENCH_LIMIT=300 BUDGET=240
fi
if [ -n "${GPU_CHECK_ARGS:-}" ]; then
    read -r -a BENCH_ARGS <<< "$GPU_CHECK_ARGS"
fi

piece() {  # piece NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $name.log)"
    if [ "$rc" -ne 0 ]; then
        failures+=("$name: exit $rc$([ "$rc" -eq 124 ] && echo ", out of time")")
    fi
    return 0
}

# 1. The packages missing here, from the carried wheels (import name by distribution).
declare -A MODULE=([backpack_for_pytorch]=backpack [unfoldNd]=unfoldNd [einops]=einops
                   [pytest]=pytest [pluggy]=pluggy [iniconfig]=iniconfig
                   [packaging]=packaging [pygments]=pygments)
install=()
for whl in "$WHEELS"/*.whl; do
    [ -e "$whl" ] || continue
    dist=$(basename "$whl")
    dist=${dist%%-*}
    module=${MODULE[$dist]:-$dist}
    if [ "${GPU_CHECK_FORCE_WHEELS:-0}" = 1 ] || ! "$PY" -c "import $module" 2> /dev/null; then
        install+=("$whl")
    fi
done
export PYTHONPATH="$REPO"
if [ ${#install[@]} -gt 0 ]; then
    piece wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "${install[@]}"
    export PYTHONPATH="$REPO:$SITE"
fi
if [ -f "$WHEELS/COMMIT" ]; then
    CURVLIB_COMMIT=$(cat "$WHEELS/COMMIT")
    export CURVLIB_COMMIT
fi

# 2. What runs here.
piece env 60 "$PY" -c "
import importlib.metadata as md, torch, curvlib
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(0))
for dist in ('backpack-for-pytorch', 'unfoldNd', 'einops', 'pytest', 'torchvision'):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, 'MISSING')
"
cat "$OUT/env.log"

# 3. The cuda tests (they skip without a GPU).
piece cuda_tests "$TEST_LIMIT" "$PY" -m pytest -m cuda tests/cuda -q -p no:cacheprovider

# 3b. An example under torchrun with NCCL (one rank: a single GPU cannot hold two NCCL
# ranks): the NCCL process group, cuda:LOCAL_RANK, DDP's device_ids and its all-reduce,
# the split flag; curvlib's own collectives need two GPUs and are skipped by one rank.
if [ "$DEVICE" = cuda ]; then
    piece nccl_example 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        examples/cnn.py --device cuda --num-train 400 --num-test 100 --batch-size 100 \
        --num-epochs 1 --split-inverses directions --no-progress --out "$OUT/nccl_example"
fi

# 4. The step-time benchmark on the device.
export PYTHONUNBUFFERED=1
piece step_time "$BENCH_LIMIT" "$PY" benchmarks/step_time.py --device "$DEVICE" --out "$OUT" \
    --budget "$BUDGET" "${BENCH_ARGS[@]}"

# 5. Summary.
echo
echo "== cuda tests (last lines)"
tail -n 15 "$OUT/cuda_tests.log"
if [ -f "$OUT/nccl_example.log" ]; then
    echo
    echo "== NCCL example (last lines)"
    tail -n 5 "$OUT/nccl_example.log"
fi
echo
echo "== step time"
if [ -f "$OUT/step_time_$DEVICE.md" ]; then
    cat "$OUT/step_time_$DEVICE.md"
else
    tail -n 20 "$OUT/step_time.log"
fi
echo
if [ ${#failures[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failures[@]}"
    exit 1
fi
echo "all pieces passed"
