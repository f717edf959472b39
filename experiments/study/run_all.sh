#!/usr/bin/env bash
# The whole MNIST study of docs/results.md: train the models (fixed seeds), then every sweep.
# Resumable: finished models and sweep points are kept; re-run to continue. Run from the repository root.
set -euo pipefail
H="${HMTCONV:-hmtconv}"
mkdir -p runs
[ -f runs/vgg_small.pt ] || $H train --model vgg_small --dataset mnist --epochs 3 --seed 0 --out runs/vgg_small.pt
[ -f runs/resnet18_small.pt ] || $H train --model resnet18_small --dataset mnist --epochs 1 --seed 0 \
    --out runs/resnet18_small.pt
[ -f runs/vit_small.pt ] || $H train --model vit_small --dataset mnist --optimizer adamw --lr 0.002 \
    --weight-decay 0.05 --epochs 3 --seed 0 --out runs/vit_small.pt
[ -f runs/vit_p7.pt ] || $H train --model vit_small --model-arg patch_size=7 --model-arg hidden_dim=64 \
    --model-arg num_layers=6 --dataset mnist --optimizer adamw --lr 0.002 --weight-decay 0.05 --epochs 3 --seed 0 \
    --out runs/vit_p7.pt
[ -f runs/vit_l12.pt ] || $H train --model vit_small --model-arg hidden_dim=64 --model-arg num_layers=12 \
    --dataset mnist --optimizer adamw --lr 0.001 --weight-decay 0.05 --epochs 3 --seed 0 --out runs/vit_l12.pt
for name in ${STUDY:-vgg-table1 vgg-table2 vit-table4 vit-linear resnet-table1 vgg-table3 vgg-granularity vgg-neurons
    vgg-neurons-opt resnet-table2 vgg-table1-identity resnet-table1-identity vit-table4-full vit-p7-table4
    vit-l12-table4}; do
    $H sweep "experiments/study/$name.toml" --no-progress
done
mkdir -p runs/study
[ -f runs/study/timm-vit.md ] || { ${PYTHON:-python} experiments/study/timm_vit.py > runs/study/timm-vit.md.tmp \
    && mv runs/study/timm-vit.md.tmp runs/study/timm-vit.md; }
[ -f runs/study/torchvision-resnet18.md ] || { ${PYTHON:-python} experiments/study/torchvision_resnet18.py \
    > runs/study/torchvision-resnet18.md.tmp && mv runs/study/torchvision-resnet18.md.tmp runs/study/torchvision-resnet18.md; }
