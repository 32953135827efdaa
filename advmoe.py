#!/usr/bin/env python3
"""AdvMoE: adversarially robust training of sparse Mixture-of-Experts CNNs, in one readable file.

Reference implementation of
    Zhang, Cai, Chen, Zhang, Zhang, Chen, Chang, Wang, Liu. "Robust Mixture-of-Expert Training for
    Convolutional Neural Networks". ICCV 2023. arXiv:2308.10110.
Claim (the paper): router-expert alternating adversarial training (Eq. 1, Algorithm 1) makes an MoE-CNN more
    robust than AT(S-Dense), AT(Sparse) and AT(MoE) at S-Dense's inference cost (Table 1).
Evidence here: results/cifar10_laptop/ (real CIFAR-10, ResNet-18 at width 1/4, 20,000 images, 12 epochs,
    2 seeds). PGD-50 / AutoAttack RA on 2,000 / 500 test images, seed 1 (seed 2): AT(S-Dense) 28.25 (28.60) /
    24.6, AT(MoE) 24.50 (25.70) / 19.8 (21.0), AdvMoE 23.90 (25.45) / 19.0 (20.4); the authors' global router
    masks PGD (PGD-50 29.8-31.2, AutoAttack 19.8-21.4). At that scale AdvMoE's gain is not reproduced;
    AT(MoE) < AT(S-Dense) is (one standard error ~1 / 2 points; the two seeds differ by 0.35-1.55).

Usage
    python advmoe.py --dataset cifar10 --arch resnet18 --method advmoe      # train + evaluate one model
    python advmoe.py --dataset synthetic --width 0.25 --epochs 3 --out runs/try   # offline, a minute on a CPU
    python advmoe.py --eval-only runs/try/checkpoint.pt                    # evaluate a checkpoint again
    python advmoe.py report runs/                                          # every table, from result.json
    python advmoe.py bench --device cuda                                   # step time, images/s, GFLOPs
    torchrun --nproc_per_node=8 advmoe.py --dataset imagenet ...          # several GPUs
    bash train_all.sh                                                      # every table of the paper

Notation (paper -> code)
    psi      backbone and experts: every parameter whose name has no "router"    backbone_params()
    phi      routers (a gate per MoE layer, or the one global router)           router_params()
    N, r     experts per MoE layer; an expert owns r*C of a layer's C channels  --n-experts, --ratio
    eps      l_inf radius in pixel units (inputs in [0,1]; the model normalizes them itself)
    K        PGD steps in training (2); 50 at test time                        --train-steps, --test-steps
    beta     TRADES weight 1/lambda (6)                                         --beta

Paper -> code
    Fig. 1a / A1, MoE layer          MoEConv: router, top-1 straight-through gate, one expert's conv + BN
    Eq. (AT), TRADES                 pgd, training_attack, trades_loss, robust_loss
    Eq. (1), Algorithm 1             advmoe_step (lines 3-5), level, batch_streams, make_optimizers
    AT(Dense / S-Dense / MoE)        joint_step;  AT(Sparse): channel_wiring, ChannelScores, prune
    SA, RA (PGD-50), RA-AA, GFLOPs   evaluate, adversaries, autoattack, gflops_per_input
    Insight 2 (4-way split)          routing_counts, routing_summary;  Insights 1-3: --train-params, --init
    Fig. 6 (router utility)          router_utility_tables, pathway_iou;  Figs. 7-8, Tables 1-2: report

Deviations (each marked NOTE(ours) where it is made)
    1. A BatchNorm per expert: the BatchNorm after a routed conv normalizes the inputs routed to each expert
       with that expert's statistics and affine parameters (the authors' code shares one).
    2. The router reads its pooled features standardized per input, with no bias and a small init; the paper
       does not say what a router reads. Plain linear routers on pooled post-ReLU features give every input
       nearly the same logits, and most layers route 95% or more of the inputs to one expert before training.
    3. Expert layout: expert e of a layer owns filters [e*rC, (e+1)*rC) of one N*rC-filter weight and reads
       the pathway's r*C channels by position, whichever expert wrote them (the authors' code does the same).
       The paper's text describes experts as sub-networks of one backbone, so with r = 1 an expert would be
       the whole backbone whatever N; here N experts of r = 1 are N full-width filter banks.
    4. The stem is r*64 wide (ResNet; r*16 WRN, r*24 DenseNet) and shared by the experts, so a pathway is
       exactly S-Dense; the authors' stem is 64 wide whatever r.
    5. Pre-activation BatchNorms (WRN, DenseNet) act on the pathway's r*C channels, shared by all experts,
       like the stem, projection shortcuts and classifier. ImageNet-size inputs get a 7x7/2 stem and a
       max-pool.
    6. Two independent shuffles feed B_phi and B_psi; an epoch is one pass of B_psi. In the lower level the
       BatchNorm running statistics (buffers of psi) keep updating on B_phi.
    7. Routing regularizers the paper does not have, off by default: a Switch-Transformer balance term
       (--balance), a router learning-rate multiplier (--router-lr) and the authors' class-mod-N router
       supervision (--router-supervision, with --router global for their configuration).
    8. AT(Sparse) prunes channel groups: layers whose outputs are summed keep the same channels, so the pruned
       network is really r*C wide. Its scores start from filter norms. Router utility (Fig. 6) compares the
       MoE and the Sparse-CNN channel by position, beside the IoU of random pathways.
    9. AutoAttack is assembled from torchattacks' components at the reference settings (torchattacks' own
       "standard" version runs 10 iterations). The soft attack and Square are added to PGD (RA-worst).
   10. torchrun averages each level's gradients with one all-reduce (DDP's reducer cannot follow a level's
       partial backward). --width, --train-n and --val-n scale a run down for a laptop.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Subset

ARCHS = ("resnet18", "wrn28_10", "vgg16", "densenet")
DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic")
METHODS = ("dense", "sdense", "moe", "advmoe", "sparse")
MOE_METHODS = ("moe", "advmoe")  # the methods whose model is an MoE-CNN
EVAL_ATTACKS = ("pgd", "soft", "square", "autoattack")
MEAN_STD = {  # per-channel mean and std; the model normalizes as its first layer
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

# ==================================================================================================
# 1. The MoE layer: router, top-1 gate with a straight-through estimator, channel-expert convolution
# ==================================================================================================
class Gate(NamedTuple):
    """One MoE layer's routing decision for a batch, returned to the caller (never stored on a module)."""
    logits: torch.Tensor  # (B, N) router scores
    choice: torch.Tensor  # (B,) chosen expert e(b), int64
    scale: torch.Tensor   # (B,) exactly 1.0 in value; carries the router's gradient (straight-through)

def top1_gate(logits: torch.Tensor) -> Gate:
    """Hard top-1 routing: each input goes to its highest-scoring expert."""
    probs = logits.float().softmax(-1)                                        # (B, N)
    choice = probs.argmax(-1)                                                 # (B,)
    p = probs.gather(1, choice[:, None]).squeeze(1)                           # (B,) p_{e(b)}
    # s_b = 1 + p_{e(b)} - sg(p_{e(b)}): value 1 (the hard one-hot), gradient that of p_{e(b)}
    # NOTE(official code): theirs passes the gradient to the chosen raw logit; here it flows through the
    # softmax, so every logit of the router gets one (both are "straight-through").
    return Gate(logits, choice, 1.0 + (p - p.detach()))

def straight_through(y: torch.Tensor, gate: Gate) -> torch.Tensor:
    """y_b * s_b: the chosen expert's output in value, the router's gradient in the backward pass."""
    return y * gate.scale.to(y.dtype)[:, None, None, None] if gate.scale.requires_grad else y

def standardize(z: torch.Tensor) -> torch.Tensor:
    """NOTE(ours), deviation 2. Pooled post-BatchNorm-ReLU features share a large positive mean, so a plain
    linear router gives every input nearly the same logits (a per-layer offset 2-5x their spread across
    inputs): most layers then route 95% or more of the inputs to one expert before any training, and SGD moves
    mostly that offset. Standardized per input, the logits depend on which channels respond, not on how
    strongly all of them do."""
    # z_b <- (z_b - mean_c z_bc) / sqrt(var_c z_bc + 1e-5), (B, C)
    return F.layer_norm(z, z.shape[1:])

def router_head(cin: int, n_experts: int) -> nn.Linear:
    """A router's linear map to N logits: no bias (a shared offset is what standardize removes) and a small
    init, so the first choices are the input's own and the probabilities start near 1/N."""
    head = nn.Linear(cin, n_experts, bias=False)
    nn.init.normal_(head.weight, 0.0, 0.01)
    return head

@dataclass
class Routing:
    """The routing of one forward pass: created by the model's forward and passed down; each MoE layer
    appends its Gate, so the caller gets every decision back."""
    dispatch: str                           # "sparse" | "masked" | "soft" (see MoEConv)
    gates: list = field(default_factory=list)
    shared: Gate | None = None              # the global router's gate, used by every layer

class MoEConv(nn.Module):
    """A conv (optionally with its BatchNorm) whose output channels are split into N experts of `cout`
    channels; a router picks one expert per input (Fig. 1a). With N = 1 it is a plain conv, the Dense /
    S-Dense layer, so every backbone is written once. Expert e owns filters [e*cout, (e+1)*cout) of one
    (N*cout, cin, k, k) weight and reads the pathway's cin channels (deviation 3)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, n_experts: int, bn: bool, router: bool,
                 shared_bn: bool = False, standardized: bool = True):
        super().__init__()
        self.cin, self.cout, self.stride, self.padding, self.n = cin, cout, stride, kernel // 2, n_experts
        self.shared_bn, self.standardized = shared_bn and n_experts > 1, standardized
        self.weight = nn.Parameter(torch.empty(n_experts * cout, cin, kernel, kernel))
        # Kaiming (fan_out) of one expert as a standalone conv: std = sqrt(2 / (cout * k * k))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (cout * kernel * kernel)))
        # NOTE(ours), deviation 1: a BatchNorm per expert, stored as one BatchNorm over N*cout channels;
        # --shared-bn: one BatchNorm over the pathway's cout channels for every expert (the authors' code).
        self.bn = nn.BatchNorm2d(cout if self.shared_bn else n_experts * cout) if bn else None
        # the per-layer router (Fig. A1) on the layer's pooled input
        self.router = router_head(cin, n_experts) if (router and n_experts > 1) else None

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.n == 1:
            return self.conv_bn(x, 0)
        # g_l(x) = top1(softmax(W_l std(GAP(x)))); the global router decided once for every layer
        pooled = x.mean((2, 3))                                                   # (B, cin)
        gate = routing.shared or top1_gate(self.router(standardize(pooled) if self.standardized else pooled))
        routing.gates.append(gate)
        if routing.dispatch == "sparse":
            # y_b = E_{e(b)}(x_b): group the batch by expert, one conv of the expert's r*C filters per group
            order = gate.choice.argsort()
            sizes = gate.choice.bincount(minlength=self.n).tolist()     # the one host read of the layer
            ys = [self.conv_bn(xe, e) for e, xe in enumerate(x[order].split(sizes)) if len(xe)]
            y = torch.cat(ys)[order.argsort()]                                    # (B, cout, H', W')
            return straight_through(self.normalize(y, slice(None)) if self.shared_bn else y, gate)
        return self.masked_forward(x, gate, soft=routing.dispatch == "soft")

    def conv_bn(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e (its filters, then its own BatchNorm) on the inputs routed to it: (b, cin, H, W) -> (b,
        cout, H', W'). Its running statistics are slices (views) of the BatchNorm's buffers, updated in
        place. A shared BatchNorm is left to the caller: it normalizes the whole batch at once."""
        s = slice(e * self.cout, (e + 1) * self.cout)
        y = F.conv2d(x, self.weight[s], None, self.stride, self.padding)
        return y if self.shared_bn else self.normalize(y, s)

    def normalize(self, y: torch.Tensor, s: slice) -> torch.Tensor:
        """The BatchNorm's channels s on y (batch statistics in training, running ones in eval)."""
        bn = self.bn
        return y if bn is None else F.batch_norm(y, bn.running_mean[s], bn.running_var[s], bn.weight[s],
                                                  bn.bias[s], self.training, bn.momentum, bn.eps)

    # The speed path. The sparse path above needs the group sizes on the host, which stalls a GPU once per
    # layer; on CUDA ("auto") every expert runs on every input instead: static shapes, no host read, one graph
    # for torch.compile, at N times the experts' FLOPs. It is also the reference the sparse path is tested
    # against, and, with soft=True, the surrogate-gradient attack's forward.
    def masked_forward(self, x: torch.Tensor, gate: Gate, soft: bool = False) -> torch.Tensor:
        y = F.conv2d(x, self.weight, None, self.stride, self.padding)           # (B, N*cout, H', W')
        y = rearrange(y, "b (n c) h w -> b n c h w", n=self.n)              # (B, N, cout, H', W')
        # E_{e(b)}(x_b): each input's rows of its chosen expert (a gather)
        hard = y[torch.arange(len(y), device=y.device), gate.choice]         # (B, cout, H', W')
        if self.bn is not None:  # each expert's BatchNorm as y * scale_e + shift_e, (N, cout) each
            # (a shared BatchNorm: one group of statistics for every input, (1, cout) each)
            group = gate.choice * (not self.shared_bn)                             # (B,)
            scale, shift = self.expert_affine(hard, group)
            hard = hard * scale[group, :, None, None] + shift[group, :, None, None]
            y = y * scale[:, :, None, None] + shift[:, :, None, None] if soft else y
        hard = straight_through(hard, gate)
        if not soft:
            return hard
        # y = y_soft + sg(y_hard - y_soft), y_soft = sum_e p_e E_e(x): the hard value, the mixture's gradient
        mix = (y * gate.logits.float().softmax(-1).to(y.dtype)[:, :, None, None, None]).sum(1)
        return mix + (hard - mix).detach()

    def expert_affine(self, y: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BN_e(y) = y * scale_e + shift_e, from the B chosen outputs y (B, cout, H', W'). In training the
        statistics of expert e are those of the inputs routed to it, as F.batch_norm computes them for a group
        of the sparse path (in float32 also under bf16 autocast); in eval, its running statistics."""
        bn, n = self.bn, 1 if self.shared_bn else self.n
        mean, var = bn.running_mean.view(n, -1), bn.running_var.view(n, -1)
        if self.training:
            y = y.to(torch.promote_types(y.dtype, torch.float32))
            with torch.autocast(y.device.type, enabled=False):
                onehot = F.one_hot(choice, n).to(y.dtype)                        # (B, N)
                count = onehot.sum(0) * y[0, 0].numel()                          # (N,) inputs x pixels
                # mean_e = sum_{b: e(b)=e} sum_hw y_b / n_e;  var_e = sum (y_b - mean_e)^2 / n_e
                mean = onehot.T @ y.sum((2, 3)) / count.clamp(min=1)[:, None]    # (N, cout)
                var = onehot.T @ (y - mean[choice, :, None, None]).square().sum((2, 3)) \
                    / count.clamp(min=1)[:, None]
            with torch.no_grad():  # running <- running + m (stat - running) where the expert had inputs
                m, dt = (count > 0).to(mean.dtype)[:, None] * bn.momentum, bn.running_mean.dtype
                bn.running_mean.view(n, -1).lerp_(mean.to(dt), m.to(dt))
                unbiased = var * (count / (count - 1).clamp(min=1))[:, None]
                bn.running_var.view(n, -1).lerp_(unbiased.to(dt), m.to(dt))
        # BN_e(y) = (y - mean_e) / sqrt(var_e + eps) * gamma_e + beta_e
        scale = bn.weight.view(n, -1) / torch.sqrt(var + bn.eps)
        return scale, bn.bias.view(n, -1) - mean * scale

class GlobalRouter(nn.Module):
    """The authors' image-level router: one decision shared by every layer (a small CNN, 16/32/64 channels,
    as their ResNet-20-like one), on the same standardized pooled features as the per-layer routers."""

    def __init__(self, n_experts: int, standardized: bool = True):
        super().__init__()
        layers, cin, self.standardized = [], 3, standardized
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = router_head(64, n_experts)

    def forward(self, x):
        z = self.features(x)                                                   # (B, 64)
        return self.head(standardize(z) if self.standardized else z)           # (B, N)

# ==================================================================================================
# 2. Backbones, each written once; `Spec` makes the same class Dense, S-Dense or MoE-CNN
# ==================================================================================================
@dataclass(frozen=True)
class Spec:
    """What tells Dense (r = 1, N = 1), S-Dense (r < 1, N = 1) and MoE-CNN (N >= 2) apart, for any backbone.
    Channel counts passed in are the paper's C; a tuple of counts is a concatenation of groups (DenseNet)."""
    ratio: float = 1.0
    n_experts: int = 1
    layer_router: bool = True
    base: float = 1.0  # --width W: Dense has round(W * C) channels where the paper's has C
    shared_bn: bool = False     # --shared-bn: one BatchNorm for every expert of a layer
    standardized: bool = True   # --router-standardize: the routers read standardized pooled features

    def width(self, channels: int | tuple) -> int:
        """Channels of a tensor in the pathway (= S-Dense): r * round(W * C), at least 1; of a concatenation,
        the sum of its groups' widths (so a pruned Dense network and S-Dense have the same shapes)."""
        if isinstance(channels, tuple):
            return sum(self.width(c) for c in channels)
        return max(1, round(self.ratio * max(1, round(self.base * channels))))

    def conv(self, cin, cout, kernel: int = 3, stride: int = 1, bn: bool = True, shared: bool = False):
        """A routed conv: N experts of r*cout filters, each reading the pathway's r*cin channels; shared=True:
        one conv for all experts (stem, projection shortcut)."""
        n = 1 if shared else self.n_experts
        return MoEConv(self.width(cin), self.width(cout), kernel, stride, n, bn, self.layer_router,
                       self.shared_bn, self.standardized)

    def bn(self, channels) -> nn.BatchNorm2d:
        """A pre-activation BatchNorm on the pathway, shared by all experts (deviation 5)."""
        return nn.BatchNorm2d(self.width(channels))

    def fc(self, channels, num_classes: int) -> nn.Linear:
        return nn.Linear(self.width(channels), num_classes)

