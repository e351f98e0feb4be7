#!/usr/bin/env bash
# Train the tiny world's teacher on one GPU with the same commands as on a CPU (docs/tiny_world.md), inside the
# device tool's time limit: prepare the data with the JAX encoders, train with train.py until TRAIN_SECONDS
# (SIGTERM: train.py saves a checkpoint and stops), export the EMA U-Net to $OUT/unet (fp16, < 16 MiB).
# Needs the components folder (python -m koala_jax.cli.world components) and, on a machine without grain /
# tensorflow-datasets / ml_collections, their wheels in .whl/ (see the device tool's README).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/tiny_world/device_out}
COMPONENTS=${COMPONENTS:-runs/tiny_world/components}
TRAIN_SECONDS=${TRAIN_SECONDS:-180}
RECORDS=${RECORDS:-20000}
BATCH=${BATCH:-256}
mkdir -p "$OUT"
if [ -d "${WHEELS:-.whl}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
log() { tee -a "$OUT/log.txt"; }
python3 -c "import jax; print('devices:', jax.devices())" 2>&1 | log
python3 prepare_data.py --input world:$RECORDS:mixed --teacher "$COMPONENTS" --output-dir /tmp/tw_data --resolution 64 \
  --backend jax --records-per-shard 2500 --batch-size 500 2>&1 | tail -4 | log
timeout -s TERM "$TRAIN_SECONDS" python3 train.py --config configs/tiny_world_teacher.py \
  --config.data.source=/tmp/tw_data --config.workdir=/tmp/tw_teacher --config.tensorboard=False \
  --config.total_steps=100000 --config.data.global_batch_size=$BATCH --config.optim.schedule=constant \
  --config.log_every=250 --config.ckpt.every=1000 2>&1 | grep -v "^WARNING\|^I1\|^W1" | log
python3 convert_weights.py to-diffusers --checkpoint /tmp/tw_teacher --ema --out "$OUT/unet" --dtype fp16 2>&1 | tail -3 | log
