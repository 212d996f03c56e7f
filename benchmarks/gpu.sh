#!/usr/bin/env bash
# The GPU checks of the speed work, as one prepared call of a few minutes on a lent GPU machine.
#
#   bash benchmarks/gpu.sh [STAGE ...]        # default: every stage, in the order of `stages=` at the end
#
# Stages (each under its own time limit, all under BUDGET seconds in total, so that a late stage running
# out of time still leaves the earlier figures; a stage is not started with under MIN_START seconds left,
# which a compiling stage would spend on compilation alone); the default order puts first the three
# figures 2026-11-28 left open (CRT, LeNet certification against the bare forward pass, ResNet-110 against
# the reference), then the fast tier of the test suite, then the training comparisons already measured:
#   env          the GPU and torch
#   graphtest    the CUDA-graph training step against the eager one (tests/test_compiled_step.py)
#   train        benchmarks/vs_official.py on CUDA: gaussian and smoothmix, certkit --compile auto, the official
#                scripts with --workers 0 (as every published ratio)
#   trainworkers the same with the official scripts at their own default, --workers 4 (--official-workers 4)
#   crt          benchmarks/crt_speedup.py at the GPU sizes
#   certlenet    benchmarks/certify_throughput.py, LeNet, n = 100,000, bf16 + channels-last + compile, Philox
#   certlenetbig the same in forward batches of 32,768 copies (what --batch auto picks on a GPU is larger
#                still): a batch whose network time exceeds the host's per-batch work hides that work
#   certlenettorch  the same with torch's generator (a randn per block of 100 copies)
#   certresnet   certlenet for ResNet-110 (CIFAR shape, random images), n = 10,000, batch 4,000, cuDNN autotuning
#   tests        the fast tier of the test suite (-m "not slow") with CUDA visible (xdist, -v: a failure's name
#                is printed when it happens); the CUDA-graph tests ran in graphtest
#   profile      benchmarks/profile_gpu.py: host and device time of a certification batch; a short captured
#                training run's first epoch split into warm-up steps, captures and the rest
#   trainon      vs_official with --compile on (the network alone compiled), for comparison
#   trainother   vs_official: smoothadv, macer, consistency
#
# Needs, beside the checkout (the machine has no network): $CARRY/fashion-mnist/*.gz (the four IDX files)
# and $CARRY/smoothmix (the official code). Output: $OUT/log.txt (everything) and $OUT/summary.txt (each
# stage's status and last lines).
set -u
CARRY=${CARRY:-.gpu}
OUT=${OUT:-gpu-out}
BUDGET=${BUDGET:-420}
MIN_START=${MIN_START:-45}
mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

# the tests and the benchmarks read Fashion-MNIST where the Debian package puts it; without the carried
# folder (the run call's carry: [".gpu"]) nearly every stage would fail on missing files, so stop here
if ! ls "$CARRY"/fashion-mnist/*.gz >/dev/null 2>&1 || [ ! -d "$CARRY/smoothmix" ]; then
    echo "gpu.sh: $CARRY/fashion-mnist/*.gz or $CARRY/smoothmix is missing: pass carry [\"$CARRY\"] to the run call" | tee "$SUMMARY"
    exit 2
fi
mkdir -p /usr/share/datasets/fashion-mnist
cp -n "$CARRY"/fashion-mnist/*.gz /usr/share/datasets/fashion-mnist/ 2>>"$LOG"
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install failed" >>"$LOG"
SCRATCH=$(mktemp -d)
LAST_RC=0
GRAPH_OK=0

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$MIN_START" ]; then
        echo "== $name: skipped (budget spent)" | tee -a "$SUMMARY"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s): $*" >>"$LOG"
    local t0 rc
    t0=$(date +%s)
    timeout "$limit" "$@" >"$SCRATCH/$name.out" 2>&1
    rc=$?
    LAST_RC=$rc
    cat "$SCRATCH/$name.out" >>"$LOG"
    {
        echo "== $name: rc $rc, $(($(date +%s) - t0)) s"
        grep -E "^(train_ratio|floor_ratio|vs_official|crt_speedup|certify_throughput|profile_gpu|teacher|[0-9]+-generation chain|[0-9]+ (passed|failed)|FAILED|ERROR)|FAILED|passed|failed" "$SCRATCH/$name.out" | tail -n 25
        tail -n 4 "$SCRATCH/$name.out"
    } >>"$SUMMARY"
}

VS="python3 benchmarks/vs_official.py --device cuda --batches 40 --rounds 1 --epochs 3 --threads 4 --peer-code $CARRY/smoothmix --source $CARRY/fashion-mnist"
CT="python3 benchmarks/certify_throughput.py --device cuda --n 100000 --batch 4000 --amp bf16 --channels-last --compile --rounds 3"
run_stage() {
    case $1 in
    env) stage env 30 bash -c 'nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"' ;;
    graphtest)
        stage graphtest 120 python3 -m pytest -q -p no:cacheprovider tests/test_compiled_step.py -k "cuda or captured"
        # a broken capture would only fail the stages after it: time them with the compiled network instead
        [ "$LAST_RC" -ne 0 ] && VS="$VS --compile on" && echo "== graph capture failed: train with --compile on, crt skipped" | tee -a "$SUMMARY"
        GRAPH_OK=$LAST_RC
        ;;
    train) stage train 150 $VS --methods gaussian,smoothmix ;;
    trainworkers) stage trainworkers 150 $VS --methods gaussian,smoothmix --official-workers 4 ;;
    crt) [ "$GRAPH_OK" -eq 0 ] && stage crt 200 python3 benchmarks/crt_speedup.py --train-subset 20000 --teacher-epochs 3 --epochs 3 \
        --certify-images 300 --n 10000 --device cuda --out "$SCRATCH/crt" ;;
    certlenet) stage certlenet 120 $CT --rng philox ;;
    certlenetbig) stage certlenetbig 120 $CT --batch 32768 --rng philox ;;  # the later --batch wins
    certlenettorch) stage certlenettorch 120 $CT --rng torch ;;
    tests) stage tests 150 python3 -m pytest -v -p no:cacheprovider -n 14 -m "not slow" tests ;;
    profile) stage profile 120 python3 benchmarks/profile_gpu.py --device cuda ;;
    certresnet) stage certresnet 150 python3 benchmarks/certify_throughput.py --arch resnet110 --device cuda \
        --n 10000 --batch 4000 --amp bf16 --channels-last --compile --cudnn-benchmark --rng philox --inputs 4 \
        --ref-inputs 2 --rounds 2 ;;
    trainon) stage trainon 120 $VS --methods gaussian,smoothmix --compile on ;;
    trainother) stage trainother 200 $VS --methods smoothadv,macer,consistency ;;
    *) echo "unknown stage $1" | tee -a "$SUMMARY" ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env graphtest crt certlenetbig certlenet profile certresnet tests train trainworkers certlenettorch trainon trainother)
for s in "${stages[@]}"; do
    run_stage "$s"
done
cat "$SUMMARY"