class Stem(nn.Module):
    """The shared stem on the RGB image (deviations 4, 5): 3x3/1 for 32-64 px; 7x7/2 + 3x3/2 max-pool for
    ImageNet-size inputs (conv-BN-ReLU-pool, or conv-pool where the blocks start with a BatchNorm)."""

    def __init__(self, spec: Spec, cout: int, image_size: int, bn: bool = True):
        super().__init__()
        self.pool = image_size >= 128
        self.conv = MoEConv(3, spec.width(cout), 7 if self.pool else 3, 2 if self.pool else 1, 1, bn, False)

    def forward(self, x, routing):
        x = self.conv(x, routing)
        return F.max_pool2d(F.relu(x) if self.conv.bn else x, 3, 2, 1) if self.pool else x

class BasicBlock(nn.Module):
    """ResNet block: relu(BN(conv2(relu(BN(conv1 x)))) + shortcut(x)); both 3x3 convs routed."""

    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = spec.conv(cin, cout, 3, stride), spec.conv(cout, cout)
        self.shortcut = spec.conv(cin, cout, 1, stride, shared=True) if (stride, cin) != (1, cout) else None

    def forward(self, x, routing):
        # (B, r*cin, H, W) -> (B, r*cout, H/stride, W/stride); each routed conv picks its expert per input
        out = self.conv2(F.relu(self.conv1(x, routing)), routing)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x, routing)))

class ResNet18(nn.Module):
    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem, blocks, cin = Stem(spec, 64, image_size), [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):  # 4 stages of 2 blocks
            blocks += [BasicBlock(spec, cin, cout, stride), BasicBlock(spec, cout, cout, 1)]
            cin = cout
        self.blocks, self.fc = nn.ModuleList(blocks), spec.fc(512, num_classes)

    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))            # (B, r*64, 32, 32) on CIFAR
        for block in self.blocks:                   # r*64, r*128, r*256, r*512 channels at 32, 16, 8, 4 px
            x = block(x, routing)
        return self.fc(x.mean((2, 3)))              # pool (B, r*512) -> (B, classes)

class WideBlock(nn.Module):
    """Pre-activation wide block: conv2(relu(BN(conv1(relu(BN x))))) + shortcut. conv1 carries the middle
    BatchNorm (per expert); the first acts on the pathway, shared (deviation 5)."""

    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = spec.bn(cin), spec.conv(cin, cout, 3, stride)
        self.conv2 = spec.conv(cout, cout, bn=False)
        self.shortcut = spec.conv(cin, cout, 1, stride, False, True) if (stride, cin) != (1, cout) else None

    def forward(self, x, routing):
        o = F.relu(self.bn1(x))                                      # pre-activation, (B, r*cin, H, W)
        out = self.conv2(F.relu(self.conv1(o, routing)), routing)    # (B, r*cout, H/stride, W/stride)
        return out + (x if self.shortcut is None else self.shortcut(o, routing))

class WideResNet(nn.Module):
    """WRN-28-10 (Zagoruyko & Komodakis): 3 groups of (28-4)/6 = 4 blocks, widths 160, 320, 640."""

    def __init__(self, spec: Spec, num_classes: int, image_size: int, depth: int = 28, widen: int = 10):
        super().__init__()
        self.stem, blocks, cin = Stem(spec, 16, image_size, bn=False), [], 16
        for cout, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            for i in range((depth - 4) // 6):
                blocks.append(WideBlock(spec, cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks, self.bn, self.fc = nn.ModuleList(blocks), spec.bn(cin), spec.fc(cin, num_classes)

    def forward(self, x, routing):
        x = self.stem(x, routing)                    # (B, r*16, 32, 32) on CIFAR
        for block in self.blocks:                   # r*160, r*320, r*640 channels at 32, 16, 8 px
            x = block(x, routing)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))  # pool (B, r*640) -> (B, classes)

class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR style (one linear classifier); the first conv is the shared stem."""
    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem, layers, cin = Stem(spec, 64, image_size), [], 64
        for v in self.CFG[1:]:
            layers.append(nn.MaxPool2d(2) if v == "M" else spec.conv(cin, v))
            cin = cin if v == "M" else v
        self.layers, self.fc = nn.ModuleList(layers), spec.fc(512, num_classes)

    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))            # (B, r*64, 32, 32) on CIFAR
        for layer in self.layers:                   # five max-pools: 32 -> 1 px, up to r*512 channels
            x = layer(x) if isinstance(layer, nn.MaxPool2d) else F.relu(layer(x, routing))
        return self.fc(x.mean((2, 3)))              # (B, classes)

class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output appended to the input. The 1x1
    conv carries the middle BatchNorm (per expert); the first acts on the shared pathway. `chans`: the Dense
    channel counts of the concatenated input's groups."""

    def __init__(self, spec: Spec, chans: tuple, growth: int):
        super().__init__()
        self.bn = spec.bn(chans)
        self.conv1, self.conv2 = spec.conv(chans, 4 * growth, 1), spec.conv(4 * growth, growth, bn=False)

    def forward(self, x, routing):
        # (B, C, H, W) -> 1x1 conv (B, r*4k, H, W) -> 3x3 conv (B, r*k, H, W), appended: (B, C + r*k, H, W)
        return torch.cat([x, self.conv2(F.relu(self.conv1(F.relu(self.bn(x)), routing)), routing)], 1)

class DenseNet(nn.Module):
    """The CIFAR DenseNet-BC the authors use: depth 40, growth k = 12, compression 0.5: 3 dense blocks of
    (40-4)/6 = 6 bottleneck layers; transitions BN-ReLU-conv1x1-avgpool, routed like every conv."""

    def __init__(self, spec: Spec, num_classes: int, image_size: int, depth: int = 40, growth: int = 12):
        super().__init__()
        self.stem, chans, layers = Stem(spec, 2 * growth, image_size, bn=False), (2 * growth,), []
        for block in range(3):
            for _ in range((depth - 4) // 6):
                layers.append(DenseLayer(spec, chans, growth))
                chans += (growth,)
            if block < 2:  # transition to half the channels
                cout = sum(chans) // 2
                layers.append(nn.ModuleDict({"bn": spec.bn(chans),
                                             "conv": spec.conv(chans, cout, 1, bn=False)}))
                chans = (cout,)
        self.layers, self.bn, self.fc = nn.ModuleList(layers), spec.bn(chans), spec.fc(chans, num_classes)

    def forward(self, x, routing):
        x = self.stem(x, routing)
        for layer in self.layers:  # a transition: (B, C, H, W) -> (B, C/2, H/2, W/2)
            x = layer(x, routing) if isinstance(layer, DenseLayer) else \
                F.avg_pool2d(layer["conv"](F.relu(layer["bn"](x)), routing), 2)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))

BACKBONES = {"resnet18": ResNet18, "wrn28_10": WideResNet, "vgg16": VGG16, "densenet": DenseNet}

class MoECNN(nn.Module):
    """Normalization + backbone (+ the global router). model(x) returns logits, so any attack library can use
    it; model(x, return_routing=True) also returns the Gates, one per MoE layer, in forward order."""

    def __init__(self, arch: str, num_classes: int = 10, image_size: int = 32, ratio: float = 1.0,
                 n_experts: int = 1, router: str = "layer", mean_std=MEAN_STD["cifar10"], width: float = 1.0,
                 shared_bn: bool = False, router_standardize: bool = True):
        super().__init__()
        spec = Spec(ratio, n_experts, router == "layer", width, shared_bn, router_standardize)
        self.backbone = BACKBONES[arch](spec, num_classes, image_size)
        self.global_router = GlobalRouter(n_experts, router_standardize) \
            if (router == "global" and n_experts > 1) else None
        self.register_buffer("mean", torch.tensor(mean_std[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(mean_std[1]).view(1, 3, 1, 1))

    def forward(self, x, return_routing: bool = False, dispatch: str = "auto"):
        # "auto": the sparse path on the CPU (only the chosen experts), the masked one on CUDA (no host sync)
        dispatch = ("masked" if x.is_cuda else "sparse") if dispatch == "auto" else dispatch
        x = (x - self.mean) / self.std               # (B, 3, H, W), inputs in [0,1] normalized here
        routing = Routing(dispatch)
        if self.global_router is not None:
            routing.shared = top1_gate(self.global_router(x))
        logits = self.backbone(x, routing)
        return (logits, routing.gates) if return_routing else logits

def router_params(model: nn.Module) -> list[nn.Parameter]:
    """phi: the routers' parameters."""
    return [p for n, p in model.named_parameters() if "router" in n]

def backbone_params(model: nn.Module) -> list[nn.Parameter]:
    """psi: everything else (stem, experts, BatchNorms, shortcuts, classifier)."""
    return [p for n, p in model.named_parameters() if "router" not in n]

# ==================================================================================================
# 3. Attacks and losses: one l_inf PGD that maximizes any loss; TRADES; the routing regularizer
# ==================================================================================================
@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the duration (BatchNorm running statistics), then every module's own mode back (a part
    frozen in eval mode by --train-params stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode

def pgd(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], eps: float,
        step_size: float, steps: int, start: str = "uniform", generator: torch.Generator | None = None):
    """max_{|delta|_inf <= eps, x+delta in [0,1]} loss_fn(x + delta) by projected sign-gradient ascent
    (Madry et al. 2018), in eval mode, gradients w.r.t. the input only. start: "uniform" in the eps-ball
    (test PGD) or "normal", x + 0.001 N(0, I) (TRADES), drawn from `generator` (None: the global stream)."""

    draw = torch.rand if start == "uniform" else torch.randn
    r = draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)       # (B, 3, H, W)
    # x'_0 = x + U(-eps, eps)^d or x + 0.001 N(0, I), projected like every step
    x_adv = x + ((2 * r - 1) * eps if start == "uniform" else 0.001 * r)
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    with evaluating(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
            # x' <- Proj_{B_eps(x) ∩ [0,1]^d}( x' + alpha * sign(grad_x' loss) )
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()

def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, reduction: str = "batchmean"):
    """KL(p || q) from logits through log_softmax: finite where a softmax underflows (the official code's
    router KL went NaN there)."""
    # KL(p || q) = sum_c p_c (log p_c - log q_c)
    return F.kl_div(q_logits.float().log_softmax(-1), p_logits.float().log_softmax(-1), reduction=reduction,
                    log_target=True)

def ce_objective(model: nn.Module, y: torch.Tensor, dispatch: str = "auto") -> Callable:
    """The test attack's objective sum_b CE(f(x'_b), y_b): a sum, so each input's gradient is its own."""
    return lambda x_adv: F.cross_entropy(model(x_adv, dispatch=dispatch).float(), y, reduction="sum")

def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    # (AT) CE(f(x), y) + beta * KL(f(x) || f(x + delta))
    # NOTE(paper): as in TRADES' reference code, both sides of the KL carry gradient; only attack targets are
    # detached.
    return F.cross_entropy(logits.float(), y) + beta * kl_from_logits(logits, logits_adv)

def routing_regularizer(gates: list[Gate], y: torch.Tensor, balance: float, supervision: float):
    """NOTE(ours), deviation 7: terms the paper does not have, averaged over the gates given (every MoE layer
    of the clean and of the adversarial forward); both weights are 0 by default."""
    total = torch.zeros((), device=y.device)
    for g in gates:
        probs, n = g.logits.float().softmax(-1), g.logits.shape[1]                # (B, N)
        if balance:
            # Switch Transformer: lambda * N * sum_k f_k P_k, f_k the share routed to k, P_k the mean p_k
            total = total + balance * n * (F.one_hot(g.choice, n).float().mean(0) * probs.mean(0)).sum()
        if supervision:
            # NOTE(official code): lambda * CE(router logits, y mod N), a fixed class-to-expert target
            total = total + supervision * F.cross_entropy(g.logits.float(), y % n)
    return total / max(len(gates), 1)

def expert_usage(gates: list[Gate]) -> torch.Tensor:
    """(L, N): f_{l,k} = (1/B) sum_b [e_l(x_b) = k], the share of the batch each layer routes to expert k."""
    return torch.stack([F.one_hot(g.choice, g.logits.shape[1]).float().mean(0) for g in gates])

# ==================================================================================================
# 4. Algorithm 1 (AdvMoE) and the baselines: each method is a step function
# ==================================================================================================
class Objective(NamedTuple):
    """All that the training objective and its inner attack read (Settings.objective builds it)."""
    loss: str           # "trades": CE + beta * KL | "pgdat": CE at PGD examples | "natural": CE, no attack
    beta: float         # TRADES weight 1/lambda
    eps: float          # l_inf radius of the training attack, pixel units
    step_size: float    # its step alpha (default 1.25 eps / K: the authors' 5/255 at eps 8/255, K = 2)
    steps: int          # K
    balance: float      # routing regularizer weights (deviation 7; 0 in the paper)
    supervision: float

