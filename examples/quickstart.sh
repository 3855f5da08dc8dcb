#!/usr/bin/env bash
# The embedded demo, end to end on CPU (5-6 minutes on 2 cores; up to ~13 on a busy machine):
#   preprocess the bundled samples -> train the tiny model with TP2 x PP2 on 4 CPU processes (gloo), stopping
#   at --exit-interval and resuming -> loss curves -> a tiny autoencoder and visualizer on the bundled images ->
#   generate text and a picture from the checkpoint -> compare the picture with every bundled image -> summary.
# Outputs go to $OUT (default demo_output/). The demo deletes $OUT on its next run only if it created it (it leaves
# a marker file there); any other existing, non-empty folder is refused.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo_output}
ITERS=${ITERS:-200}
VAE_ITERS=${VAE_ITERS:-400}
VIZ_ITERS=${VIZ_ITERS:-1000}
MARKER=.created-by-chrysalis-quickstart
IMAGES=examples/data/sample/images

if [ -e "$OUT" ] || [ -L "$OUT" ]; then
    if [ -d "$OUT" ] && [ ! -L "$OUT" ] && [ -f "$OUT/$MARKER" ]; then
        rm -rf -- "$OUT"
    elif [ -d "$OUT" ] && [ ! -L "$OUT" ] && [ -z "$(ls -A -- "$OUT")" ]; then
        :  # an empty folder: use it
    else
        echo "error: OUT=$OUT exists and was not created by this demo (no $OUT/$MARKER); nothing was deleted." >&2
        echo "       Choose another folder (OUT=some/new/dir bash examples/quickstart.sh) or remove it yourself." >&2
        exit 1
    fi
fi
mkdir -p "$OUT"
echo "created by examples/quickstart.sh, which deletes and recreates this folder when it runs again" > "$OUT/$MARKER"
export OMP_NUM_THREADS=1

STEP_LOG="$OUT/step_times.tsv"
: > "$STEP_LOG"
now() { python -c 'import time; print(time.time())'; }
step_start() { STEP_NAME="$1"; STEP_T0=$(now); echo; echo "== $1"; }
step_end() { awk -v name="$STEP_NAME" -v t0="$STEP_T0" -v t1="$(now)" 'BEGIN { printf "%s\t%.1f\n", name, t1 - t0 }' \
    >> "$STEP_LOG"; }

echo "Chrysalis demo: every step prints what it does; a summary with the paths of every result comes at the end."
echo "The models are tiny and trained for minutes on CPU: the text answers are memorised samples, and the picture"
echo "is a 32 x 32 pixel, blurry rendition of the bundled coffee photo (examples/data/sample/images/coffee.jpg)."
echo "Real pictures need Stable Diffusion 1.5 weights from a local path (docs/generation.md)."

step_start "1/8 preprocess the bundled samples (tiny random SigLIP, LLaMA-3-style tokenizer, llama3 template)"
python -m preprocess build --input examples/data/sample/samples.jsonl --image-root "$IMAGES" \
    --tokenizer-type tiktoken --tokenizer-model examples/data/tokenizer/tokenizer.model --chat-template llama3 \
    --vision-encoder tiny-random --seq-length 512 --workers 1 --no-progress --output "$OUT/shards"
python -m preprocess verify "$OUT/shards"
python -m preprocess inspect "$OUT/shards" --sequence 0 | head -n 12
step_end

TRAIN_ARGS=(--data-path "$OUT/shards" --split 100,0,0 --model-preset tiny
            --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
            --micro-batch-size 1 --global-batch-size 4 --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4
            --lr-warmup-iters 20 --weight-decay 0.0 --clip-grad 1.0 --stage 2
            --save "$OUT/checkpoints" --save-interval 100 --keep-last 2 --log-interval 50
            --log-jsonl "$OUT/train.jsonl")

step_start "2/8 train with TP2 x PP2 on 4 CPU processes; stop at iteration $((ITERS / 2)) (--exit-interval)"
torchrun --nproc-per-node 4 --master-port "${MASTER_PORT:-29431}" pretrain_gpt_vision.py "${TRAIN_ARGS[@]}" \
    --exit-interval $((ITERS / 2))
step_end

step_start "3/8 resume from the checkpoint to iteration $ITERS"
torchrun --nproc-per-node 4 --master-port "${MASTER_PORT:-29431}" pretrain_gpt_vision.py "${TRAIN_ARGS[@]}" \
    --load "$OUT/checkpoints"
step_end

step_start "4/8 loss curves"
python -m engine.plot "$OUT/train.jsonl" --output "$OUT/curves.png" --smooth 5
python -m engine.plot "$OUT/train.jsonl" --output "$OUT/curves_log.png" --smooth 5 --log-y
python - "$OUT/train.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"loss {first:.3f} at iteration {rows[0]['iteration']} -> {last:.3f} at iteration {rows[-1]['iteration']}")
if not last < 0.5 * first:
    sys.exit("the loss did not clearly fall")
