#!/bin/bash
# Continue the CPU-pretrained tiny encoder (issue 29) from its 8 000-step checkpoint to 16 000 steps
# (one doubling of compute; cosine schedule restarted at half the peak rate from step 8 000). Resumable:
# rerun this script to continue. Needs runs/tiny_cpu/run from docs/experiments/tiny_cpu.sh.
cd "$(dirname "$0")/../.."
if [ ! -d runs/tiny16/run ]; then mkdir -p runs/tiny16 && cp -r runs/tiny_cpu/run runs/tiny16/run; fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} .venv/bin/mrsfm pretrain run_dir=runs/tiny16/run model=tiny train.steps=16000 data.batch_size=64 \
  model.latent_fraction=0.25 model.latent_balanced=true data.gaba_unedited=false train.checkpoint_every=250