def training_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective) -> torch.Tensor:
    """The inner maximization of the training loss, K steps."""
    if obj.loss == "pgdat":  # Madry: max CE
        return pgd(model, x, ce_objective(model, y), obj.eps, obj.step_size, obj.steps)
    with torch.no_grad(), evaluating(model):
        # P = f(x) in eval mode, computed once and fixed (a copy: CUDA graphs reuse their outputs)
        target = model(x).clone()
    # TRADES: max_delta KL(f(x) || f(x + delta)), started at x + 0.001 N(0, I)
    return pgd(model, x, lambda xa: kl_from_logits(target, model(xa), "sum"), obj.eps, obj.step_size,
               obj.steps, "normal")

def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective):
    """A fresh training attack against the model as it is now, then the training loss at (x, x_adv) and the
    routing regularizer of both forwards. loss "natural" (Sec. 4 stage 1, and the learnability diagnosis):
    CE(f(x), y), no attack."""
    if obj.loss == "natural":
        logits, gates = model(x, return_routing=True)
        objective, logits_adv, gates_adv = F.cross_entropy(logits.float(), y), logits, []
    else:
        logits_adv, gates_adv = model(training_attack(model, x, y, obj), return_routing=True)
        if obj.loss == "trades":
            logits, gates = model(x, return_routing=True)
            objective = trades_loss(logits, logits_adv, y, obj.beta)
        else:  # pgdat: min CE(f(x_adv), y), no clean forward ("acc" is then the adversarial accuracy)
            logits, gates, objective = logits_adv, [], F.cross_entropy(logits_adv.float(), y)
    reg = routing_regularizer(gates + gates_adv, y, obj.balance, obj.supervision)
    stats = {"loss": objective.detach(), "acc": (logits.argmax(1) == y).float().mean(),
             "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    if obj.balance or obj.supervision:  # logged: e.g. whether the routers learn the class-mod-N targets
        stats["router_reg"] = reg.detach()
    return objective, reg, stats

def level(model: nn.Module, opt: torch.optim.Optimizer, x, y, obj: Objective, regularize: bool) -> dict:
    """One adversarial-training update of the parameters `opt` holds; the others stay fixed."""
    objective, reg, stats = robust_loss(model, x, y, obj)
    # L = L_TRADES(psi, phi; B), + R(phi) where the routers are the ones trained (regularize)
    loss = objective + reg if regularize else objective
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)  # gradients for this level's parameters only
    average_gradients(params)
    opt.step()
    return stats

# Eq. (1), the bi-level problem AdvMoE solves (psi: backbone and experts; phi: routers; D: the training set):
#     min_psi L_TRADES(psi, phi*(psi); D)   s.t.   phi*(psi) = argmin_phi L_TRADES(psi, phi; D)
# Algorithm 1 solves it by alternating optimization: one SGD step of each level per iteration, each against an
# attack regenerated for the model as it is then.
def advmoe_step(model: nn.Module, opts: dict, batches: list, obj: Objective) -> dict:
    """One iteration of Algorithm 1, lines 3-5."""
    # 3: draw two different random batches B_phi and B_psi (two independent shuffles: batch_streams)
    (x_phi, y_phi), (x_psi, y_psi) = batches
    # 4: lower level: with psi fixed, update phi by minimizing L_TRADES with a K-step PGD attack, SGD on B_phi
    router_stats = level(model, opts["phi"], x_phi, y_phi, obj, regularize=True)
    # 5: upper level: with phi fixed (= phi*, one SGD step here, not the argmin), update psi by minimizing
    #    L_TRADES with a K-step PGD attack regenerated against (psi, phi*), SGD on B_psi
    stats = level(model, opts["psi"], x_psi, y_psi, obj, regularize=False)
    return {**stats, "router_loss": router_stats["loss"]}

def joint_step(model: nn.Module, opts: dict, batches: list, obj: Objective) -> dict:
    """AT(Dense), AT(S-Dense), AT(MoE) (and AT(Sparse)'s score learning, natural training): min over every
    trained parameter of L_TRADES at once, one batch, one attack."""
    routers = any(g["name"] == "routers" for g in opts["all"].param_groups)
    return level(model, opts["all"], *batches[0], obj, regularize=routers)

# Every method: its step function and the number of batch streams it draws per iteration.
STEPS = {"advmoe": (advmoe_step, 2), "moe": (joint_step, 1), "sdense": (joint_step, 1),
         "dense": (joint_step, 1), "sparse": (joint_step, 1)}

def make_optimizers(model: nn.Module, s, device) -> dict[str, torch.optim.Optimizer]:
    """AdvMoE: one SGD for the routers phi and one for the backbone psi, same settings, one schedule (the
    paper: no new hyper-parameters; --router-lr scales phi's rate, deviation 7). Joint methods: one SGD over
    everything, or over phi or psi alone (--train-params, the Sec. 4 study)."""
    kw = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, fused=device.type == "cuda" or None)
    phi = {"params": router_params(model), "base_lr": s.lr * s.router_lr, "name": "routers"}
    psi = {"params": backbone_params(model), "base_lr": s.lr, "name": "backbone"}
    if s.method == "advmoe":
        return {"phi": torch.optim.SGD([phi], **kw), "psi": torch.optim.SGD([psi], **kw)}
    groups = {"all": [psi] + ([phi] if phi["params"] else []), "routers": [phi], "backbone": [psi]}
    return {"all": torch.optim.SGD(groups[s.train_params], **kw)}

def set_lr(opts: dict, progress: float):
    """The one schedule of every level: lr_t = lr_0 (1 + cos(pi t / T)) / 2, per iteration."""
    for opt in opts.values():
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * progress))

def batch_streams(data, s, epoch: int):
    """Alg. 1 line 3: each iteration's batches, one per stream of the method. AdvMoE's B_phi and B_psi come
    from two independent shuffles of the training set (deviation 6), each a function of the seed and epoch."""
    streams = range(STEPS[s.method][1])
    gens = [torch.Generator().manual_seed(s.seed * 1_000_003 + epoch * 7 + k) for k in streams]
    return zip(*(data.train_batches(s.batch_size, g) for g in gens))

# ==================================================================================================
# 5. Evaluation: SA, RA (PGD-50), stronger attacks, AutoAttack, routing statistics, router utility, GFLOPs
# ==================================================================================================
def adversaries(name: str, model: nn.Module, x, y, s, gates: list[Gate], steps: int,
                gen: torch.Generator | None = None, log=None) -> list[tuple[str, torch.Tensor]]:
    """The attacks of --eval-attacks, as (label, x_adv) pairs. Hard top-1 routing can hide gradients, so PGD
    through the straight-through routers may overstate robustness: "soft" is the same PGD with a surrogate
    gradient through routing, and Square is gradient-free (gradient masking cannot fool it)."""
    if name == "pgd":  # the paper's RA: CE through the straight-through routers
        return [(f"pgd{steps}", pgd(model, x, ce_objective(model, y), s.eps, s.test_step_size, steps,
                                    generator=gen))]
    if name == "soft":  # the hard forward; the backward through experts mixed by the router's probabilities
        return [("soft", pgd(model, x, ce_objective(model, y, "soft"), s.eps, s.test_step_size, steps,
                             generator=gen))] if gates else []
    if name == "square":
        attack = import_torchattacks().Square(model, norm="Linf", eps=s.eps, n_queries=s.square_queries,
                                              n_restarts=1, seed=s.seed)
        return [("square", attack(x, y).detach())]
    return autoattack(model, x, y, s.eps, s.seed, log)

def autoattack_settings(eps: float, n_classes: int) -> dict[str, tuple[str, dict]]:
    """Standard AutoAttack (Croce & Hein 2020) at its reference settings, name -> (torchattacks class, its
    arguments), in the order they run: APGD-CE and APGD-T (100 iterations), FAB-T (100 iterations), Square
    (5000 queries); one restart each, 9 target classes. NOTE(ours), deviation 9."""
    targeted = min(9, n_classes - 1) + 1  # torchattacks tries n_classes - 1 targets; the reference 9
    common = {"norm": "Linf", "eps": eps, "n_restarts": 1}
    return {"apgd-ce": ("APGD", {**common, "steps": 100, "loss": "ce", "rho": 0.75}),
            "apgd-t": ("APGDT", {**common, "steps": 100, "n_classes": targeted, "rho": 0.75}),
            "fab-t": ("FAB", {**common, "steps": 100, "multi_targeted": True, "n_classes": targeted}),
            "square": ("Square", {**common, "n_queries": 5000, "p_init": 0.8})}

def autoattack(model: nn.Module, x, y, eps: float, seed: int, log=None) -> list[tuple[str, torch.Tensor]]:
    """The components in order, as AutoAttack runs them: each attacks the inputs still classified correctly,
    and an input fooled once stays fooled. Returns the batch after each component and the final one."""
    ta, x_adv, found = import_torchattacks(), x.clone(), []
    with torch.no_grad():
        robust = model(x).argmax(1) == y                                         # (B,)
    for name, (cls, kw) in autoattack_settings(eps, n_classes(model)).items():

        idx = robust.nonzero().squeeze(1)
        if len(idx):
            adv = getattr(ta, cls)(model, seed=seed, **kw)(x[idx], y[idx]).detach()
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            x_adv[idx[fooled]], robust[idx[fooled]] = adv[fooled], False
        if log:
            log(f"    autoattack {name}: {int(robust.sum())} of {len(y)} robust")
        found.append((f"autoattack/{name}", x_adv.clone()))
    return found + [("autoattack", x_adv)]

def n_classes(model: nn.Module) -> int:
    return model.backbone.fc.out_features

def import_torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise ConfigError("--eval-attacks square/autoattack and --eval-aa need the optional package "
                          "torchattacks: pip install --no-deps torchattacks scipy") from None
    return torchattacks

def evaluate(model: nn.Module, data, s, steps: int | None = None, limit: int = 0, attacks=("pgd",),
             utility=None, split: str = "test", log=None) -> dict:
    """SA and RA in % (RA: PGD with `steps`, CE, uniform start, at the training eps), the RA of every other
    attack asked for (AutoAttack on the first --aa-n images, with PGD's RA on them beside it), RA-worst, and
    the routing statistics of the PGD attack (routing_summary); with `utility`, each input's pathway IoU with
    a Sparse mask (Fig. 6). Everything runs in float32: FAB and Square stop just past the decision boundary,
    and routing is an argmax, so a bf16 re-classification could flip them back."""
    steps, device = steps or s.test_steps, next(model.parameters()).device
    attacks = ("pgd",) + tuple(a for a in attacks if a != "pgd")
    # each attack draws its random starts from its own stream: adding one changes no other attack's RA
    gens = {a: torch.Generator(device).manual_seed(1000 * s.seed + 2 * EVAL_ATTACKS.index(a))
            for a in attacks}
    n, correct, tally, seen, worst, covered, worst_no_aa, pgd_on_aa = 0, 0, {}, {}, 0, 0, 0, 0
    kept: dict[str, list] = {k: [] for k in ("clean", "adv", "ok_adv", "ok", "iou_clean", "iou_adv")}
    progress = Progress(f"evaluating on {split}", data.eval_len(limit, split), log)
    with evaluating(model), torch.autocast(device.type, enabled=False):
        for x, y in data.test_batches(s.eval_batch_size, limit, split):
            with torch.no_grad():
                logits, gates = model(x, return_routing=True)
            ok = logits.argmax(1) == y                                             # (B,) correct when clean
            # RA-worst: input b counts if it is correct clean and under every attack, and every attack saw it
            survived, saw_all, survived_no_aa, ok_pgd = ok.clone(), torch.ones_like(ok), ok.clone(), ok
            for name in attacks:
                take = len(y) if name != "autoattack" or not s.aa_n else max(0, min(len(y), s.aa_n - n))
                saw_all[take:] = False
                if take == 0:
                    continue
                pgd_on_aa += int(ok_pgd[:take].sum()) if name == "autoattack" else 0
                found = adversaries(name, model, x[:take], y[:take], s, gates, steps, gens[name], log)
                for label, x_adv in found:
                    with torch.no_grad():
                        logits_adv, gates_adv = model(x_adv, return_routing=True)
                    ok_adv = logits_adv.argmax(1) == y[:take]                   # (take,) still correct
                    tally[label] = tally.get(label, 0) + int(ok_adv.sum())
                    seen[label] = seen.get(label, 0) + take
                    survived[:take] &= ok_adv
                    if name != "autoattack":
                        survived_no_aa &= ok_adv
                    if name == "pgd":
                        ok_pgd = ok_adv
                    if name == "pgd" and gates:  # each input's pathway (B, L), clean and under PGD
                        n_experts = gates[0].logits.shape[1]
                        kept["clean"].append(torch.stack([g.choice for g in gates], 1))
                        kept["adv"].append(torch.stack([g.choice for g in gates_adv], 1))
                        kept["ok_adv"].append(ok_adv), kept["ok"].append(ok)
                        if utility:
                            kept["iou_clean"].append(pathway_iou(gates, utility.tables))
                            kept["iou_adv"].append(pathway_iou(gates_adv, utility.tables))
                progress(n + take, lambda: f"({name} done on this batch)")
            n, correct = n + len(y), correct + int(ok.sum())
            worst, covered = worst + int((survived & saw_all).sum()), covered + int(saw_all.sum())
            worst_no_aa += int(survived_no_aa.sum())
    # RA_a = 100 * (inputs still correct under attack a) / (inputs attack a saw)
    ras = {label: round(100 * v / seen[label], 2) for label, v in tally.items()}
    result = {"sa": round(100 * correct / n, 2), "ra": ras[f"pgd{steps}"], "n": n, "attacks": ras,
              "attack": f"PGD-{steps} (CE, eps {s.eps:.5f}, step {s.test_step_size:.5f}, uniform start)",
              "attack_n": seen, "ra_worst": round(100 * worst / max(covered, 1), 2), "ra_worst_n": covered,
              "ra_worst_without_aa": round(100 * worst_no_aa / n, 2), "routing": {}}
    if "autoattack" in seen:
        result["autoattack"] = {
            "label": "AutoAttack (standard)", "images": seen["autoattack"],
            "ra_pgd_same_images": round(100 * pgd_on_aa / seen["autoattack"], 2),
            "components": [{"name": k, "attack": cls, "settings": kw, "ra_after": ras.get(f"autoattack/{k}")}
                           for k, (cls, kw) in autoattack_settings(s.eps, n_classes(model)).items()]}
    if kept["clean"]:
        result["routing"] = routing_summary(*(torch.cat(kept[k]) for k in ("clean", "adv", "ok_adv", "ok")),
                                            n_experts)
    if kept["iou_clean"]:
        result["router_utility"] = {"clean": iou_summary(torch.cat(kept["iou_clean"])),
                                    "adv": iou_summary(torch.cat(kept["iou_adv"])),
                                    "random_pathway": iou_summary(utility.chance)}
    return result

def routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts: int):
    """From each input's pathway (B, L), clean and under attack, and whether it is classified correctly under
    attack and clean (B,): inputs per expert per layer (L, N), clean and under attack; flips per layer (L,);
    the 4-way split's counts (4,) over the inputs correct when clean (one already wrong was not fooled)."""
    flipped = choice != choice_adv                                             # (B, L)
    fooled = flipped.any(1)                                                    # (B,) any layer's choice moved
    # Insight 2: (1) neither router nor prediction fooled, (2) router only, (3) prediction only, (4) both
    groups = torch.stack([~fooled & ok_adv, fooled & ok_adv, ~fooled & ~ok_adv, fooled & ~ok_adv]) & ok_clean
    usage, usage_adv = (F.one_hot(c, n_experts).sum(0) for c in (choice, choice_adv))   # (L, N) each
    return usage, usage_adv, flipped.sum(0), groups.sum(1)

