#!/bin/bash
# Test split, the shipped tiny encoder (issue 29): frozen read-outs only (pretrained vs the same encoder at
# initialisation vs timm's scratch init, band-token probes and the latent head), beside the tuned non-deep
# baselines and the linear-combination fit; vendor and quantification, 25/50/100 labels, 10 paired seeds.
# The full fine-tune arms are left out: one tiny fine-tune step takes 0.4-1.6 s on 2 cores, so the 90
# fine-tunes x 1000 steps of the full table are 10-40 h of this CPU.
cd "$(dirname "$0")/../.."
.venv/bin/mrsfm finetune --encoder tiny --out runs/final_tiny/linear "finetune.modes=[linear]"
