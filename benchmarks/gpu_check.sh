#!/usr/bin/env bash
# The GPU measurements behind the README's GPU figures, in one run on a CUDA machine; needs no internet.
#   1. scorer speed on the full HellaSwag validation set (GPT-2-124M shape, random weights);
#   2. the CUDA training path end to end: the demo under torchrun (NCCL, bf16 autocast);
#   3. seconds per step and peak memory of each GPT-2 recipe, on random-weight stand-ins of its models.
#
#   bash benchmarks/gpu_check.sh                       # results in out/gpu_check
#   DATA=path/to/hellaswag_val.jsonl OUT_DIR=results bash benchmarks/gpu_check.sh
#   DEVICE=cpu LIMIT=40 STEPS=2 RECIPE_ARGS="--tiny --batch_size=8 --minibatch_size=4 --micro_batch_size=2" \
#       DEMO_STEPS=2 bash benchmarks/gpu_check.sh      # the same commands, small, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-../shared/data/hellaswag_val_preprocessed.jsonl}  # any HellaSwag jsonl with labels
OUT_DIR=${OUT_DIR:-out/gpu_check}
LIMIT=${LIMIT:-10042}
STEPS=${STEPS:-4}
DEMO_STEPS=${DEMO_STEPS:-10}
RECIPE_ARGS=${RECIPE_ARGS:-}
mkdir -p "$OUT_DIR"
if [ ! -f "$DATA" ]; then
    echo "error: no HellaSwag data at $DATA; set DATA=FILE (python hellaswag.py --help tells how to download it)" >&2
    exit 2
fi
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

echo "== 3. cost per recipe"
for recipe in label teacher generate; do
    # shellcheck disable=SC2086  # RECIPE_ARGS is a list of words
    python benchmarks/recipe_cost.py "configs/gpt2_hellaswag_$recipe.py" --device="$DEVICE" --data "$DATA" \
        --steps "$STEPS" --work "$OUT_DIR/recipe_cost" --output "$OUT_DIR/cost_$recipe.json" $RECIPE_ARGS \
        > "$OUT_DIR/cost_$recipe.log" 2>&1 || { tail -20 "$OUT_DIR/cost_$recipe.log"; exit 1; }
    grep -E "^configs|^first step|^peak" "$OUT_DIR/cost_$recipe.log"
done
echo "all results in $OUT_DIR"