def rounded(t: torch.Tensor, n: int = 1) -> list:
    """t / n as nested lists of numbers with 4 decimals (for JSON)."""
    return (t.double() / n).round(decimals=4).tolist()

def routing_summary(choice, choice_adv, ok_adv, ok_clean, n_experts: int) -> dict:
    """result["routing"]: expert usage per layer, clean and under PGD; how often PGD flips each layer's
    choice; the 4-way split in % of the split_n clean-correct inputs, router robustness = (1) + (3) and MoE
    robustness = (1) + (2); pathway diversity, clean and under PGD."""
    n, m = len(choice), max(int(ok_clean.sum()), 1)
    usage, usage_adv, flips, split = routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts)
    split = [100 * v / m for v in split.tolist()]                               # % of the clean-correct
    return {"usage_clean": rounded(usage, n), "usage_adv": rounded(usage_adv, n),
            "flip_rate_per_layer": rounded(flips, n),
            "flip_rate_any_layer": round((choice != choice_adv).any(1).float().mean().item(), 4),
            "split_4way": dict(zip(("neither", "router_only", "prediction_only", "both"),
                                   [round(v, 2) for v in split])),
            "split_n": int(ok_clean.sum()), "router_robustness": round(split[0] + split[2], 2),
            "moe_robustness": round(split[0] + split[1], 2),
            "pathways": {"clean": pathway_diversity(choice), "adv": pathway_diversity(choice_adv)}}

def pathway_diversity(choices: torch.Tensor) -> dict:
    """choices (n, L), each input's pathway: the number of distinct pathways and the entropy of their
    distribution in bits, H = sum_p q_p log2(1 / q_p) (0: one pathway for every input)."""
    _, counts = choices.unique(dim=0, return_counts=True)
    q = counts.double() / counts.sum()
    return {"distinct": len(counts), "entropy_bits": round((q * (1 / q).log2()).sum().item(), 3),
            "inputs": len(choices)}

def routing_snapshot(model: nn.Module, data, s, previous: dict | None = None, fresh: bool = False):
    """The routing of the model now, on the first 256 clean images of the validation split (of the test set
    without one): per MoE layer the top expert's share and the majority expert, the collapsed layers (one
    expert takes >= 95%), pathway diversity, and the layers whose majority changed since `previous`. None
    without routers. fresh (epoch 0): BatchNorm running statistics are not estimated yet, so a copy of the
    model normalizes with batch statistics, as the first training step will; later, eval mode."""
    split = "val" if data.eval_len(split="val") else "test"
    net, choices = copy.deepcopy(model).train() if fresh else model, []
    with (contextlib.nullcontext() if fresh else evaluating(net)), torch.no_grad():
        for x, _ in data.test_batches(s.eval_batch_size, 256, split):
            choices.append([g.choice for g in net(x, return_routing=True)[1]])
    if not choices[0]:
        return None
    choice = torch.cat([torch.stack(c, 1) for c in choices])                    # (n, L)
    # f_{l,k}: the share of the inputs layer l routes to expert k, (L, N)
    top, majority = F.one_hot(choice, int(choice.max()) + 1).float().mean(0).max(1)
    snap = {"split": split, "images": len(choice), "top_share": rounded(top),
            "majority": majority.tolist(), "collapsed": int((top >= 0.95).sum()),
            "pathways": pathway_diversity(choice)}
    if previous:
        snap["majority_changed"] = sum(a != b for a, b in zip(snap["majority"], previous["majority"]))
    return snap

class Utility(NamedTuple):
    """Router utility (Fig. 6): per MoE layer in forward order, the IoU of each expert's channels with the
    Sparse mask (N,); and the IoU that random pathways of the same sizes get (the chance level)."""
    tables: list[torch.Tensor]
    chance: torch.Tensor

def router_utility_tables(model: nn.Module, path: str, samples: int = 1000) -> Utility:
    """Fig. 6: the IoU of each expert's channels with the AT(Sparse) checkpoint's kept channels. With N*r = 1
    the N*c filters of a layer are the Dense layer's C channels, which the Sparse mask indexes; the two models
    are trained separately, so they correspond by channel position only (deviation 8)."""
    extra, wiring, gen = read_checkpoint(Path(path))["extra"], channel_wiring(model), torch.Generator()
    if "keep" not in extra:
        raise ConfigError(f"--iou-with {path} is not an AT(Sparse) run: give <sparse run>/checkpoint.pt")
    tables, chance = [], []
    for m in (m for m in model.modules() if isinstance(m, MoEConv) and m.n > 1):  # the order of the Gates
        group = wiring[m][1]
        size, keep = extra["sizes"].get(group), extra["keep"].get(group, ())
        if size != m.n * m.cout or len(keep) != m.cout:
            raise ConfigError(f"--iou-with {path} does not fit this model at layer {group} ({m.n} experts of "
                              f"{m.cout} channels; the Sparse run keeps {len(keep)} of {size}): give the "
                              f"Sparse run of the same backbone and r, with N*r = 1")
        kept = torch.zeros(size, dtype=torch.bool)
        kept[keep] = True
        inter = kept.view(m.n, m.cout).sum(1).float()                           # |E_e ∩ K|, (N,)
        # IoU(E_e, K) = |E_e ∩ K| / |E_e ∪ K|, with |E_e| = |K| = c
        tables.append((inter / (2 * m.cout - inter)).to(m.weight.device))
        # chance: `samples` random c-subsets of the N*c channels, the same IoU with K
        hits = kept[torch.rand(samples, size, generator=gen.manual_seed(len(tables))).argsort(1)[:, :m.cout]]
        chance.append(hits.sum(1).float() / (2 * m.cout - hits.sum(1).float()))
    if not tables:
        raise ConfigError("--iou-with measures an MoE-CNN's pathways: use it with --method moe, advmoe or "
                          "standard")
    return Utility(tables, torch.stack(chance).mean(0))

def pathway_iou(gates: list[Gate], tables: list[torch.Tensor]) -> torch.Tensor:
    """(B,): each input's IoU with the Sparse mask at its choices, averaged over the MoE layers."""
    return torch.stack([table[g.choice] for g, table in zip(gates, tables, strict=True)]).mean(0)

def iou_summary(iou: torch.Tensor) -> dict:
    """Mean and 10-bin histogram on [0, 1] of per-input IoUs."""
    return {"mean": round(iou.mean().item(), 4),
            "histogram": torch.histc(iou.float().cpu(), bins=10, min=0, max=1).int().tolist()}

