#!/usr/bin/env bash
# The emoji recipe end to end on one lent GPU, in a single call of the device tool.
#
#   bash bench/gpu_recipe.sh prepare          # here: wheels and the dataset into .gpu/ (git-ignored)
#   bash bench/gpu_recipe.sh smoke            # here: the same run, a few steps per stage, on the CPU
#   mv assets/emoji /tmp/  # the tree the device tool copies must stay under 64 MiB (run trains from scratch)
#   (device tool) command: bash bench/gpu_recipe.sh run, carry: [".gpu"], timeout_s: 600
#   (device tool, same warm machine) command: bash bench/gpu_recipe.sh fetch
#   (device tool, optional, if 3 minutes are left) command: bash bench/gpu_recipe.sh methods, carry: [".gpu"], timeout_s: 300
#
# `run` installs the carried wheels, trains the base and the shards from scratch with --device cuda
# (bf16 autocast, batches 8x larger for twice the epochs) on the shipped tokenizer and VAE, evaluates with bench/emoji_eval.py (table, paper
# claims, shard curves) and leaves under $OUT: eval.md, curves.md, contact-sheet.png, recipe.log
# and the first parts of emoji.tgz (pipeline/ and shards/, ~80 MB, to unpack over assets/emoji/).
# The device tool brings back at most 64 MiB a call in files of 16 MiB, so the tarball is split in
# 15 MiB parts; `fetch` hands over the rest from the same warm machine. Join them with
# `cat emoji.tgz.part-* > emoji.tgz`; then move assets/emoji back. CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
GPU=.gpu

if [ "$mode" = prepare ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  mkdir -p "$GPU/whl"
  # The device machine has torch, transformers, safetensors, PyYAML; diffusers and pydantic (the
  # presets' validation) travel as wheels, at this machine's versions.
  pins=$(python3 -m pip list --format=freeze 2>/dev/null | grep -i -E '^(diffusers|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|importlib[-_]metadata)==')
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$GPU/whl" $pins
  tar czf "$GPU/emoji-styles.tgz" -C ../shared/data emoji-styles
  # The shipped tokenizer and finished VAE (4 MB): the run trains only the denoiser (base and shards),
  # where the gap is, and its UNets share the shipped latent space. Drop .gpu/autoencoder to train them too.
  rm -rf "$GPU/autoencoder" && mkdir -p "$GPU/autoencoder"
  cp -r assets/emoji/pipeline/tokenizer assets/emoji/pipeline/vae "$GPU/autoencoder/"
  du -sh "$GPU"
  exit 0
fi

if [ "$mode" = methods ]; then  # issue 19's merge-method times on CUDA: every method against our average, in one run
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/whl/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  timeout 270 python3 bench/methods_bench.py --device cuda --no-mecha --methods average,task-arithmetic,ties,dare,dare-ties,della \
    --slow-repeats 3 2>&1 | tee "${OUT:?}/methods.md" | grep -v Warning || echo "methods stopped (exit $?)"
  exit 0
fi

keep=/tmp/gpu-result  # survives between calls while the machine stays warm
if [ "$mode" = fetch ]; then
  cp $(ls "$keep"/emoji.tgz.part-* | tail -n +4) "${OUT:?}/"
  ls -la "$OUT"
  exit 0
fi

if [ "$mode" = run ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$GPU"/whl/*.whl
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  device=cuda; multiplier=8; epochs=2; smoke=""; budget=${BUDGET_S:-540}
  OUT=${OUT:?the device tool sets OUT}
  python3 -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$OUT/recipe.log"
else  # smoke: the same steps on this machine's CPU, a few steps per stage
  device=cpu; multiplier=1; epochs=1; smoke="--smoke"; budget=${BUDGET_S:-3600}
  OUT=${OUT:-$(mktemp -d)}
fi

start=$(date +%s)
left() { local n=$(( start + budget - $(date +%s) - ${1:-0} )); echo $(( n > 1 ? n : 1 )); }  # seconds left before the call's own limit, less $1
work=$(mktemp -d)
mkdir -p "$work/data"
if [ -f "$GPU/emoji-styles.tgz" ]; then tar xzf "$GPU/emoji-styles.tgz" -C "$work/data"; else ln -s "$(cd ../shared/data && pwd)/emoji-styles" "$work/data/emoji-styles"; fi
data="$work/data/emoji-styles"
reuse=""; [ -d "$GPU/autoencoder/vae" ] && reuse="--autoencoder-from $GPU/autoencoder"
python3 -m soup_ui.training.recipes.emoji --data "$data" --out "$work/emoji" --work "$work/recipe" --device $device \
  --batch-multiplier $multiplier --epochs $epochs $smoke $reuse 2>&1 | grep --line-buffered -v 'it/s]' >> "$OUT/recipe.log"
echo "recipe: $(( $(date +%s) - start )) s on $device (--batch-multiplier $multiplier --epochs $epochs)" | tee -a "$OUT/recipe.log"

# The assets first, so that they come back even if the evaluation runs out of time.
rm -rf "$keep" && mkdir -p "$keep"
tar czf "$keep/emoji.tgz" -C "$work/emoji" pipeline shards
split -b 15M -d "$keep/emoji.tgz" "$keep/emoji.tgz.part-"
cp $(ls "$keep"/emoji.tgz.part-* | head -3) "$OUT/"
echo "assets: $(ls "$keep"/emoji.tgz.part-* | wc -l) parts (fetch brings parts 4+)" | tee -a "$OUT/recipe.log"

cp presets/emoji-styles.yaml "$work/emoji/preset.yaml"
sed -i 's#\.\./assets/emoji/##' "$work/emoji/preset.yaml"
prompts=40; cepochs=1; [ -n "$smoke" ] && prompts=2 && cepochs=0.05
timeout $(left 60) python3 bench/emoji_eval.py --data "$data" --preset "$work/emoji/preset.yaml" --prompts $prompts \
  --classifier-epochs $cepochs --cache "$work/eval" --sheet "$OUT/contact-sheet.png" > "$OUT/eval.md" 2>> "$OUT/recipe.log" \
  || echo "eval stopped (exit $?)" | tee -a "$OUT/recipe.log"
echo "eval done at $(( $(date +%s) - start )) s" | tee -a "$OUT/recipe.log"
timeout $(left 10) python3 bench/emoji_eval.py --data "$data" --preset "$work/emoji/preset.yaml" --prompts $prompts \
  --classifier-epochs $cepochs --cache "$work/eval" --curves "$work/recipe" > "$OUT/curves.md" 2>> "$OUT/recipe.log" \
  || echo "curves stopped (exit $?)" | tee -a "$OUT/recipe.log"
echo "total: $(( $(date +%s) - start )) s; results in $OUT" | tee -a "$OUT/recipe.log"
