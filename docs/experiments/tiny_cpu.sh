#!/bin/bash
# the CPU-pretrained tiny encoder (issue 29): resumable; rerun this script to continue
cd "$(dirname "$0")/../.."
.venv/bin/mrsfm pretrain run_dir=runs/tiny_cpu/run model=tiny train.steps=8000 data.batch_size=64 \
  model.latent_fraction=0.25 model.latent_balanced=true data.gaba_unedited=false train.checkpoint_every=250
