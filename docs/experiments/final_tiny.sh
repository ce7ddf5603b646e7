#!/bin/bash
# Test-split vendor table of the shipped tiny encoder (issue 29): pretrained vs random-init vs scratch,
# linear probe and full fine-tune, beside the tuned non-deep baselines; 25/50/100 labels, 5 paired seeds.
cd "$(dirname "$0")/../.."
.venv/bin/mrsfm finetune --encoder tiny --out runs/final_tiny/vendor finetune.tasks=[vendor] "finetune.seeds=[0,1,2,3,4]"
