#!/usr/bin/env bash
# The embedded demo, end to end on CPU (a few minutes on 2 cores):
#   preprocess the bundled samples -> train the tiny model with TP2 x PP2 on 4 CPU processes (gloo), stopping
#   at --exit-interval and resuming -> loss curves -> visualizer -> generate text and images from the checkpoint.
# Outputs go to $OUT (default demo_output/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_output}
ITERS=${ITERS:-300}
rm -rf "$OUT"
mkdir -p "$OUT"
export OMP_NUM_THREADS=1

echo "== 1/6 preprocess the bundled samples (tiny random SigLIP, LLaMA-3-style tokenizer, llama3 template)"
python -m preprocess build --input examples/data/sample/samples.jsonl --image-root examples/data/sample/images \
    --tokenizer-type tiktoken --tokenizer-model examples/data/tokenizer/tokenizer.model --chat-template llama3 \
    --vision-encoder tiny-random --seq-length 512 --workers 1 --no-progress --output "$OUT/shards"
python -m preprocess verify "$OUT/shards"
python -m preprocess inspect "$OUT/shards" --sequence 0 | head -n 12

TRAIN_ARGS=(--data-path "$OUT/shards" --split 100,0,0 --model-preset tiny
            --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
            --micro-batch-size 1 --global-batch-size 4 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
            --lr-warmup-iters 20 --weight-decay 0.0 --clip-grad 1.0 --stage 2
            --save "$OUT/checkpoints" --save-interval 100 --keep-last 2 --log-interval 50
            --log-jsonl "$OUT/train.jsonl")

echo "== 2/6 train with TP2 x PP2 on 4 CPU processes; stop at iteration $((ITERS / 2)) (--exit-interval)"
torchrun --nproc-per-node 4 --master-port "${MASTER_PORT:-29431}" pretrain_gpt_vision.py "${TRAIN_ARGS[@]}" \
    --exit-interval $((ITERS / 2))

echo "== 3/6 resume from the checkpoint to iteration $ITERS"
torchrun --nproc-per-node 4 --master-port "${MASTER_PORT:-29431}" pretrain_gpt_vision.py "${TRAIN_ARGS[@]}" \
    --load "$OUT/checkpoints"

echo "== 4/6 loss curves"
python -m engine.plot "$OUT/train.jsonl" --output "$OUT/curves.png" --smooth 5
python - "$OUT/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"loss {first:.3f} at iteration {rows[0]['iteration']} -> {last:.3f} at iteration {rows[-1]['iteration']}")
if not last < 0.5 * first:
    sys.exit("the loss did not clearly fall")
PY

echo "== 5/6 train the tiny diffusers visualizer on the shards' images"
python -m engine.visualizer.train --data-path "$OUT/shards" --image-root examples/data/sample/images \
    --train-iters 40 --micro-batch-size 4 --lr 2e-3 --save "$OUT/visualizer"

echo "== 6/6 generate from the checkpoint alone (tokenizer and vision-encoder reference travel with it)"
# Image paths in a batch file are relative to the file itself; write an absolute one.
cat > "$OUT/prompts.jsonl" <<JSONL
{"prompt": "Generate an image of a cup of coffee on a saucer."}
{"prompt": "Name three primary colours."}
{"prompt": "What is the person wearing?", "images": ["$PWD/examples/data/sample/images/astronaut.jpg"]}
JSONL
python -m engine.generate --load "$OUT/checkpoints" --batch-file "$OUT/prompts.jsonl" --max-new-tokens 96 \
    --visualizer "$OUT/visualizer" --render-steps 10 --output "$OUT/generated"
cat "$OUT/generated/results.jsonl"
ls "$OUT/generated"
echo "demo finished: see $OUT/ (curves.png, checkpoints/, generated/)"
