#!/usr/bin/env bash
# One short device session on a GPU machine (run from the repo root; results under $OUT):
#   1. the model / streaming / causality / decode tests on the GPU (float32, matmul precision highest), and the
#      Pallas GPU kernel (ops.flash_gpu) compiled and run against the XLA path,
#   2. at the same time, a PassKey recipe sweep: ten passkey_tiny variants trained side by side on the one GPU
#      (eval every 250 steps; the curves say which knob makes the tiny model learn sooner),
#   3. alone on the GPU: step time, memory and MFU of full / BSWA / FAM next to the PyTorch peer (bf16, base at
#      16k, batch 4), BSWA / FAM with the Pallas GPU kernel (attention_impl=pallas), and the 1B shape at
#      16k with full attention too, and last BSWA / FAM with while loops as CUDA graphs (issue 22's GPU targets;
#      about 10 minutes in all, the device tool's limit for one command: what runs past it is the last step).
# Packages the GPU image lacks travel as wheels in .whl (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/famjax_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
PK_STEPS=${PK_STEPS:-3000}  # smaller for a local smoke run of this script
PLATFORM=${PLATFORM:-cuda}
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(ls .whl/*.whl | grep -v flax-) || exit 1
  export PYTHONPATH=/tmp/site
  # The image's flax is used when it has the NNX API famjax needs (>= 0.12); else the carried one.
  if ! $PY -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))"; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_flax .whl/flax-*.whl
    export PYTHONPATH=/tmp/site_flax:$PYTHONPATH
  fi
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
{ nvidia-smi -L; $PY -c "import jax, flax, optax, orbax.checkpoint as o, grain, tensorflow_datasets as t;
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'grain', grain.__version__,
      'tfds', t.__version__, jax.devices())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 2. PassKey sweep (background): prepare the data once, then the variants in parallel.
sweep() {
  local base=(-m famjax.main --mode=train_and_eval --config=configs/passkey_tiny.py
              --config.data.data_dir=/tmp/pkd --config.checkpoint.enabled=False --config.train.log_every=250
              --config.data.passkey.train_examples=${PK_EXAMPLES:-50000})
  $PY "${base[@]}" --workdir=/tmp/pk/prep --config.train.steps=1 --config.eval.batches=1 ${PREP_ARGS:-} > /tmp/pk_prep.log 2>&1
  declare -A V=(
    [base]=""
    [seed1]="--config.train.seed=1"
    [lr3e-3]="--config.train.learning_rate=3e-3"
    [batch32]="--config.data.batch_size=32"
    [F16]="--config.fam.fam_len=16"
    [rpo_off]="--config.fam.rpo=False"
    [lr3e-3_batch32]="--config.train.learning_rate=3e-3 --config.data.batch_size=32"
    [block16]="--config.model.block_size=16"
    [d256]="--config.model.d_model=256 --config.model.mlp_dim=1024"
    [layers4]="--config.model.num_layers=4"
  )
  if [ -n "${VARIANTS:-}" ]; then  # "name=overrides;name=overrides" replaces the list above
    V=()
    IFS=';' read -ra items <<< "$VARIANTS"
    for it in "${items[@]}"; do V[${it%%=*}]="${it#*=}"; done
  fi
  # Eval lines reach $OUT as they are printed, so a run cut off by the device's time limit keeps them.
  for name in "${!V[@]}"; do
    echo "== $name: ${V[$name]}" >> "$OUT/passkey_sweep.txt"
    # shellcheck disable=SC2086
    ( timeout ${SWEEP_S:-200} $PY "${base[@]}" --workdir=/tmp/pk/$name --config.train.steps=$PK_STEPS \
        --config.eval.every_steps=250 ${V[$name]} 2>&1 | tee /tmp/pk_$name.log \
        | grep --line-buffered -E "eval at step|Error" | sed -u "s/^/$name: /" >> "$OUT/passkey_sweep.txt" ) &
  done
  wait
  tail -5 /tmp/pk_prep.log >> "$OUT/passkey_sweep.txt"
}
sweep &
SWEEP=$!
if [ -n "${SWEEP_ONLY:-}" ]; then wait $SWEEP; cat "$OUT/passkey_sweep.txt"; exit 0; fi

# 1. Correctness on the GPU (the conftest keeps any JAX_PLATFORMS / XLA_FLAGS set here).
JAX_PLATFORMS=$PLATFORM XLA_FLAGS="" timeout ${TESTS_S:-170} $PY -m pytest -q -p no:cacheprovider -n 4 \
  tests/test_model_parity.py tests/test_model_identities.py tests/test_streaming.py \
  tests/test_causality_and_grads.py tests/test_infer_generate.py tests/test_fam_fast_scan.py \
  tests/test_attention_impl.py tests/test_ops_flash_gpu.py ${PYTEST_ARGS:-} > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?" >> "$OUT/gpu_tests.txt"
tail -3 "$OUT/gpu_tests.txt"
wait $SWEEP
cat "$OUT/passkey_sweep.txt"

# 3. Step time / MFU, alone on the GPU.
{
  timeout ${BENCH_S:-120} $PY benchmarks/step_time.py --sizes=${BENCH_SIZES:-base} --lengths=${BENCH_LENGTHS:-16384} --dtype=bfloat16 \
    --block=1024 --fam=64 --batch=${BENCH_BATCH:-4} --peak_n=8192 --repeats=5
  # the Pallas GPU kernel (ops.flash_gpu, attention_impl=pallas) against the default above (XLA block attention)
  timeout ${BENCH_PALLAS_S:-70} $PY benchmarks/step_time.py --sizes=base --lengths=16384 --modes=bswa,fam --peer=false \
    --dtype=bfloat16 --block=1024 --fam=64 --batch=${BENCH_BATCH:-4} --peak_n=8192 --repeats=5 \
    --model=attention_impl=pallas
  # the 1B shape at 16k, full attention included (cuDNN on GPU): a mode that does not fit prints "out of memory"
  timeout ${BENCH_BIG_S:-150} $PY benchmarks/step_time.py --sizes=${BENCH_BIG:-1b} --lengths=${BENCH_BIG_LENGTHS:-16384} \
    --dtype=bfloat16 --block=1024 --fam=64 --batch=1 --peak_n=8192 --repeats=3 --full_max=16384
  # last (the first to go if time runs out): base BSWA / FAM at 16k again with XLA's while loops and conditionals
  # recorded as CUDA graphs too (command buffers), so that the F-row loop's small kernels are launched by the
  # device instead of one by one from the host; compare with the first run's rows
  XLA_FLAGS="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" timeout ${BENCH_CB_S:-60} $PY \
    benchmarks/step_time.py --sizes=base --lengths=16384 --modes=bswa,fam --peer=false --dtype=bfloat16 \
    --block=1024 --fam=64 --batch=${BENCH_BATCH:-4} --peak_n=8192 --repeats=5
} > "$OUT/step_time.txt" 2>&1
grep -v "^W0\|^I0" "$OUT/step_time.txt" | tail -20
