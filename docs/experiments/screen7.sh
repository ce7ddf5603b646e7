#!/bin/bash
# Screen 7: the MAE plus a regression of the simulator's truth (model.latent_weight), validation only.
set -e
P=".venv/bin/python docs/experiments/screen_latent.py"
REF=runs/experiments/D_band2_nonorm/encoder.safetensors   # screen 1's D: the same recipe without the latent head
C="train.blr=1.5e-3 data.batch_size=64"
$P L1_latent1 1500 $REF -- $C model.latent_weight=1.0
$P L2_latent1_transfer 1500 $REF -- $C model.latent_weight=1.0 data=transfer
$P L3_latent10 1500 $REF -- $C model.latent_weight=10.0