def gflops_per_input(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one eval forward on the sparse path, counted by torch's FlopCounterMode on the ops that run
    (a multiply-add counts 2), per input: for an MoE-CNN the chosen pathway and the routers, nothing else."""
    from torch.utils.flop_counter import FlopCounterMode
    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, dispatch="sparse")
    return counter.get_total_flops() / len(x) / 1e9

# ==================================================================================================
# OPERATIONS. Everything below serves the method above: settings, data, the training loop, AT(Sparse)'s
# pruning, files, report, bench and the command line.
# ==================================================================================================
# 6. Settings
# ==================================================================================================
class ConfigError(ValueError):
    """Bad user input: the CLI prints it on one line and exits with status 2."""

class RunFailed(RuntimeError):
    """The run cannot go on (a file could not be written): one line, exit status 1."""

class Interrupted(Exception):
    """SIGINT / SIGTERM: one line saying what was kept, exit status 130."""

@dataclass
class Settings:
    """Every flag of a run. The comment above a field is its --help; a "# ---" line starts a group."""
    # --- what to train
    # cifar10 | cifar100 | tinyimagenet | imagenet | synthetic (offline, made on the fly)
    dataset: str = "cifar10"
    # resnet18 | wrn28_10 | vgg16 | densenet (DenseNet-BC-40, k = 12)
    arch: str = "resnet18"
    # dense | sdense | moe | advmoe | sparse: AT(Dense), AT(S-Dense), AT(MoE), AdvMoE, AT(Sparse) (HYDRA
    # channel pruning of an AT(Dense) model, then AT); with --loss natural, natural training of each
    method: str = "advmoe"
    # r in (0, 1]: an expert, and S-Dense, keeps r*C of a layer's C channels
    ratio: float = 0.5
    # N: experts per MoE layer
    n_experts: int = 2
    # W: base channel multiplier of every backbone (1: the paper's networks)
    width: float = 1.0
    # layer: a gate per MoE layer (the paper) | global: one image-level router (the authors' code)
    router: str = "layer"
    # one BatchNorm shared by a layer's experts (the authors' code) instead of one per expert (deviation 1)
    shared_bn: bool = False
    # routers read their pooled features standardized per input (deviation 2); --no-router-standardize: raw
    router_standardize: bool = True
    # checkpoint.pt whose weights start the run (sparse: the AT(Dense) run to prune)
    init: str = ""
    # all | routers | backbone: what a joint method trains (the Sec. 4 study, with --init)
    train_params: str = "all"
    # sparse: epochs of score learning before the --epochs of fine-tuning
    prune_epochs: int = 20
    # --- robust loss and attacks (eps and step sizes in pixel units of [0,1] images)
    # trades (CE + beta * KL) | pgdat (Madry: CE on PGD examples) | natural (CE, no attack)
    loss: str = "trades"
    # TRADES weight 1/lambda
    beta: float = 6.0
    # l_inf radius (default: 8/255 on CIFAR and synthetic, 2/255 on TinyImageNet and ImageNet)
    eps: float = None
    # K: PGD steps of the training attack
    train_steps: int = 2
    # training PGD step (default: 1.25*eps/K, the authors' 5/255 at eps 8/255 and K = 2)
    train_step_size: float = None
    # PGD steps of the final evaluation (RA)
    test_steps: int = 50
    # test PGD step (default: eps/4)
    test_step_size: float = None
    # --- routing regularizers (NOTE(ours): none in the paper, so 0 by default)
    # weight of the Switch balance term N * sum_k f_k P_k
    balance: float = 0.0
    # the routers' learning rate: lr * router_lr
    router_lr: float = 1.0
    # weight of CE(router logits, y mod N), the authors' router target (theirs: 6)
    router_supervision: float = 0.0
    # --- optimization (the authors' settings)
    # training epochs (an epoch is one pass of B_psi over the training set)
    epochs: int = 100
    # images per batch (each of B_phi and B_psi for advmoe)
    batch_size: int = 128
    # SGD learning rate, cosine-annealed per iteration to 0
    lr: float = 0.1
    # SGD momentum
    momentum: float = 0.9
    # SGD weight decay, on every parameter
    weight_decay: float = 0.0005
    # seed of the weights, the data order and the attacks' starts
    seed: int = 1
    # --- data
    # where data sets live: DATA_DIR/cifar10_{train,test}.npz, torchvision's copy (downloaded when missing),
    # or ImageFolder trees tiny-imagenet-200/ and imagenet/
    data_dir: str = "data"
    # train on a fixed random subset of this many training images (0: all)
    train_n: int = 0
    # hold this many training images out for validation (choose settings there, not on the test set)
    val_n: int = 0
    # --- evaluation
    # test images of the final evaluation (0: all)
    eval_n: int = 0
    # comma-separated: pgd (the paper's RA) | soft (PGD with a surrogate gradient through routing) | square |
    # autoattack (both need torchattacks); RA-worst counts an image robust only under all of them
    eval_attacks: str = "pgd"
    # also AutoAttack (standard), for Table 2's RA-AA
    eval_aa: bool = False
    # images for AutoAttack, the first ones of the evaluation (0: all)
    aa_n: int = 0
    # router utility (Fig. 6): pathway IoU with this AT(Sparse) checkpoint.pt (needs N*r = 1)
    iou_with: str = ""
    # images of the per-epoch SA / RA (PGD-10) check, on the validation split when there is one (0: none)
    quick_eval_n: int = 500
    # queries of the Square attack
    square_queries: int = 5000
    # batch size of evaluation and attacks
    eval_batch_size: int = 256
    # --- the run
    # run folder (result.json, checkpoint.pt, log.jsonl; default: runs/<name>)
    out: str = ""
    # continue the run in --out from its last checkpoint (--epochs may grow)
    resume: bool = False
    # replace the run in --out
    overwrite: bool = False
    # evaluate this checkpoint.pt instead of training
    eval_only: str = ""
    # auto | cpu | cuda | cuda:K
    device: str = "auto"
    # bf16 autocast in training on CUDA
    amp: bool = True
    # torch.compile the training forwards (on CUDA one graph, replayed as CUDA graphs)
    compile: bool = False

    def __post_init__(self):
        """A bad value is a one-line ConfigError naming the flag and the fix. eps and the step sizes left out
        are derived here, so a Settings object always holds numbers."""
        choices = {"dataset": DATASETS, "arch": ARCHS, "method": METHODS,
                   "loss": ("trades", "pgdat", "natural"), "router": ("layer", "global"),
                   "train_params": ("all", "routers", "backbone")}
        for name, allowed in [*choices.items(), ("eval_attacks", EVAL_ATTACKS)]:
            given = getattr(self, name)
            if any(v not in allowed for v in (given.split(",") if name == "eval_attacks" else [given])):
                raise ConfigError(f"unknown {flag(name)} {given!r}: choose from {', '.join(allowed)}")
        if self.eps is None:
            self.eps = 2 / 255 if self.dataset in ("tinyimagenet", "imagenet") else 8 / 255
        if not (math.isfinite(self.eps) and 0 <= self.eps <= 1):
            raise ConfigError(f"--eps {self.eps} is not a radius in pixel units of [0,1] images: e.g. 0.0314")
        if self.train_step_size is None:
            # NOTE(official code): their training step, 5/255 at eps 8/255 and K = 2 (the paper gives none),
            # scaled with eps and K. 2.5 eps / K would throw TRADES' start to a corner of the box in one step.
            self.train_step_size = 1.25 * self.eps / self.train_steps if self.train_steps > 0 else 0.0
        self.test_step_size = self.eps / 4 if self.test_step_size is None else self.test_step_size
        rules = ((lambda v: v >= 1, "n_experts train_steps test_steps square_queries epochs batch_size "
                                    "eval_batch_size", "must be at least 1"),
                 (lambda v: v >= 0, "eval_n quick_eval_n aa_n prune_epochs train_n val_n", "must be >= 0"),
                 (lambda v: math.isfinite(v) and v >= 0, "lr momentum weight_decay beta balance router_lr "
                  "router_supervision train_step_size test_step_size", "must be a finite number >= 0"),
                 (lambda v: 0 < v <= 1, "ratio", "is outside (0, 1]: an expert keeps r of the channels"),
                 (lambda v: 0 < v <= 64, "width", "must be in (0, 64]: the backbone's channel multiplier"))
        for ok, names, must in rules:
            for name in names.split():
                if not ok(getattr(self, name)):
                    raise ConfigError(f"{flag(name)} {getattr(self, name)} {must}")
        if self.method in MOE_METHODS and self.n_experts < 2:
            raise ConfigError(f"--method {self.method} needs --n-experts 2 or more (one: --method sdense)")
        if self.method == "sparse" and self.ratio == 1:
            raise ConfigError("--method sparse keeps a fraction --ratio of the channels: give one below 1")
        if self.train_params != "all" and (self.method != "moe" or not self.init):
            raise ConfigError(f"--train-params {self.train_params} freezes part of an MoE-CNN: use it with "
                              f"--method moe and --init CKPT")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: give one of them")
        if {"square", "autoattack"} & set(self.attacks):
            import_torchattacks()  # fail now, not after training

    @property
    def attacks(self) -> tuple[str, ...]:
        """The attacks of the final evaluation, each once: --eval-attacks, and AutoAttack with --eval-aa."""
        return tuple(dict.fromkeys(self.eval_attacks.split(",") + ["autoattack"] * self.eval_aa))

    @property
    def model_ratio(self) -> float:  # the model a method trains (AT(Sparse) ends in S-Dense's shape)
        return 1.0 if self.method == "dense" else self.ratio

    @property
    def model_experts(self) -> int:
        return self.n_experts if self.method in MOE_METHODS else 1

    @property
    def objective(self) -> Objective:
        """What the method's functions read of these settings (section 4)."""
        return Objective(self.loss, self.beta, self.eps,
                         self.train_step_size, self.train_steps, self.balance, self.router_supervision)

    @property
    def name(self) -> str:
        return (f"{self.dataset}_{self.arch}_{self.method}_r{self.model_ratio:g}_n{self.model_experts}"
                f"_s{self.seed}")

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad type or an unknown flag: one line, like every other error
        raise ConfigError(f"{message} (python advmoe.py --help lists the flags)")

@functools.cache  # built from Settings' source once (argparse parsers keep no state between parse_args calls)
def settings_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The flags of Settings, grouped, with each field's comment as its help; defaults=False leaves out of
    the parsed namespace what was not given."""
    parser = Parser(usage="python advmoe.py [flags] | report DIR | bench [flags] | estimate BENCH.json [N]",
                    description="AdvMoE: robust training of MoE-CNNs (ICCV 2023). Train and evaluate one "
                                "model (the flags below), or: 'report DIR' (every table from the result.json "
                                "files below DIR), 'bench --help' (speed, cost), 'estimate' (a grid's time).",
                    argument_default=None if defaults else argparse.SUPPRESS)
    types, group, text = {"str": str, "int": int, "float": float}, parser, []
    for line in (line.strip() for line in inspect.getsource(Settings).splitlines()):
        if line.startswith("# ---"):
            group = parser.add_argument_group(line[5:].strip())
        elif line.startswith("#"):
            text.append(line[2:])
        elif (name := line.split(":")[0]) in Settings.__dataclass_fields__:
            f, kind = Settings.__dataclass_fields__[name], line.split(":")[1].split("=")[0].strip()
            kw = {"action": argparse.BooleanOptionalAction} if kind == "bool" else {"type": types[kind]}
            shown = f" (default: {f.default})" if kind != "bool" and f.default not in (None, "") else ""
            group.add_argument(flag(name), default=f.default if defaults else argparse.SUPPRESS,
                               help=" ".join(text) + shown, **kw)
            text = []
    return parser

def parse_settings(argv: list[str]) -> Settings:
    return Settings(**vars(settings_parser().parse_args(argv)))

# ==================================================================================================
# 7. Data: inputs in [0,1]; CIFAR-size sets kept on the device as uint8 with batched augmentation
# ==================================================================================================
class TensorData:
    """A data set held as uint8 tensors (B, 3, H, W) on the device (on a GPU: no loader processes, no host
    copies), augmented a whole batch at a time. shard = (rank, world size) under torchrun."""

    def __init__(self, train: tuple, test: tuple, val: tuple, num_classes: int, device, shard=(0, 1)):
        splits = zip(("train", "test", "val"), (train, test, val))
        self.splits = {k: tuple(t.to(device) for t in v) for k, v in splits}
        self.num_classes, self.image_size, self.device = num_classes, train[0].shape[-1], device
        self.shard = shard

    def train_batches(self, batch_size: int, gen: torch.Generator):
        """One shuffled epoch, its randomness (order, crop offsets, flips) drawn at once from `gen`. Every
        process draws the same shuffle and takes its own part; the last partial batch is dropped."""
        (x, y), pad = self.splits["train"], 4
        perm = torch.randperm(len(y), generator=gen)
        shifts = torch.randint(0, 2 * pad + 1, (len(y), 2), generator=gen)  # crop offsets, padded image
        flips = torch.rand(len(y), generator=gen) < 0.5
        perm, shifts, flips = (t.to(self.device) for t in (own_part(perm, self.shard), shifts, flips))
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield augment(x[idx], shifts[idx], flips[idx], pad), y[idx]

    def test_batches(self, batch_size: int, limit: int = 0, split: str = "test"):
        """The first `limit` images (0: all) of the test set or of the validation split, in order."""
        (x, y), n = self.splits[split], self.eval_len(limit, split)
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)].float() / 255, y[i:min(i + batch_size, n)]

    def eval_len(self, limit: int = 0, split: str = "test") -> int:
        return min(limit or len(self.splits[split][1]), len(self.splits[split][1]))

    def train_len(self, batch_size: int) -> int:  # batches per epoch and process
        return len(self.splits["train"][1]) // self.shard[1] // batch_size

def own_part(perm: torch.Tensor, shard: tuple) -> torch.Tensor:
    """This process's part of a shuffle: every process takes as many images (an extra batch would wait forever
    in its all-reduce)."""
    return perm[:len(perm) - len(perm) % shard[1]][shard[0]::shard[1]]

def augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip of a uint8 batch, in one gather."""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))                                        # (B, C, H+2p, W+2p)
    rows = shifts[:, 0, None] + torch.arange(h, device=x.device)              # (B, H)
    cols = shifts[:, 1, None] + torch.arange(w, device=x.device)              # (B, W)
    # a flip reads the columns backwards
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bi, ci = torch.arange(b, device=x.device), torch.arange(c, device=x.device)
    x = x[bi[:, None, None, None], ci[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return x.float() / 255                                                    # (B, C, H, W)

class FolderData(TensorData):
    """TinyImageNet / ImageNet from ImageFolder trees DATA_DIR/<name>/{train,val}/<class>/<image>, read by a
    DataLoader behind the same interface."""

    def __init__(self, root: Path, image_size: int, device, train_n: int, val_n: int, shard: tuple):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        big = image_size >= 128  # the ImageNet recipe; TinyImageNet (64 px) is augmented as CIFAR is
        train_tf = T.Compose([T.RandomResizedCrop(image_size) if big else T.RandomCrop(image_size, padding=4),
                              T.RandomHorizontalFlip(), T.ToTensor()])
        test_tf = T.Compose([T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor()]) if big \
            else T.ToTensor()
        train = ImageFolder(str(root / "train"), train_tf)
        keep, held = split_train(len(train), train_n, val_n)
        held_out = copy.copy(train)  # the validation images: the same file list, read as test images
        held_out.transform = test_tf
        self.splits = {"train": Subset(train, keep.tolist()), "val": Subset(held_out, held.tolist()),
                       "test": ImageFolder(str(root / "val"), test_tf)}
        self.num_classes, self.image_size, self.device = len(train.classes), image_size, device
        self.shard = shard

    def loader(self, dataset, batch_size: int, order=None):
        return DataLoader(dataset, batch_size, sampler=order, drop_last=order is not None, num_workers=8,
                          pin_memory=self.device.type == "cuda")

    def train_batches(self, batch_size, gen):
        order = own_part(torch.randperm(len(self.splits["train"]), generator=gen), self.shard).tolist()
        for x, y in self.loader(self.splits["train"], batch_size, order):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def test_batches(self, batch_size, limit=0, split="test"):
        for x, y in self.loader(Subset(self.splits[split], range(self.eval_len(limit, split))), batch_size):
            yield x.to(self.device), y.to(self.device)

    def eval_len(self, limit=0, split="test"):
        return min(limit or len(self.splits[split]), len(self.splits[split]))

    def train_len(self, batch_size):
        return len(self.splits["train"]) // self.shard[1] // batch_size

SYNTHETIC = (2048, 512)  # training and test images of the synthetic set (--train-n and --eval-n take fewer)

def synthetic_data(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0):
    """An offline, learnable CIFAR-shaped set: each class a smooth random colour pattern, each image that
    pattern plus a smooth per-image nuisance and pixel noise. Classes differ by far more than 8/255, so a
    robust classifier exists; the nuisance keeps it from being trivial."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        nuisance = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
        x = 0.6 * protos[y] + 0.3 * nuisance + 0.1 * torch.rand(n, 3, 32, 32, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return draw(n_train), draw(n_test)

def load_cifar(name: str, root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-10/100 as uint8 (B, 3, 32, 32): DATA_DIR/<name>_{train,test}.npz when present (x: uint8 NHWC,
    y), else torchvision's copy, downloaded when missing (offline: a one-line error, no folder left)."""
    npz = [root / f"{name}_{split}.npz" for split in ("train", "test")]
    if any(p.exists() for p in npz):
        (x, y), test = (read_npz(p, 100 if name == "cifar100" else 10) for p in npz)
        if x.shape[1:] != test[0].shape[1:]:
            raise ConfigError(f"{npz[1]} holds {tuple(test[0].shape[1:])} images, {npz[0]} "
                              f"{tuple(x.shape[1:])}: give both splits the same image size")
        return (x, y), test
    from torchvision.datasets import CIFAR10, CIFAR100
    # the topmost folder of root that is not there yet: removed again if the download fails
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    try:
        cls = CIFAR10 if name == "cifar10" else CIFAR100
        sets = [cls(str(root), train, download=True) for train in (True, False)]
    except Exception as e:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise ConfigError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}): run "
                          f"once online, or put {name}_train.npz and {name}_test.npz in --data-dir") from None
    return [(torch.from_numpy(d.data).permute(0, 3, 1, 2).contiguous(),  # (n, H, W, 3) -> (n, 3, H, W) uint8
             torch.tensor(d.targets)) for d in sets]

def read_npz(path: Path, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DATA_DIR/<name>_<split>.npz, checked: x uint8 (N, H, W, 3), y N integer labels in [0, classes)."""
    import numpy as np
    must = f"it must hold x: uint8 images (N, H, W, 3) and y: N integer labels in [0, {classes})"
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing (its other split is there): {must}") from None
    except Exception as e:  # not a zip, truncated, no x or y
        raise ConfigError(f"{path} cannot be read as an .npz of x and y ({type(e).__name__}): {must}") \
            from None
    if x.dtype != np.uint8 or x.shape[3:] != (3,) or y.shape != x.shape[:1] or y.dtype.kind not in "iu" or \
            not len(y) or y.min() < 0 or y.max() >= classes:
        raise ConfigError(f"{path} holds x {x.dtype} {x.shape} and y {y.dtype} {y.shape}: {must}")
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y).long()

SPLIT_SEED = 0  # the --train-n subset and the --val-n split: the same images for every run and seed

def split_train(n: int, train_n: int, val_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the training subset and of the disjoint validation split: the first val_n of a fixed
    permutation, then the next train_n (or all the rest)."""
    if val_n >= n or train_n + val_n > n:
        raise ConfigError(f"--train-n {train_n} plus --val-n {val_n} exceed the {n} training images: "
                          f"lower them")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train = perm[val_n:val_n + train_n] if train_n else perm[val_n:]
    return train.sort().values, perm[:val_n].sort().values

def load_data(s: Settings, device, shard: tuple = (0, 1)):
    root = Path(s.data_dir)
    if s.dataset in ("tinyimagenet", "imagenet"):
        folder = root / ("tiny-imagenet-200" if s.dataset == "tinyimagenet" else "imagenet")
        if not (folder / "train").is_dir() or not (folder / "val").is_dir():
            raise ConfigError(f"{s.dataset} needs ImageFolder trees {folder}/train/<class>/ and "
                              f"{folder}/val/<class>/ (TinyImageNet's val images in a folder per class)")
        size = 64 if s.dataset == "tinyimagenet" else 224
        return FolderData(folder, size, device, s.train_n, s.val_n, shard)
    (x, y), test = synthetic_data(*SYNTHETIC) if s.dataset == "synthetic" else load_cifar(s.dataset, root)
    keep, held = split_train(len(y), s.train_n, s.val_n)
    return TensorData((x[keep], y[keep]), test, (x[held], y[held]), 100 if s.dataset == "cifar100" else 10,
                      device, shard)

# ==================================================================================================
# 8. The training loop: train, epochs, progress lines, signals; data parallelism under torchrun
# ==================================================================================================
def build_model(s: Settings, num_classes: int, image_size: int) -> MoECNN:
    return MoECNN(s.arch, num_classes, image_size, s.model_ratio, s.model_experts, s.router,
                  MEAN_STD[s.dataset], s.width, s.shared_bn, s.router_standardize)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with contextlib.suppress(RuntimeError):
        device = torch.device(name)
        if device.type == "cpu" or device.type == "cuda" and (device.index or 0) < torch.cuda.device_count():
            return device
    raise ConfigError(f"--device {name} is not a device torch sees here: use cpu, or cuda / cuda:K on a GPU")

def compiled(model: nn.Module, s: Settings, device) -> nn.Module:
    """--compile: the training forwards through torch.compile. On CUDA the masked dispatch has static shapes
    and no host read, so the whole forward is one graph, replayed as CUDA graphs ("reduce-overhead")."""
    cuda = device.type == "cuda"
    return torch.compile(model, fullgraph=cuda, mode="reduce-overhead" if cuda else None) if s.compile \
        else model

def train(s: Settings, log: Callable[[str], None] = print) -> dict | None:
    """Train one model, evaluate it, write <out>/result.json and return it. Under torchrun every process
    trains on its part of each batch stream; rank 0 logs, checkpoints and evaluates (the others: None)."""
    rank, world, device = distributed(s)
    log, out = (log if rank == 0 else (lambda _: None)), Path(s.out or f"runs/{s.name}")
    with run_folder(out, s, rank == 0), stop_on_signals() as stop:
        torch.manual_seed(s.seed)
        data = load_data(s, device, (rank, world))
        model = build_model(s, data.num_classes, data.image_size).to(device)
        opts = make_optimizers(model, s, device)
        if s.iou_with:  # fail now, not after training
            router_utility_tables(model, s.iou_with)
        if data.train_len(s.batch_size) == 0:
            raise ConfigError(f"--batch-size {s.batch_size} is larger than the training set: lower it")
        start, history, seconds, extra = starting_point(out, model, opts, s, rank, log)
        if s.method == "sparse" and start == 0:  # AT(Sparse): prune, then fine-tune below
            t0 = time.perf_counter()
            state, extra = prune(s, data, device, stop, log)
            model.load_state_dict(state)
            seconds += time.perf_counter() - t0
        rows = []  # log.jsonl rows, written with the next checkpoint: before it, the folder holds nothing
        if start == 0 and rank == 0 and (routing := routing_snapshot(model, data, s, fresh=True)):
            extra, rows = {**extra, "routing_epoch0": routing}, [{"epoch": 0, "routing": routing}]
            log(format_routing(routing, "epoch 0 (before training): routing"))
        sync_model(model)
        net = compiled(model, s, device)  # checkpoints and evaluation use the module itself
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, **train_epoch(net, opts, data, s, epoch, device, stop, log)}
            sync_model(model)  # rank 0's BatchNorm statistics everywhere
            seconds += time.perf_counter() - t0
            # the learning rate each parameter group ended the epoch with
            lrs = {f"lr_{g['name']}": round(g["lr"], 6) for o in opts.values() for g in o.param_groups}
            row.update(seconds=round(time.perf_counter() - t0, 2), **lrs)
            if rank:
                continue
            split = "val" if data.eval_len(split="val") else "test"  # settings are chosen there
            if s.quick_eval_n and epoch + 1 < s.epochs:
                quick = evaluate(model, data, s, steps=10, limit=s.quick_eval_n, split=split)
                row.update(sa=quick["sa"], ra_pgd10=quick["ra"], quick_split=split)
            previous = history[-1].get("routing") if history else extra.get("routing_epoch0")
            if routing := routing_snapshot(model, data, s, previous):
                row["routing"] = routing
            history.append(row)
            log(format_row(row, s))
            save_checkpoint(out / "checkpoint.pt", model, opts, s, epoch + 1, history, seconds, extra)
            for r in rows + [row]:
                append_jsonl(out / "log.jsonl", r)
            rows = []
        if rank:
            return None
        info = {"world_size": world, "routing_epoch0": extra.get("routing_epoch0")}
        if s.method == "sparse":
            info["sparse"] = {"init": s.init or None, "kept": {g: len(v) for g, v in extra["keep"].items()},
                              "prune_history": extra["prune_history"]}
        try:
            return finish(model, data, s, out, history, seconds, device, log, info)
        except KeyboardInterrupt:
            raise Interrupted("interrupted in the final evaluation: the trained checkpoint is kept; --resume "
                              "evaluates it again") from None

