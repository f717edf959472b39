"""A timm ViT on real MNIST, converted through timm's own code (F.scaled_dot_product_attention,
F.layer_norm): the paper's Table 4 settings on a model built the way timm users build theirs.

    python experiments/study/timm_vit.py [--epochs 1] [--images 2000]

``timm.models.VisionTransformer`` in vit_small's shape (28x28 inputs, 4x4 patches, width 96, 4
layers, 4 heads, MLP ratio 2), trained from seed 0 with AdamW (lr 0.002, one-cycle, weight decay
0.05, batch 128), then calibrated on the first 1,024 training images and evaluated on the first
``--images`` test images at n = 4, T = 16, identity = all, with and without communication.
Prints a markdown table; docs/results.md quotes it.
"""
from __future__ import annotations

import time

import timm
import torch
from torch.utils.data import DataLoader, Subset

import hmtconv
from fit import arguments, fit
from hmtconv.data import get_datasets

POLICIES = ("opt", "999", "opt,*.mix_in0=999", "opt-emp")


def train(epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    data, _, _ = get_datasets("mnist")
    model = timm.models.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96,
                                          depth=4, num_heads=4, mlp_ratio=2.0)
    return fit(model, data, epochs, "adamw")


def main() -> None:
    args = arguments(__doc__)
    hmtconv.keep_freed_memory()
    started = time.perf_counter()
    model = train(args.epochs)
    trained = time.perf_counter() - started
    train_set, test_set, _ = get_datasets("mnist")
    calib = DataLoader(Subset(train_set, range(1024)), batch_size=256)
    test = DataLoader(Subset(test_set, range(args.images)), batch_size=256)
    prepared = hmtconv.calibrate(hmtconv.prepare(model, identity="all"), calib)
    print(f"timm VisionTransformer, {args.epochs} epoch(s) in {trained:.0f} s; first {args.images} test images")
    print("| policy | communication | ANN | t=1 | t=4 | t=16 | traced | sites |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in POLICIES:
        for communicate in (True, False):
            snn = hmtconv.convert(prepared, n=4, T=16, policy=policy, identity="all", communicate=communicate)
            r = hmtconv.evaluate(snn, test, ann=model, diagnostics=False)
            acc = r.snn_accuracy
            print(f"| {policy} | {communicate} | {r.ann_accuracy:.2f} | {acc[0]:.2f} | {acc[3]:.2f} | {acc[15]:.2f} "
                  f"| {snn.report.traced} | {len(snn.sites())} |", flush=True)


if __name__ == "__main__":
    main()