PY
step_end

step_start "5/8 train a tiny autoencoder (diffusers AutoencoderKL layout) on the bundled images"
echo "(Stable Diffusion ships a trained one; a random one would turn every picture into noise)"
python -m engine.visualizer.autoencoder --data-path "$OUT/shards" --image-root "$IMAGES" --resolution 32 --levels 3 \
    --train-iters "$VAE_ITERS" --log-interval 100 --save "$OUT/autoencoder"
step_end

step_start "6/8 train the tiny visualizer on it: the images' SigLIP tokens -> pictures"
# MetaMorph's conditioner and learning-rate schedule (log warm-up, linear decay to 0). For a tiny model trained from
# scratch in two minutes: condition dropout 0.1 (with the reference's 0.8 only one step in five teaches the
# token -> picture mapping) and clean-latent targets (x0), which memorised the 12 pictures in far fewer steps than
# epsilon targets when we measured (docs/generation.md).
python -m engine.visualizer.train --data-path "$OUT/shards" --image-root "$IMAGES" --vae "$OUT/autoencoder" \
    --train-iters "$VIZ_ITERS" --micro-batch-size 4 --lr 2e-3 --lr-warmup-iters 50 --lr-decay-iters "$VIZ_ITERS" \
    --cfg-prob 0.1 --prediction-type sample \
    --log-interval 100 --save "$OUT/visualizer"
step_end

step_start "7/8 generate from the checkpoint alone (tokenizer and vision-encoder reference travel with it)"
# Image paths in a batch file are relative to the file itself; write an absolute one.
cat > "$OUT/prompts.jsonl" <<JSONL
{"prompt": "Generate an image of a cup of coffee on a saucer."}
{"prompt": "Name three primary colours."}
{"prompt": "What is the person wearing?", "images": ["$PWD/$IMAGES/astronaut.jpg"]}
JSONL
python -m engine.generate --load "$OUT/checkpoints" --batch-file "$OUT/prompts.jsonl" --max-new-tokens 96 \
    --visualizer "$OUT/visualizer" --render-steps 20 --guidance-scale 1 --output "$OUT/generated"
step_end

step_start "8/8 does the picture resemble coffee.jpg more than every other bundled image?"
PICTURE="$OUT/generated/images/sample_00000.image_0.png"
RESEMBLES=0
python -m engine.visualizer.similarity "$PICTURE" --target "$IMAGES/coffee.jpg" --images "$IMAGES" \
    --side-by-side "$OUT/coffee_side_by_side.png" --require-closest || RESEMBLES=$?
step_end

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1]).resolve()
print("\n== summary")
print("step times:")
for line in (out / "step_times.tsv").read_text().splitlines():
    name, seconds = line.split("\t")
    print(f"  {float(seconds):7.1f} s  {name}")
print("answers:")
for row in map(json.loads, (out / "generated" / "results.jsonl").read_text().splitlines()):
    print(f"  Q: {row['prompt']}" + (f"  [image: {Path(row['images'][0]).name}]" if row["images"] else ""))
    text = row["text"].replace("<image_start><image_end>", "<image_start> (64 visual tokens) <image_end>")
    print(f"  A: {text}")
    for name in row["rendered"]:
        print(f"     picture: {out / 'generated' / name}")
latest = (out / "checkpoints" / "latest").read_text().strip() if (out / "checkpoints" / "latest").is_file() else ""
print("files:")
print(f"  loss curves:        {out / 'curves.png'} (log scale: {out / 'curves_log.png'})")
print(f"  generated picture:  {out / 'generated/images/sample_00000.image_0.png'} (32 x 32 px)")
print(f"  next to its target: {out / 'coffee_side_by_side.png'} (coffee.jpg | generated, enlarged 8x)")
print(f"  answers:            {out / 'generated/results.jsonl'}")
print(f"  checkpoint:         {out / 'checkpoints'}" + (f" (latest: {latest})" if latest else ""))
print(f"  visualizer:         {out / 'visualizer'} (autoencoder: {out / 'autoencoder'})")
print("The picture is a tiny, blurry 32 px rendition of coffee.jpg: the tiny SigLIP is random and the autoencoder and")
print("visualizer were trained for minutes on 12 images. Real pictures need a local Stable Diffusion 1.5 directory")
print("(python -m engine.visualizer.train --pretrained SD15_DIR, or MetaMorph's published visualizer with")
print("python -m engine.visualizer.render --stable-diffusion SD15_DIR; see docs/generation.md).")
PY
if [ "$RESEMBLES" -ne 0 ]; then
    echo "error: the generated picture is not closer to coffee.jpg than to every other bundled image (see step 8)" >&2
    exit 1
fi
