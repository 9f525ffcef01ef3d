#!/usr/bin/env bash
# Every GPU check and benchmark of sd15 on a lent CUDA machine (see docs/performance.md), in two parts that
# each fit one call (the machine stays warm for a short while between calls):
#
#   here:   scripts/device_check.sh --fetch     # once: the wheels the GPU image lacks, into .device/wheels
#   there:  run(command="bash scripts/device_check.sh tests", carry=[".device"], timeout_s=330)   # ~4-5 min
#           run(command="bash scripts/device_check.sh bench", carry=[".device"], timeout_s=420)   # ~5-6 min
#   ("all" runs both, for a machine without the lent one's limits: one call there runs at most 600 s and
#   brings back at most 8 files from $OUT; "tests" writes 6 and "bench" 7)
#
# The GPU image has torch + CUDA, triton and transformers but not diffusers (nor, perhaps, ftfy or pytest):
# they are installed from the carried wheels into .device/site, which goes on PYTHONPATH with the project
# root. The project's own pins do not apply there. Results go to $OUT (or ./device-results).
# `python3`: on the lent machine that is the interpreter that holds torch (a plain `python` may not exist).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.device/wheels
if [[ "${1:-}" == "--fetch" ]]; then
    mkdir -p "$WHEELS"
    pip download -q --no-deps -d "$WHEELS" diffusers==0.42.1 ftfy wcwidth pytest pluggy iniconfig packaging tqdm
    pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.12 -d "$WHEELS" \
        requests urllib3 idna certifi charset-normalizer importlib_metadata zipp
    for v in 3.10 3.11 3.12 3.13 3.14; do
        pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version "$v" -d "$WHEELS" pillow
    done
    exit 0
fi

OUT=${OUT:-device-results}
mkdir -p "$OUT"
SITE=.device/site
missing=()  # only what the image lacks, so that its own packages are not shadowed
for spec in diffusers:diffusers ftfy:ftfy wcwidth:wcwidth pytest:pytest pluggy:pluggy iniconfig:iniconfig \
            packaging:packaging tqdm:tqdm pillow:PIL requests:requests urllib3:urllib3 idna:idna certifi:certifi \
            charset-normalizer:charset_normalizer; do
    python3 -c "import ${spec#*:}" 2>/dev/null || missing+=("${spec%%:*}")
done
echo "installing from the carried wheels: ${missing[*]:-nothing}"
[[ ${#missing[@]} -gt 0 ]] && python3 -m pip install -q --no-deps --no-index --find-links "$WHEELS" -t "$SITE" "${missing[@]}" 2>&1 | tail -3
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The scripts draw the same full-size random weights: once, into a folder that is not carried, so that it
# survives from the tests call to the bench call while the machine stays warm.
export SD15_RANDOM_WEIGHTS_CACHE="$PWD/.device-cache"
mkdir -p "$SD15_RANDOM_WEIGHTS_CACHE"

step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"
against=()
if python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/machine.txt" | grep -q "^diffusers"; then
    :
else
    echo "diffusers does not import here: the benchmark times sd15 alone" | tee -a "$OUT/machine.txt"
    against=(--only sd15)
fi

PART=${1:-all}
if [[ "$PART" == tests || "$PART" == all ]]; then
    step "GPU tests: real kernels, fast path vs reference, graphs, SDPA backend, determinism"
    # Budgets: the tests compile tens of Triton kernel variants (about half a second each) and draw the random
    # weights into the cache; the ablation and the profile only load them (each ~30 s of work).
    # -v names each test as it ends, so a run cut by the timeout still says which passed; the kernels first, and
    # the newest GPU test (the ControlNet, last in tests/gpu) last
    timeout 205 python3 -m pytest -v -s -p no:cacheprovider --durations=10 tests/test_kernels.py tests/gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -40

    step "what each part of the fast path gives: one guided UNet step and one VAE decode"
    timeout -k 10 65 python3 scripts/ablate_fast_path.py --json "$OUT/ablation.json" 2>"$OUT/ablation.log" | tee "$OUT/ablation.txt"

    step "profile of one guided UNet step, reference and fast path"
    timeout -k 10 45 python3 scripts/profile_unet.py --top 25 2>&1 | tee "$OUT/profile.txt" | tail -70
fi
if [[ "$PART" == bench || "$PART" == all ]]; then
    step "benchmark: sd15 vs diffusers (eager and compiled), 512x512, 50 steps, fp16"
    # diffusers + torch.compile compiles twice (batch 2, then the batch of 8 images); on SIGTERM the
    # benchmark stops and still prints and saves what it measured
    timeout -k 15 300 python3 scripts/benchmark.py --repeats 3 ${against[@]+"${against[@]}"} --json "$OUT/benchmark.json" \
        2>"$OUT/benchmark.log" | tee "$OUT/benchmark.txt"

    step "the cost of --deterministic (sd15 only)"
    timeout -k 10 75 python3 scripts/benchmark.py --only sd15 --deterministic --repeats 3 --batch-sizes \
        --json "$OUT/benchmark_deterministic.json" 2>"$OUT/benchmark_deterministic.log" | tee "$OUT/benchmark_deterministic.txt"
fi
step "done"
