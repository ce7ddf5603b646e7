#!/bin/bash
# arm A ran first: mrsfm pretrain run_dir=runs/s14/micro_f0.25 model=micro model.latent_fraction=0.25 train.steps=4000 data.batch_size=64 train.checkpoint_every=1000 (before the flags below existed: = data.gaba_unedited=true model.latent_balanced=false)
# screen 14 arms B and C (arm A: micro_f0.25, run before the targets flag existed = gaba_unedited=true, raw)
cd "$(dirname "$0")/../.."
P=".venv/bin/mrsfm pretrain model=micro train.steps=4000 data.batch_size=64 train.checkpoint_every=1000"
$P run_dir=runs/s14/micro_f1.0 model.latent_fraction=1.0 data.gaba_unedited=true > runs/s14/micro_f1.0.log 2>&1
$P run_dir=runs/s14/micro_f0.25_bal model.latent_fraction=0.25 model.latent_balanced=true data.gaba_unedited=false > runs/s14/micro_f0.25_bal.log 2>&1
for r in micro_f0.25 micro_f1.0 micro_f0.25_bal; do .venv/bin/python docs/experiments/screen_zeroshot.py runs/s14/$r; done > runs/s14/zeroshot.jsonl 2>runs/s14/zeroshot.err
