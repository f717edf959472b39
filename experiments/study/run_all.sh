#!/usr/bin/env bash
# The whole MNIST study of docs/results.md: train the models (fixed seeds), then every sweep.
# Resumable: finished models and sweep points are kept; re-run to continue. Run from the repository root.
# STUDY="vgg-table1 vgg-table2" runs those sweeps alone (and trains only the models they read).
set -euo pipefail
H="${HMTCONV:-hmtconv}"
ALL="vgg-table1 vgg-table2 vit-table4 vit-linear resnet-table1 vgg-table3 vgg-granularity vgg-neurons vgg-neurons-opt
    resnet-table2 vgg-table1-identity resnet-table1-identity vit-table4-full vit-p7-table4 vit-l12-table4 vit-seeds"
STUDY=$(echo ${STUDY:-$ALL})
configs=$(for name in $STUDY; do echo "experiments/study/$name.toml"; done)
needed() { [ ! -f "runs/$1.pt" ] && grep -q "runs/$1.pt" $configs; }
mkdir -p runs
needed vgg_small && $H train --model vgg_small --dataset mnist --epochs 3 --seed 0 --out runs/vgg_small.pt
needed resnet18_small && $H train --model resnet18_small --dataset mnist --epochs 1 --seed 0 \
    --out runs/resnet18_small.pt
for seed in 0 1 2; do  # vit_small, and the other trainings of vit-seeds.toml
    name=vit_small; [ $seed = 0 ] || name=vit_small_s$seed
    needed $name && $H train --model vit_small --dataset mnist --optimizer adamw --lr 0.002 \
        --weight-decay 0.05 --epochs 3 --seed $seed --out runs/$name.pt
done
needed vit_p7 && $H train --model vit_small --model-arg patch_size=7 --model-arg hidden_dim=64 \
    --model-arg num_layers=6 --dataset mnist --optimizer adamw --lr 0.002 --weight-decay 0.05 --epochs 3 --seed 0 \
    --out runs/vit_p7.pt
needed vit_l12 && $H train --model vit_small --model-arg hidden_dim=64 --model-arg num_layers=12 \
    --dataset mnist --optimizer adamw --lr 0.001 --weight-decay 0.05 --epochs 3 --seed 0 --out runs/vit_l12.pt
for config in $configs; do
    $H sweep "$config" --no-progress
done
# configs that share a folder leave the last one's table there: the base tables again (nothing to compute)
for name in vgg-table1 resnet-table1; do
    case " $STUDY " in *" $name "*) $H sweep "experiments/study/$name.toml" --no-progress;; esac
done
[ "$STUDY" = "$(echo $ALL)" ] || exit 0  # (the two scripts below belong to the whole study)
mkdir -p runs/study
[ -f runs/study/timm-vit.md ] || { ${PYTHON:-python} experiments/study/timm_vit.py > runs/study/timm-vit.md.tmp \
    && mv runs/study/timm-vit.md.tmp runs/study/timm-vit.md; }
[ -f runs/study/torchvision-resnet18.md ] || { ${PYTHON:-python} experiments/study/torchvision_resnet18.py \
    > runs/study/torchvision-resnet18.md.tmp && mv runs/study/torchvision-resnet18.md.tmp runs/study/torchvision-resnet18.md; }
