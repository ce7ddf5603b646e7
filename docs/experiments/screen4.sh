#!/bin/bash
# Screen 4: denoising autoencoders (validation only). Each arm: pretrain + token probe, then the denoiser diagnostic.
set -x
P=.venv/bin/python
C="train.blr=1.5e-3 data.batch_size=64 data.denoise=true model.loss_visible=true"
$P docs/experiments/screen_dae.py runs/experiments/H_band2_denoise_all
$P docs/experiments/screen.py I_dae_m25 1500 $C model.mask_ratio=0.25 && $P docs/experiments/screen_dae.py runs/experiments/I_dae_m25
$P docs/experiments/screen.py J_dae_m0 1500 $C model.mask_ratio=0.0 && $P docs/experiments/screen_dae.py runs/experiments/J_dae_m0
$P docs/experiments/screen.py K_dae_m25_tiny 1500 $C model.mask_ratio=0.25 model=tiny && $P docs/experiments/screen_dae.py runs/experiments/K_dae_m25_tiny
