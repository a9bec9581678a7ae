#!/usr/bin/env bash
# The GPU measurements behind docs/results.md's GPU figures, in one run on a CUDA machine; needs no internet.
#   1. scorer speed on the full HellaSwag validation set (GPT-2-124M shape, random weights);
#   2. the CUDA training path end to end: the demo under torchrun (NCCL, bf16 autocast);
#   3. seconds per step and peak memory of each GPT-2 recipe, on random-weight stand-ins of its models.
#
#   bash benchmarks/gpu_check.sh                       # results in out/gpu_check
#   DATA=path/to/hellaswag_val.jsonl OUT_DIR=results bash benchmarks/gpu_check.sh
#   DEVICE=cpu LIMIT=40 STEPS=2 RECIPE_ARGS="--tiny --batch_size=8 --minibatch_size=4 --micro_batch_size=2" \
#       DEMO_STEPS=2 bash benchmarks/gpu_check.sh      # the same commands, small, on a CPU
#   git worktree add ../before 43b3ad9 && BEFORE=../before bash benchmarks/gpu_check.sh
#       # 3. also runs each recipe in that older checkout, right after this one: before/after on one machine
#       # (the generate recipe with sparse rewards on both sides)
# DATA, OUT_DIR and BEFORE are paths from the repository's root (the script runs there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-../shared/data/hellaswag_val_preprocessed.jsonl}  # any HellaSwag jsonl with labels
OUT_DIR=${OUT_DIR:-out/gpu_check}
LIMIT=${LIMIT:-10042}
STEPS=${STEPS:-4}
DEMO_STEPS=${DEMO_STEPS:-10}
RECIPE_ARGS=${RECIPE_ARGS:-}
BEFORE=${BEFORE:-}  # another checkout of this project, measured in section 3 too
if [ -n "$BEFORE" ] && [ ! -f "$BEFORE/benchmarks/recipe_cost.py" ]; then
    echo "error: BEFORE=$BEFORE is not a checkout of this project with benchmarks/recipe_cost.py" >&2
    exit 2
fi
if [ ! -f "$DATA" ]; then
    echo "error: no HellaSwag data at $DATA; set DATA=FILE (python hellaswag.py --help tells how to download it)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$OUT_DIR/torch.txt"

echo "== 1. HellaSwag scorer, $LIMIT validation examples"
python benchmarks/hellaswag_speed.py --data "$DATA" --limit "$LIMIT" --device "$DEVICE" --batch-size 256 \
    --skip-naive | tee "$OUT_DIR/hellaswag_speed.txt"

echo "== 2. the demo under torchrun ($DEVICE)"
torchrun --standalone --nproc_per_node=1 train_ppo.py configs/demo.py --device="$DEVICE" \
    --out_dir="$OUT_DIR/demo" --max_steps="$DEMO_STEPS" --start_over=True > "$OUT_DIR/demo.log" 2>&1 || {
    tail -20 "$OUT_DIR/demo.log"; exit 1; }
grep -E "^step .*eval|^policy" "$OUT_DIR/demo.log" | tail -4

echo "== 3. cost per recipe${BEFORE:+ (each also in $BEFORE, right after)}"
out=$(CDPATH="" cd -- "$OUT_DIR" && pwd)
data=$(CDPATH="" cd -- "$(dirname "$DATA")" && pwd)/$(basename "$DATA")
for recipe in label teacher generate; do
    for tree in . ${BEFORE:+"$BEFORE"}; do
        tag=$([ "$tree" = . ] && echo "${BEFORE:+_now}" || echo _before)
        name=cost_$recipe$tag
        args=$RECIPE_ARGS
        if [ -n "$BEFORE" ] && [ "$recipe" = generate ] && grep -q likelihood_dense "$tree/train_ppo.py"; then
            args="$args --likelihood_dense=False"  # the same rewards as a checkout without dense ones
        fi
        # shellcheck disable=SC2086  # args is a list of words
        (cd "$tree" && python benchmarks/recipe_cost.py "configs/gpt2_hellaswag_$recipe.py" \
            --device="$DEVICE" --data "$data" --steps "$STEPS" --work "$out/recipe_cost$tag" \
            --output "$out/$name.json" $args > "$out/$name.log" 2>&1) || {
            tail -20 "$out/$name.log"; exit 1; }
        grep -E "^configs|^first step|^later|^peak" "$out/$name.log"
    done
    if [ -n "$BEFORE" ]; then
        python -c "import json, sys; now, before = (json.load(open(p))['step_s'] for p in sys.argv[2:]);
print(f'{sys.argv[1]}: {before:.2f} s -> {now:.2f} s a later step, {before / now:.2f}x')" \
            "$recipe" "$out/cost_${recipe}_now.json" "$out/cost_${recipe}_before.json"
    fi
done
echo "all results in $OUT_DIR"
