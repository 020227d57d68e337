#!/usr/bin/env bash
# Reproduces docs/EVALUATION.md on a CPU-only machine (2 cores: about an hour).
# Run from the repository root after `make install`; uses ../shared/data/medmnist.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${MEDSWAV_SHARED_DATA:-../shared/data}/medmnist
OUT=${OUT:-runs/eval}
mkdir -p "$OUT"

# 1. Pretraining data: PneumoniaMNIST through the real pipeline (ingest -> shards -> augment_dali).
$PY -m ingest "$DATA/pneumoniamnist.npz" --modality xr --out "$OUT/pneumonia" --workers 2 --salt medswav-evaluation-salt
$PY -m augment_dali.stats "$OUT/pneumonia" --small --samples 1000
$PY -m augment_dali.preview "$OUT/pneumonia" --small --out "$OUT/preview.png"

# 2. Self-supervised pretraining on the 4,708 training images (labels unused: beta = 0).
$PY -m train --config configs/pneumoniamnist_pretrain.toml --data "$OUT/pneumonia" --out "$OUT/pretrain"
$PY -m train.export "$OUT/pretrain/checkpoint.pt" --out "$OUT/backbone.pt"

# 3. The three protocols, pretrained versus random initialisation.
COMMON=(--pretrained "$OUT/backbone.pt" --arch resnet18 --seed 0)
$PY -m train.downstream label-efficiency --data "$DATA/pneumoniamnist.npz" --out "$OUT/pneumonia_le_finetune" \
    "${COMMON[@]}" --mode finetune --fractions 10,1 --repeats 3 --epochs 8
$PY -m train.downstream label-efficiency --data "$DATA/pneumoniamnist.npz" --out "$OUT/pneumonia_le_linear" \
    "${COMMON[@]}" --mode linear --fractions 100,50,25,10,1 --repeats 3 --epochs 30
$PY -m train.downstream robustness --data "$DATA/pneumoniamnist.npz" --out "$OUT/pneumonia_conv" \
    "${COMMON[@]}" --mode finetune --train-fraction 0.1 --repeats 2 --epochs 12
$PY -m train.downstream all --data "$DATA/breastmnist.npz" --out "$OUT/breast" \
    "${COMMON[@]}" --mode finetune --fractions 100,25,10 --repeats 3 --epochs 10