def train_epoch(net: nn.Module, opts: dict, data, s: Settings, epoch: int, device, stop: list, log) -> dict:
    """One epoch of the method's step; returns the epoch's mean statistics (one host sync, at the end)."""
    (step, streams), iters = STEPS[s.method], data.train_len(s.batch_size)
    net.train()
    freeze_batchnorm(net, s.train_params)
    sums, bad_step = {}, torch.full((), -1, device=device)
    progress = Progress(f"epoch {epoch + 1}/{s.epochs}", iters * s.batch_size * streams, log)
    for it, batches in enumerate(batch_streams(data, s, epoch)):
        set_lr(opts, (epoch * iters + it) / (s.epochs * iters))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.amp and device.type == "cuda"):
            stats = step(net, opts, batches, s.objective)
        sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
        # the first non-finite step of either level, remembered without a host sync
        finite = torch.isfinite(stats["loss"]) & torch.isfinite(stats.get("router_loss", stats["loss"]))
        bad_step = torch.where((bad_step < 0) & ~finite, it, bad_step)
        progress((it + 1) * s.batch_size * streams, lambda: f"loss {sums['loss'].item() / (it + 1):.4f}")
        if stop:
            kept = f"the checkpoint of epoch {epoch} is kept: continue with --resume" if epoch else \
                "no epoch had finished, so nothing was kept: run the command again"
            raise Interrupted(f"interrupted by {stop[0]} in epoch {epoch + 1}: {kept}")
    if bad_step.item() >= 0:
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, iteration {bad_step.item() + 1} "
                                 f"(the last checkpoint is kept): lower --lr or check the data")
    return {k: round(v.item() / (it + 1), 4) for k, v in sums.items()}

def freeze_batchnorm(model: nn.Module, train_params: str):
    """--train-params: the frozen part's BatchNorms normalize with their running statistics and keep them
    (eval mode; an MoEConv's mode selects its BatchNorm's statistics)."""
    for name, m in model.named_modules():
        if train_params != "all" and isinstance(m, (nn.BatchNorm2d, MoEConv)) and \
                ("router" in name) == (train_params == "backbone"):
            m.eval()

PROGRESS_SECONDS = 30.0  # at least this long between two progress lines of training, evaluation, attacks

class Progress:
    """A progress line every PROGRESS_SECONDS or more: what, done / total images, images per second, ETA."""

    def __init__(self, what: str, total: int, log):
        self.what, self.total, self.log, self.start = what, total, log, time.perf_counter()
        self.last = self.start

    def __call__(self, done: int, details: Callable[[], str] = str):
        now = time.perf_counter()
        if self.log and now - self.last >= PROGRESS_SECONDS:
            self.last, rate = now, done / max(now - self.start, 1e-9)
            self.log(f"  {self.what}: {done}/{self.total} images, {rate:.1f} img/s, ETA "
                     f"{(self.total - done) / max(rate, 1e-9):.0f} s {details()}".rstrip())

def format_row(row: dict, s: Settings) -> str:
    text = f"epoch {row['epoch']}/{s.epochs} loss {row['loss']:.4f} acc {100 * row['acc']:.1f} acc_adv " \
           f"{100 * row['acc_adv']:.1f}"
    text += "".join(f" {k} {row[k]:.4f}" for k in ("router_loss", "router_reg") if k in row)
    text += f" | SA {row['sa']:.2f} RA(PGD-10) {row['ra_pgd10']:.2f}" if "sa" in row else ""
    text += format_routing(row["routing"], " | routing") if "routing" in row else ""
    return text + f" | {row['seconds']:.1f}s"

def format_routing(r: dict, what: str) -> str:
    shares, moved = sorted(r["top_share"]), r.get("majority_changed")
    return f"{what}: collapsed {r['collapsed']}/{len(shares)}" + \
        (f", majority changed in {moved}" if moved is not None else "") + \
        f", top-expert share min {shares[0]:.2f} median {shares[len(shares) // 2]:.2f} max {shares[-1]:.2f}"

