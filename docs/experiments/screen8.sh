#!/bin/bash
# Screen 8: which full fine-tune keeps the shipped encoder's probe gain? Validation (benchmark seed 1),
# 10 paired seeds, 25/50/100 labels, the encoder, its random-init twin and timm scratch per recipe.
set -e
ENC=mrsfm_model/resources/encoders/mrsfm_micro.safetensors
P="env ARMS=pretrained,random_init,scratch SIZES=25,50,100 SEEDS=10 .venv/bin/python docs/experiments/ft_eval.py $ENC"
F="finetune.global_pool=flat"
$P s8_lpft_ld075 $F finetune.head_init=probe finetune.steps=300 finetune.blr=1e-3 finetune.layer_decay=0.75
$P s8_lpft $F finetune.head_init=probe finetune.steps=300 finetune.blr=1e-3
$P s8_probe $F finetune.mode=linear
$P s8_default