@contextlib.contextmanager
def stop_on_signals():
    """SIGINT / SIGTERM end training after the current iteration; the previous handlers come back after."""
    stop, previous = [], {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (a notebook worker)
            previous[sig] = signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

# Data parallelism (torchrun): every process draws the same shuffles and trains on its own part (own_part);
# each level's gradients are averaged with one all-reduce (deviation 10).
def distributed(s: Settings) -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the process group when started by torchrun (NCCL on CUDA with one
    GPU per process, gloo on the CPU)."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), resolve_device(s.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device

def average_gradients(params: list[nn.Parameter]):
    """The mean gradient over processes, one flat all-reduce (a parameter a process did not reach counts as a
    zero gradient there, so no process waits for it)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / dist.get_world_size()).split([p.numel() for p in params])):
            p.grad = g.view_as(p)

def sync_model(model: nn.Module):
    """Every process takes rank 0's parameters and buffers (BatchNorm running statistics)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=0)

# ==================================================================================================
# 9. AT(Sparse): robustness-aware channel pruning of a Dense network (HYDRA, for channels)
# ==================================================================================================
def channel_wiring(model: MoECNN) -> dict[nn.Module, tuple[tuple, str]]:
    """For every layer that reads or writes the pathway's channels: (the channel groups its input
    concatenates, the group it writes). Layers whose outputs are summed (a residual stream) write one group,
    so they keep the same channels (deviation 8); a DenseNet layer reads every group before it."""
    net, wire = model.backbone, {}
    if isinstance(net, (ResNet18, WideResNet)):
        # the current residual stream: ResNet's stem feeds identity blocks (it writes "stage1" with them);
        # WRN's first block projects (its stem writes "stem" alone). A projection starts the next stream.
        stage = int(net.blocks[0].shortcut is None)
        stream = "stage1" if stage else "stem"
        wire[net.stem.conv] = ((), stream)
        for i, block in enumerate(net.blocks, 1):
            stage += block.shortcut is not None
            mid, out = f"block{i}_mid", f"stage{stage}"
            if isinstance(block, WideBlock):
                wire[block.bn1] = ((stream,), "")
            wire[block.conv1], wire[block.conv2] = ((stream,), mid), ((mid,), out)
            if block.shortcut is not None:
                wire[block.shortcut] = ((stream,), out)
            stream = out
        groups = (stream,)
    elif isinstance(net, VGG16):
        convs = [net.stem.conv] + [m for m in net.layers if isinstance(m, MoEConv)]
        for k, conv in enumerate(convs, 1):
            wire[conv] = ((f"conv{k - 1}",) if k > 1 else (), f"conv{k}")
        groups = (f"conv{len(convs)}",)
    else:  # DenseNet: layer k reads every group before it and appends its own; a transition starts anew
        wire[net.stem.conv], groups, transitions = ((), "stem"), ("stem",), 0
        for k, layer in enumerate(net.layers, 1):
            if isinstance(layer, DenseLayer):
                wire[layer.bn], wire[layer.conv1] = (groups, ""), (groups, f"layer{k}_mid")
                wire[layer.conv2], groups = ((f"layer{k}_mid",), f"layer{k}"), groups + (f"layer{k}",)
            else:
                transitions += 1
                name = f"transition{transitions}"
                wire[layer["bn"]], wire[layer["conv"]], groups = (groups, ""), (groups, name), (name,)
    if isinstance(net, (WideResNet, DenseNet)):
        wire[net.bn] = (groups, "")
    wire[net.fc] = (groups, "")
    return wire

def channel_groups(model: MoECNN) -> dict[str, int]:
    """Every channel group (see channel_wiring) and its number of channels."""
    wire = channel_wiring(model)
    return {wire[m][1]: m.weight.shape[0] for m in model.modules() if isinstance(m, MoEConv)}

def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k highest scores, 0 elsewhere; straight-through, d mask / d scores = identity (HYDRA)."""
    return torch.zeros_like(scores).scatter_(0, scores.topk(k).indices, 1.0) + (scores - scores.detach())

class ChannelScores(nn.Module):
    """A Dense network whose channels are kept by learned scores, one per channel of every group: its forward
    is the Dense network with each group's top r*C channels kept and the others zeroed where they are read.
    The scores alone are trained; the Dense weights stay frozen (its BatchNorm statistics follow)."""

    def __init__(self, dense: MoECNN, ratio: float):
        super().__init__()
        self.dense, self.spec, self.wiring = dense, Spec(ratio), channel_wiring(dense)
        # HYDRA starts from the weights: s_g[c] = sum over the convs writing group g of ||W[c]||_2, / its max
        norms: dict[str, torch.Tensor] = {}
        for m in dense.modules():
            if isinstance(m, MoEConv):
                group = self.wiring[m][1]
                norms[group] = norms.get(group, 0) + m.weight.detach().flatten(1).norm(dim=1)
        self.scores = nn.ParameterDict({g: nn.Parameter(v / v.max()) for g, v in norms.items()})

    def keep(self) -> dict[str, torch.Tensor]:
        """The channels each group keeps (sorted indices): its top r*C scores."""
        return {g: v.detach().topk(self.spec.width(len(v))).indices.sort().values
                for g, v in self.scores.items()}

    def forward(self, x, return_routing: bool = False, dispatch: str = "auto"):
        # m_g = 1[c in the top r*C_g of s_g] + s_g - sg(s_g), (C_g,) per group
        masks = {g: top_k_mask(v, self.spec.width(len(v))) for g, v in self.scores.items()}

        def zero_pruned(layer, args):  # x -> x * m: the input channels `layer` does not keep are zeroed
            m = torch.cat([masks[g] for g in self.wiring[layer][0]]).to(args[0].dtype)      # (C_in,)
            return (args[0] * m.view(1, -1, *([1] * (args[0].dim() - 2))),) + args[1:]
        # every conv and the classifier see their inputs masked, for this forward only (a BatchNorm is per
        # channel): the Dense network computes what the pruned network computes
        hooks = [m.register_forward_pre_hook(zero_pruned) for m, (reads, _) in self.wiring.items()
                 if reads and not isinstance(m, nn.BatchNorm2d)]
        try:
            return self.dense(x, return_routing, dispatch)
        finally:
            for h in hooks:
                h.remove()

def extract_sparse(dense: MoECNN, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruned network as a state dict of S-Dense's shape: each layer's kept output channels (rows) and
    kept input channels (columns). Pruned channels are removed, not masked, so what executes is r*C wide;
    its outputs equal the masked Dense network's."""
    sizes, wiring = channel_groups(dense), channel_wiring(dense)

    def kept(groups: tuple) -> torch.Tensor:  # the kept channels of a concatenation of groups, in its indices
        offsets = [0] + torch.tensor([sizes[g] for g in groups]).cumsum(0).tolist()
        return torch.cat([keep[g].to(dense.mean.device) + o for g, o in zip(groups, offsets)])

    def bn_rows(bn: nn.BatchNorm2d, rows: torch.Tensor, prefix: str) -> dict:  # a BatchNorm's kept channels
        return {prefix + k: (v[rows] if v.dim() else v) for k, v in bn.state_dict().items()}

    state = {"mean": dense.mean, "std": dense.std}
    for name, m in dense.named_modules():
        if m not in wiring:
            continue
        (reads, writes), prefix = wiring[m], name + "."
        if isinstance(m, MoEConv):
            rows = kept((writes,))
            cols = kept(reads) if reads else torch.arange(3, device=rows.device)  # the stem reads RGB
            # W_sparse = W[kept rows][:, kept columns], (r*C_out, r*C_in, k, k)
            state[prefix + "weight"] = m.weight[rows][:, cols]
            state.update(bn_rows(m.bn, rows, prefix + "bn.") if m.bn is not None else {})
        elif isinstance(m, nn.BatchNorm2d):  # a pre-activation BatchNorm on the pathway
            state.update(bn_rows(m, kept(reads), prefix))
        else:  # the classifier
            state.update({prefix + "weight": m.weight[:, kept(reads)], prefix + "bias": m.bias})
    return {k: v.detach().clone() for k, v in state.items()}

def prune(s: Settings, data, device, stop: list, log) -> tuple[dict, dict]:
    """AT(Sparse), phase 1: learn channel scores of the (--init) Dense network with the training loss for
    --prune-epochs, its weights frozen; keep every group's top r*C channels. Returns the pruned S-Dense-shaped
    state dict and the mask (kept channels, group sizes, this phase's log). Phase 2, fine-tuning with the mask
    fixed, is the ordinary training loop."""
    dense = MoECNN(s.arch, data.num_classes, data.image_size, mean_std=MEAN_STD[s.dataset], width=s.width)
    dense = dense.to(device)
    if s.init:
        ckpt = read_checkpoint(Path(s.init))
        load_weights(dense, ckpt["model"], s.init, {"dataset": s.dataset, "arch": s.arch, "method": "dense",
                     "width": s.width}, {**ckpt["identity"], "method": ckpt["settings"]["method"]})
    else:
        log("warning: --method sparse without --init prunes random weights (HYDRA prunes a trained model: "
            "give --init <AT(Dense) run>/checkpoint.pt)")
    dense.requires_grad_(False)
    # the scores alone are trained, on the cosine schedule of the pruning epochs
    pruner, history = ChannelScores(dense, s.ratio), []
    phase = dataclasses.replace(s, epochs=s.prune_epochs or 1)
    scores = {"params": list(pruner.scores.values()), "base_lr": s.lr, "name": "scores"}
    opt = torch.optim.SGD([scores], lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    for epoch in range(s.prune_epochs):  # (0 epochs: the scores stay the filter norms)
        t0 = time.perf_counter()
        try:
            stats = train_epoch(pruner, {"all": opt}, data, phase, epoch, device, stop, log)
        except Interrupted:
            raise Interrupted(f"interrupted by {stop[0]} in pruning epoch {epoch + 1}: nothing is saved "
                              f"before pruning ends; run the command again") from None
        history.append({"epoch": epoch + 1, **stats, "seconds": round(time.perf_counter() - t0, 2)})

        log("prune " + format_row(history[-1], phase))
    keep = pruner.keep()
    log(f"pruned to {sum(map(len, keep.values()))} of {sum(channel_groups(dense).values())} channels")
    return extract_sparse(dense, keep), {"keep": {g: v.tolist() for g, v in keep.items()},
                                         "sizes": channel_groups(dense), "prune_history": history}

# ==================================================================================================
# 10. Files: result.json, atomic writes, run folders, checkpoints (data, not code), --eval-only
# ==================================================================================================
def finish(model, data, s: Settings, out: Path, history: list, seconds: float, device, log, extra=None):
    """The final evaluation (and on the validation split every attack but AutoAttack), then result.json."""
    log(f"evaluating: SA and RA under PGD-{s.test_steps} on {s.eval_n or 'all'} test images")
    t0 = time.perf_counter()
    utility = router_utility_tables(model, s.iou_with) if s.iou_with else None
    ev = evaluate(model, data, s, limit=s.eval_n, attacks=s.attacks, utility=utility, log=log)
    no_aa = tuple(a for a in s.attacks if a != "autoattack")
    val = data.eval_len(split="val") and evaluate(model, data, s, attacks=no_aa, split="val", log=log)
    result = {"dataset": s.dataset, "arch": s.arch, "method": s.method, "ratio": s.model_ratio,
              "n_experts": s.model_experts, "router": s.router if s.model_experts > 1 else None,
              "loss": s.loss, "epochs": len(history), "seed": s.seed, "eps": s.eps,
              "train_step_size": s.train_step_size, **{k: v for k, v in ev.items() if k != "n"},
              "eval_n": ev["n"], "ra_aa": ev["attacks"].get("autoattack"),
              "val": val and {k: val[k] for k in ("sa", "ra", "ra_worst", "n", "attacks")},
              "data": {"train_images": data.train_len(1) * data.shard[1], "test_images": data.eval_len(),
                       "val_images": data.eval_len(split="val"), "split_seed": SPLIT_SEED},
              "gflops": round(gflops_per_input(model, next(data.test_batches(16))[0]), 4),
              "params": {"total": sum(p.numel() for p in model.parameters()),
                         "routers": sum(p.numel() for p in router_params(model))},
              "train_seconds": round(seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
              "device": device_name(device), "torch": torch.__version__, "commit": COMMIT,
              "command": command_line(s), **(extra or {}), "settings": dataclasses.asdict(s),
              "history": history}
    write_json(out / "result.json", result)
    others = "".join(f"  {k} {v:.2f}" for k, v in result["attacks"].items() if not k.startswith("pgd"))
    log(f"SA {result['sa']:.2f}  RA {result['ra']:.2f}{others}  RA-worst {result['ra_worst']:.2f}  GFLOPs "
        f"{result['gflops']:.3f}  -> {out / 'result.json'}")
    return result

def non_default(s: Settings) -> list[str]:
    """The fields of s that differ from their defaults (eps's default is its data set's, a step size's the one
    derived from s's eps and K)."""
    plain = Settings(dataset=s.dataset)
    derived = Settings(dataset=s.dataset, eps=s.eps, train_steps=s.train_steps)
    return [f.name for f in dataclasses.fields(s)
            if getattr(s, f.name) != getattr(derived if f.name.endswith("step_size") else plain, f.name)]

def command_line(s: Settings) -> str:
    """The command that reproduces a run: --dataset and every flag that differs from its default."""
    def arg(k: str) -> str:
        v = getattr(s, k)
        return (flag(k) if v else "--no-" + flag(k)[2:]) if isinstance(v, bool) else f"{flag(k)} {v}"
    return "python advmoe.py " + " ".join(arg(k) for k in ["dataset"] + non_default(s))

def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"

def git_commit() -> str | None:
    head = Path(__file__).resolve().parent / ".git" / "HEAD"
    with contextlib.suppress(OSError):
        ref = head.read_text().strip()
        return (head.parent / ref[5:]).read_text().strip() if ref.startswith("ref: ") else ref
    return None

COMMIT = git_commit()  # read at import: the code that runs, even if the checkout moves on during a long run

def atomic_write(path: Path, write: Callable[[str], None]):
    """Write a temporary file in the same folder, then rename it: never a half-written file, and a failed
    write (a full disk) leaves the previous file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch.save's zip writer raises RuntimeError on a full disk)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:160]
        raise RunFailed(f"cannot write {path} ({why}): the previous {path.name} is intact; free space there "
                        f"and run again (training continues with --resume)") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()

def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))

def append_jsonl(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")

RUN_FILES = ("result.json", "checkpoint.pt", "log.jsonl")

@contextlib.contextmanager
def run_folder(out: Path, s: Settings, lead: bool = True):
    """The run's folder: created if missing (and removed again if the run ends before writing anything), and
    never replaced silently: a folder holding a run is refused without --resume (training) or --overwrite."""
    created = lead and not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {out} ({e.strerror}): choose another --out") \
            from None
    found = [f for f in RUN_FILES if lead and (out / f).exists()]
    if found and (s.eval_only or not s.resume) and not s.overwrite:
        raise ConfigError(f"--out {out} already holds {'an evaluation' if s.eval_only else 'a run'} "
                          f"({', '.join(found)}): choose another --out, "
                          f"{'' if s.eval_only else 'continue it with --resume, '}or replace it with "
                          f"--overwrite")
    for f in found if s.overwrite else ():
        (out / f).unlink()
    try:
        yield
    finally:
        if created and not any(out.iterdir()):
            out.rmdir()

# what a checkpoint's weights fit, and the flags that build its model
IDENTITY = ("dataset", "arch", "method", "model_ratio", "model_experts", "router", "width", "shared_bn",
            "router_standardize")
MODEL_FIELDS = ("arch", "method", "ratio", "n_experts", "router", "width", "shared_bn", "router_standardize")
# what a checkpoint that does not record a setting was trained with
LEGACY = {"shared_bn": False, "router_standardize": True}
# flags of the run and of its evaluation: --resume and --eval-only may change them, not the recipe
RUN_FIELDS = ("out", "resume", "overwrite", "eval_only", "device", "data_dir", "amp", "compile",
              "eval_batch_size", "iou_with", "eval_aa", "aa_n")
EVAL_FIELDS = ("eval_n", "eval_attacks", "quick_eval_n", "square_queries", "test_steps", "test_step_size")

def save_checkpoint(path: Path, model, opts: dict, s: Settings, epoch: int, history: list, seconds, extra):
    """All that --resume needs; extra: AT(Sparse)'s mask (also for --iou-with), the routing of epoch 0."""
    atomic_write(path, lambda tmp: torch.save({
        "settings": dataclasses.asdict(s), "identity": {k: getattr(s, k) for k in IDENTITY}, "epoch": epoch,
        "history": history, "train_seconds": seconds, "extra": extra, "model": model.state_dict(),
        "opts": {k: o.state_dict() for k, o in opts.items()}, "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp))

def read_checkpoint(path: Path) -> dict:
    """A checkpoint of save_checkpoint, loaded as data (weights_only) and checked: anything else is a one-line
    ConfigError naming it. Settings this file does not know are set aside."""
    fix = "give the checkpoint.pt of a run of advmoe.py"
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"checkpoint {path} {what}: {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, garbage, or a pickle that needs code
        raise ConfigError(f"checkpoint {path} cannot be read (torch.load: {type(e).__name__}): {fix}") \
            from None
    needed = ("settings", "identity", "epoch", "history", "train_seconds", "model", "opts")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
        raise ConfigError(f"checkpoint {path} is not a checkpoint of advmoe.py (a bare state_dict, or "
                          f"another program's file): {fix}")
    known = Settings.__dataclass_fields__
    if ckpt["settings"].get("method") == "standard":  # natural training, once a method of its own
        ckpt["settings"].update(method="moe", loss="natural")
        ckpt["identity"]["method"] = "moe"
    return {**ckpt, "settings": {**LEGACY, **{k: v for k, v in ckpt["settings"].items() if k in known}},
            "identity": {**LEGACY, **ckpt["identity"]}}

def load_weights(model: nn.Module, state: dict, path, want: dict | None = None, theirs: dict | None = None):
    """model.load_state_dict, refusing (one line, naming every difference) a checkpoint of another model."""
    diff = [f"{k} {theirs.get(k)!r} != {v!r}" for k, v in (want or {}).items() if theirs.get(k) != v]
    try:
        assert not diff
        model.load_state_dict(state)
    except (AssertionError, RuntimeError) as e:
        first = "; ".join(diff) or (str(e).strip().splitlines()[1:] or [str(e)])[0].strip()[:160]
        raise ConfigError(f"checkpoint {path} is from another model ({first}): give one of this model, or "
                          f"the same settings") from None

def starting_point(out: Path, model, opts: dict, s: Settings, rank: int, log):
    """(first epoch, history, training seconds, extra): --resume from <out>/checkpoint.pt (a finished run's
    result.json is kept aside), else --init weights, else a fresh start."""
    path = out / "checkpoint.pt"
    if not (s.resume and path.exists()):
        if s.init and s.method != "sparse":  # --init: start from another run's weights
            ckpt = read_checkpoint(Path(s.init))
            load_weights(model, ckpt["model"], s.init, {k: getattr(s, k) for k in IDENTITY if k != "method"},
                         ckpt["identity"])
        if dist.is_initialized():
            torch.manual_seed(s.seed + rank)  # attack starts differ between processes
        return 0, [], 0.0, {}
    ckpt = read_checkpoint(path)
    changed = [f"{flag(k)} {v} -> {getattr(s, k)}" for k, v in ckpt["settings"].items()
               if k not in RUN_FIELDS + EVAL_FIELDS + ("epochs",) and v != getattr(s, k)]
    if changed or s.epochs < ckpt["epoch"]:
        what = "; ".join(changed) or "fewer epochs"
        raise ConfigError(f"--resume continues the run in {path} ({ckpt['epoch']} epochs): only --epochs "
                          f"(not fewer) and evaluation or run flags may change ({what}): give its values, or "
                          f"start a new --out")
    load_weights(model, ckpt["model"], path)
    for k, o in opts.items():
        o.load_state_dict(ckpt["opts"][k])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    if rank == 0 and (out / "result.json").exists():  # a finished run evaluated again: keep its result
        os.replace(out / "result.json", out / f"result_epoch{ckpt['epoch']}_{time.strftime('%m%d%H%M')}.json")
    log(f"resumed {path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["history"], ckpt["train_seconds"], ckpt.get("extra") or {}

def eval_only(s: Settings, log=print, given: set[str] | None = None) -> dict:
    """Evaluate a checkpoint at its own settings (model, data, eps, test attack, images), except the flags
    given on the command line (`given`; from Python, the fields of s that differ from their defaults) and
    the run's own flags (device, out, AutoAttack, ...)."""
    ckpt = read_checkpoint(Path(s.eval_only))
    theirs, given = ckpt["settings"], set(non_default(s)) if given is None else given
    clash = [f"{flag(k)} {getattr(s, k)} (the checkpoint's: {theirs.get(k)})" for k in MODEL_FIELDS
             if k in given and getattr(s, k) != theirs.get(k)]
    if clash:
        raise ConfigError(f"--eval-only rebuilds the checkpoint's model: drop {', '.join(clash)}")
    values = {**theirs, **{k: getattr(s, k) for k in given | set(RUN_FIELDS)}}
    if {"eps", "dataset"} & given:  # derive what was not given from the new eps or data set
        values.update({k: None for k in ("eps", "train_step_size", "test_step_size") if k not in given})
    s = Settings(**values)
    device = resolve_device(s.device)
    data = load_data(s, device)
    model = build_model(s, data.num_classes, data.image_size).to(device)
    load_weights(model, ckpt["model"], s.eval_only)
    out = Path(s.out or Path(s.eval_only).parent / "eval")
    if (out / "checkpoint.pt").exists() or (out / "log.jsonl").exists():  # a training run's folder stays

        out = out / "eval"
        log(f"--out holds a training run: this evaluation goes to {out}")
    with run_folder(out, s):
        try:
            return finish(model, data, s, out, ckpt["history"], ckpt["train_seconds"], device, log)
        except KeyboardInterrupt:
            raise Interrupted("interrupted in the evaluation: nothing was written") from None

# ==================================================================================================
# 11. Report: every table of the paper from result.json files
# ==================================================================================================
LABELS = {"sdense": "AT(S-Dense)", "sparse": "AT(Sparse)", "moe": "AT(MoE)", "advmoe": "AdvMoE",
          "dense": "AT(Dense)"}
TABLE1 = ("sdense", "sparse", "moe", "advmoe", "dense")  # Table 1's rows; AT(Dense) is the reference
SPLIT = ["router robustness", "MoE robustness", "(1)", "(2)", "(3)", "(4)", "split n"]

def read_results(root: Path) -> list[dict]:
    """Every result.json below root, with its folder as "path"; a corrupt or incomplete one is skipped with a
    warning naming it, so one bad file costs one row."""
    results, needed = [], ("dataset", "arch", "method", "sa", "ra", "settings", "routing", "command")
    for p in sorted(root.rglob("result.json")):
        try:
            r = json.loads(p.read_text())
            assert all(k in r for k in needed)
            results.append({**r, "path": str(p.parent.relative_to(root))})
        except (OSError, ValueError, AssertionError, TypeError) as e:
            print(f"advmoe: warning: skipping {p} ({type(e).__name__}): not a complete result.json",
                  file=sys.stderr)
    return results

def recipe(r: dict, drop: tuple = ()) -> tuple:
    """What a run trained and how it was measured, without its seed, its run flags and `drop`."""
    skip = set(RUN_FIELDS) | {"seed", "quick_eval_n", *drop}
    return tuple(sorted((k, str(v)) for k, v in r["settings"].items() if k not in skip))

def trained(r: dict) -> bool:  # a training run of every parameter (not --eval-only, not a Sec. 4 stage)
    st = r["settings"]
    return not st["eval_only"] and st["train_params"] == "all" and r["loss"] != "natural"

def cell(runs: list[dict], get: Callable = lambda r: r["ra"], digits: int = 2) -> str | None:
    """The mean over runs (the seeds of one recipe) of get(run), ± half the range (the number of runs)."""
    v = [x for x in map(get, runs) if x is not None]
    spread = f" ± {(max(v) - min(v)) / 2:.{digits}f} ({len(v)})" if len(v) > 1 else ""
    return f"{sum(v) / len(v):.{digits}f}{spread}" if v else None

def sa_ra(runs: list[dict], split: bool = False):
    """"SA / RA" of runs; split=True: [SA, RA, GFLOPs], three cells."""
    cells = [cell(runs, lambda r: r["sa"]), cell(runs), cell(runs, lambda r: r["gflops"], 4)]
    return cells if split else (f"{cells[0]} / {cells[1]}" if runs else None)

def md_table(title: str, head: list[str], rows: list[list], runs: list[dict], note: str = "") -> list[str]:
    """A markdown table under its title (a blank cell: not run), then the runs that fill it and commands."""
    lines = [f"## {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return lines + ["", "<details><summary>the runs in this table</summary>", ""] + [
        f"- {r['path']}: `{r['command']}` ({r['device']}, torch {r['torch']}, commit "
        f"{(r['commit'] or '?')[:10]}, {r['epochs']} epochs, {r['eval_n']} test images)" for r in runs] + [
        "", "</details>", ""]

def report(folder: str) -> str:
    """Markdown from every result.json below `folder`, also written to folder/report.md: Table 1 (one per data
    set and protocol; a cell averages the seeds of one recipe), Table 2, Figs. 7 and 8, the Sec. 4 study,
    routing, recipes over seeds, router utility (Fig. 6) and every run. A blank cell was not run."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"report folder {folder} does not exist: give the folder of the runs' result.json")
    rs = read_results(root)
    if not rs:
        raise ConfigError(f"no result.json below {folder}: train a run with --out inside it first")
    lines, moes = [f"# Results in {folder}", ""], [r for r in rs if r["routing"]]
    # Table 1: the paper's protocol (N = 2, r = 0.5, its routing), one table per data set and recipe
    paper = [r for r in rs if trained(r) and r["method"] in TABLE1 and r["n_experts"] in (1, 2) and
             r["router"] != "global" and r["ratio"] == (1.0 if r["method"] == "dense" else 0.5) and
             not r["settings"]["balance"]]
    protocol = lambda r: recipe(r, ("method", "arch", "init", "prune_epochs"))  # noqa: E731
    for key in dict.fromkeys(map(protocol, paper)):
        table = [r for r in paper if protocol(r) == key]
        archs, first = sorted({r["arch"] for r in table}), table[0]
        rows = [[LABELS[m]] + [c for a in archs for c in sa_ra(
            [r for r in table if (r["arch"], r["method"]) == (a, m)], split=True)] for m in TABLE1]
        title = f"Table 1: {first['dataset']} (N = 2, r = 0.5, width {first['settings']['width']:g}, " \
                f"{first['epochs']} epochs)"
        head = ["method"] + [f"{a} {c}" for a in archs for c in ("SA", "RA", "GFLOPs")]
        lines += md_table(title, head, rows, table)
    if aa := [r for r in rs if r.get("autoattack")]:
        parts = [c["name"] for c in aa[0]["autoattack"]["components"]]
        lines += md_table("Table 2: AutoAttack (standard)",
                          ["run", "method", "SA", "RA (PGD, same images)", "RA-AA", "images"] + parts,
                          [[r["path"], LABELS[r["method"]], r["sa"], r["autoattack"]["ra_pgd_same_images"],
                            r["ra_aa"], r["autoattack"]["images"]]
                           + [c["ra_after"] for c in r["autoattack"]["components"]] for r in aa],
                          aa, "RA after each component, each run on the inputs still robust.")
    for (dataset, arch), runs in sweeps(rs, lambda r: trained(r) and r["method"] == "advmoe", "n_experts"):
        ns, qs = sorted({r["n_experts"] for r in runs}), sorted({r["ratio"] for r in runs})
        lines += md_table(f"Fig. 7: AdvMoE's RA over N (rows) and r, {dataset} {arch}",
                          ["N"] + [f"r = {q:g}" for q in qs],
                          [[n] + [cell([r for r in runs if (r["n_experts"], r["ratio"]) == (n, q)])
                                  for q in qs] for n in ns], runs)
    fig8 = lambda r: trained(r) and r["n_experts"] in (1, 2) and r["method"] in TABLE1  # noqa: E731
    for (dataset, arch), runs in sweeps(rs, fig8, "ratio"):
        qs = sorted({r["ratio"] for r in runs if r["method"] != "dense"})
        if len(qs) < 2:  # (AT(Dense) alone differs)
            continue
        lines += md_table(f"Fig. 8: SA / RA over r, N = 2, {dataset} {arch}", ["r", *map(LABELS.get, TABLE1)],
                          [[f"{q:g}"] + [sa_ra([r for r in runs if r["method"] == m and r["ratio"] == (
                              1.0 if m == "dense" else q)]) for m in TABLE1] for q in qs], runs)
    if study := [r for r in moes if r["loss"] == "natural" or r["settings"]["train_params"] != "all"]:
        lines += md_table("Sec. 4 study (Insights 1-3)", ["run", "stage", "SA", "RA"] + SPLIT,
                          [[r["path"], "natural" if r["loss"] == "natural" else r["settings"]["train_params"],
                            r["sa"], r["ra"]] + split_cells(r) for r in study], study)
    if moes:
        lines += md_table("Routing: before training, and under attack (every MoE run)",
                          ["run", "method", "SA", "RA", "collapsed at epoch 0", "collapsed",
                           "pathway entropy (bits)", "flip rate"] + SPLIT,
                          [[r["path"], LABELS[r["method"]], r["sa"], r["ra"],
                            (r.get("routing_epoch0") or {}).get("collapsed"), collapsed(r),
                            r["routing"]["pathways"]["clean"]["entropy_bits"],
                            r["routing"]["flip_rate_any_layer"]] + split_cells(r) for r in moes], moes,
                          "Collapsed: MoE layers that send 95% or more of the inputs to one expert (epoch 0: "
                          "256 validation images, batch statistics; final: the clean test images). The 4-way "
                          "split of PGD examples, in % of the test images classified correctly when clean: "
                          "(1) neither routers nor prediction fooled, (2) routers only, (3) prediction only, "
                          "(4) both; router robustness (1)+(3), MoE robustness (1)+(2).")
    groups = {}
    for r in filter(trained, rs):
        groups.setdefault(recipe(r), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        columns = {"SA": lambda r: r["sa"], "RA (PGD)": lambda r: r["ra"],
                   "soft": lambda r: r["attacks"].get("soft"), "Square": lambda r: r["attacks"].get("square"),
                   "RA-worst": lambda r: r["ra_worst_without_aa"],
                   "val RA-worst": lambda r: (r["val"] or {}).get("ra_worst"), "RA-AA": lambda r: r["ra_aa"],
                   "collapsed": collapsed, "pathway entropy": lambda r: r["routing"][
                       "pathways"]["clean"]["entropy_bits"] if r["routing"] else None}
        lines += md_table("Recipes over seeds (mean ± half the range (seeds))",
                          ["method", "router", "seeds", *columns, "GFLOPs"],
                          [[LABELS[g[0]["method"]], g[0]["router"], ", ".join(str(r["seed"]) for r in g)]
                           + [cell(g, get) for get in columns.values()] + [cell(g, lambda r: r["gflops"], 4)]
                           for g in groups.values()], [r for g in groups.values() for r in g],
                          "RA-worst: correct under every attack but AutoAttack, on every test image (val: on "
                          "the held-out training images). RA-AA: on the first --aa-n images.")
    if util := [r for r in rs if "router_utility" in r]:
        lines += md_table("Fig. 6: router utility, pathway IoU with the AT(Sparse) mask",
                          ["run", "method", "IoU clean", "IoU PGD", "random pathway", "histogram clean",
                           "histogram PGD"],
                          [[r["path"], LABELS[r["method"]]]
                           + [r["router_utility"][k]["mean"] for k in ("clean", "adv", "random_pathway")]
                           + [r["router_utility"][k]["histogram"] for k in ("clean", "adv")] for r in util],
                          util, "Read it beside a random pathway's IoU: they match by channel position only.")
    lines += md_table("Runs", ["run", "method", "r", "N", "router", "epochs", "SA", "RA", "RA per attack",
                               "RA-worst", "GFLOPs"],
                      [[r["path"], r["method"], r["ratio"], r["n_experts"], r["router"], r["epochs"], r["sa"],
                        r["ra"], ", ".join(f"{k} {v:.2f}" for k, v in r["attacks"].items()), r["ra_worst"],
                        r["gflops"]] for r in rs], rs)
    text = "\n".join(lines)
    atomic_write(root / "report.md", lambda tmp: Path(tmp).write_text(text))
    return text

def sweeps(rs: list[dict], keep: Callable, axis: str):
    """(data set, backbone) and its runs kept, where they vary along `axis` (a sweep to plot)."""
    for key in sorted({(r["dataset"], r["arch"]) for r in rs if keep(r)}):
        runs = [r for r in rs if keep(r) and (r["dataset"], r["arch"]) == key]
        if len({r[axis] for r in runs}) > 1:
            yield key, runs

def collapsed(r: dict) -> int | None:  # layers where one expert takes >= 95% of the clean test images
    return sum(max(u) >= 0.95 for u in r["routing"]["usage_clean"]) if r["routing"] else None

def split_cells(r: dict) -> list:
    rt = r["routing"]
    return [rt["router_robustness"], rt["moe_robustness"], *rt["split_4way"].values(), rt.get("split_n")]

# ==================================================================================================
# 12. Bench: speed and cost, measured; and the wall time of a grid, estimated from it
# ==================================================================================================
def timed(fn: Callable, device) -> float:
    """Seconds one call of fn takes (the GPU's queue drained before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0

def bench(argv: list[str], log=print) -> dict:
    """Per method, on random CIFAR-size inputs: the training step's time (the first step apart: with
    --compile, the warm-up), one test-PGD step per image, inference images/s at a large batch and the latency
    at batch 1 (Dense, S-Dense, MoE), GFLOPs per input as executed. The other flags are training flags."""
    p = Parser(prog="advmoe.py bench", description=bench.__doc__)
    p.add_argument("--out", default="", help="JSON file to write")
    p.add_argument("--methods", default="dense,sdense,moe,advmoe", help="comma-separated methods")
    p.add_argument("--infer-batch", type=int, default=0, help="inference batch (0: 1024 on a GPU, 64 on CPU)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats, median kept (0: 20 GPU, 3 CPU)")
    a, rest = p.parse_known_args(argv)
    base = parse_settings(["--dataset", "synthetic", *rest])
    device = resolve_device(base.device)
    gpu, rows, methods = device.type == "cuda", [], a.methods.split(",")
    infer_batch, repeats = a.infer_batch or (1024 if gpu else 64), a.repeats or (20 if gpu else 3)
    if min(a.infer_batch, a.repeats) < 0 or not set(methods) <= set(METHODS):
        raise ConfigError(f"bench: --methods {a.methods} must name methods of {', '.join(METHODS)}, and "
                          f"--repeats and --infer-batch must be 0 or more")

    def median(fn) -> float:
        return sorted(timed(fn, device) for _ in range(repeats))[repeats // 2]
    for method in methods:
        s = dataclasses.replace(base, method=method)
        torch.manual_seed(0)
        model = build_model(s, 10, 32).to(device)
        opts, net, b = make_optimizers(model, s, device), compiled(model, s, device), s.batch_size
        batches = [(torch.rand(b, 3, 32, 32, device=device), torch.randint(10, (b,), device=device))
                   for _ in range(STEPS[method][1])]

        def step():
            net.train()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.amp and gpu):
                STEPS[method][0](net, opts, batches, s.objective)
        x, y = batches[0]
        attack = lambda: pgd(model, x, ce_objective(model, y), s.eps, s.test_step_size, 1)  # noqa: E731
        row = {"method": method, "warmup_s": round(timed(step, device), 2),
               "train_step_ms": round(1000 * median(step), 2),
               "pgd_step_ms_per_image": round(1000 * median(attack) / b, 4)}
        row["epoch_s_cifar"] = round(50000 / b * row["train_step_ms"] / 1000, 1)
        if method != "advmoe":  # (AdvMoE's model is the MoE's)
            xb, x1 = (torch.rand(n, 3, 32, 32, device=device) for n in (infer_batch, 1))
            with torch.no_grad(), evaluating(model), \
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.amp and gpu):
                model(xb)  # warm-up
                row.update(infer_img_s=round(infer_batch / median(lambda: model(xb)), 1),
                           latency_ms_b1=round(1000 * median(lambda: model(x1)), 3))
            row["gflops"] = round(gflops_per_input(model, xb[:16]), 4)
        rows.append(row)
        log(json.dumps(row))
    dense = next((r["infer_img_s"] for r in rows if r["method"] == "dense"), None)
    for r in rows:
        r["infer_vs_dense"] = round(r["infer_img_s"] / dense, 2) if dense and "infer_img_s" in r else None
    result = {"device": device_name(device), "torch": torch.__version__, "commit": COMMIT,
              "arch": base.arch, "width": base.width, "batch": base.batch_size, "infer_batch": infer_batch,
              "bf16": base.amp and gpu,
              "compile": base.compile, "repeats": repeats, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out), result)
    return result

IMAGES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "tinyimagenet": (100000, 10000),
          "imagenet": (1281167, 50000), "synthetic": SYNTHETIC}  # training and test images of each data set

def estimate(bench_file: str, commands: list[str], workers: int = 1) -> dict:
    """The wall time of a grid (train_all.sh's commands) from a bench of ResNet-18 on this machine: each run's
    training steps at its method's step time, and its PGD evaluation at the PGD step, scaled by the Dense
    backbone's FLOPs at the run's image size and width over the bench's (a first-order guess; AutoAttack,
    Square and re-evaluations left out), the runs spread over `workers` devices."""
    b = json.loads(Path(bench_file).read_text())
    rows, total, blocks = {r["method"]: r for r in b["rows"]}, 0.0, {}
    for line in (c for c in commands if c.startswith("python advmoe.py")):
        s = parse_settings([w for w in shlex.split(line)[2:] if w != "--resume"])
        size = {"tinyimagenet": 64, "imagenet": 224}.get(s.dataset, 32)
        if s.eval_only:  # a re-evaluation (AutoAttack, router utility): left out
            continue
        r = rows["sdense" if s.method == "sparse" else s.method]
        epochs = s.epochs + (s.prune_epochs if s.method == "sparse" else 0)
        train = epochs * (s.train_n or IMAGES[s.dataset][0]) / b["batch"] * r["train_step_ms"] / 1000
        test = (s.eval_n or IMAGES[s.dataset][1]) * s.test_steps * r["pgd_step_ms_per_image"] / 1000
        cost = dense_gflops(s.arch, size, s.width) / dense_gflops("resnet18", 32, b["width"])
        seconds = (train + test) * cost
        block = Path(s.out).parent.name or "runs"
        total, blocks[block] = total + seconds, blocks.get(block, 0) + seconds
    runs = sum(c.startswith("python advmoe.py") for c in commands)
    return {"bench": bench_file, "device": b["device"], "workers": workers, "runs": runs,
            "hours": round(total / 3600 / workers, 2), "hours_by_block": {k: round(v / 3600, 2)
                                                                          for k, v in blocks.items()}}

@functools.cache
def dense_gflops(arch: str, size: int, width: float = 1.0) -> float:
    """GFLOPs of one Dense forward at `size` px, counted on the meta device (shapes only, nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        MoECNN(arch, 10, size, width=width)(torch.empty(1, 3, size, size))
    return counter.get_total_flops() / 1e9

# ==================================================================================================
# 13. Command line
# ==================================================================================================
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:2] in (["report", "-h"], ["report", "--help"]):
            print("usage: python advmoe.py report DIR: every table of the paper from the result.json files "
                  "below DIR, printed and written to DIR/report.md")
        elif argv[:1] == ["report"]:
            if len(argv) != 2:
                raise ConfigError("usage: python advmoe.py report DIR (the folder holding the runs)")
            print(report(argv[1]), end="")
        elif argv[:1] == ["bench"]:
            bench(argv[1:])
        elif argv[:1] == ["estimate"]:  # the commands on stdin: DRY_RUN=1 bash train_all.sh | ...
            if len(argv) not in (2, 3) or not Path(argv[1]).is_file():
                raise ConfigError("usage: ... | python advmoe.py estimate BENCH.json [DEVICES] (bench --out)")
            found = estimate(argv[1], sys.stdin.read().splitlines(), int((argv[2:] or [1])[0]))
            print(json.dumps(found, indent=1))
        else:
            s = parse_settings(argv)
            given = set(vars(settings_parser(defaults=False).parse_args(argv)))
            eval_only(s, given=given) if s.eval_only else train(s)
    except ConfigError as e:
        print(f"advmoe: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunFailed) as e:
        print(f"advmoe: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"advmoe: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # while loading, or in report or bench
        print("advmoe: interrupted: nothing more was written", file=sys.stderr)
        return 130
    finally:  # a gloo process group left to the interpreter's exit can abort the process (SIGABRT)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends the CLI as Ctrl-C does
    sys.exit(main())
