#!/usr/bin/env python3
"""AdvMoE: adversarially robust training of sparse Mixture-of-Experts CNNs, in one readable file.

Claim (the paper): router-expert alternating adversarial training (Eq. 1, Algorithm 1) makes an MoE-CNN more
    robust than AT(S-Dense), AT(Sparse) and AT(MoE) at S-Dense's inference cost (Table 1).
Evidence (here, real CIFAR-10 at laptop scale, results/cifar10_laptop/): not reproduced at that scale.
    ResNet-18, width 1/4, 10k images, 8 epochs, 2 seeds: PGD-50 RA AT(S-Dense) 24.9, AT(MoE) 22.7, AdvMoE 22.1

Reference implementation of
    Zhang, Cai, Chen, Zhang, Zhang, Chen, Chang, Wang, Liu.
    "Robust Mixture-of-Expert Training for Convolutional Neural Networks". ICCV 2023. arXiv:2308.10110.

Usage
    python advmoe.py --dataset cifar10 --arch resnet18 --method advmoe      # train + evaluate one model
    python advmoe.py --dataset synthetic --epochs 1 --out runs/try         # offline smoke run (CPU ok)
    python advmoe.py --eval-only runs/try/checkpoint.pt --out runs/try_eval # evaluate a checkpoint
    python advmoe.py report runs/                                          # every table, from result.json
    python advmoe.py bench --arch resnet18 --device cuda --out bench.json  # throughput, latency, GFLOPs
    torchrun --nproc_per_node=8 advmoe.py --dataset imagenet ...          # several GPUs / nodes
    bash train_all.sh                                                      # every table of the paper

Notation (paper -> code)
    psi      backbone and experts (every parameter whose name has no "router")   backbone_params()
    phi      routers (per-layer gates, or the one global router)                router_params()
    N, r     experts per MoE layer, channel ratio: an expert owns r*C of C channels   --n-experts, --ratio
    eps      l_inf radius in pixel units ([0,1] inputs; normalization is the model's first layer)
    K        PGD steps in training (2); 50 at test time                        --train-steps, --test-steps
    beta     TRADES weight 1/lambda (6)                                         --beta
    delta    the perturbation; x_adv = clip_[0,1](x + delta), |delta|_inf <= eps

Paper -> code
    Fig. 1a / A1, MoE layer             MoEConv (router + channel-expert conv, sparse and masked paths)
    top-1 routing, straight-through     top1_gate
    Eq. (AT), TRADES                    trades_loss, training_attack, robust_loss; Objective (what they read)
    PGD-50 evaluation, SA / RA          pgd, evaluate
    adaptive attacks, RA-worst          adversaries: router-aware, soft, fixed-routing PGD, Square, AutoAttack
    AutoAttack (standard, Table 2)      autoattack_settings, autoattack: torchattacks' parts, reference values
    pathway diversity (Sec. 5)          pathway_diversity -> result["routing"]["pathways"]
    4-way split (Sec. 4, Insight 2)     evaluate -> result["routing"]["split_4way"]
    Eq. (1) / Algorithm 1 (AdvMoE)      advmoe_step (lines 3-5), level (one level's update), STEPS
    AT(Dense), AT(S-Dense), AT(MoE)     joint_step (methods "dense", "sdense", "moe")
    AT(Sparse) (Sparse-CNN, HYDRA)      channel_wiring, ChannelScores, prune, extract_sparse (method "sparse")
    Insights 1-3 (Sec. 4)               method "standard", --train-params routers | backbone, --init
    router utility (Fig. 6)             router_utility_tables, pathway_iou (--iou-with)
    AutoAttack (Table 2)                --eval-aa, --aa-n (torchattacks, optional)
    GFLOPS column                       gflops_per_input (counted on what executes)
    Tables 1, 2, Figs. 6-8, Sec. 4      report(), train_all.sh

Deviations (each marked NOTE(ours) where it is made)
    1. A BatchNorm per expert: the BatchNorm that follows a routed conv normalizes only the inputs
       routed to each expert, with that expert's own statistics and affine parameters.
    2. Routing regularizers the paper does not have, off by default: a Switch-Transformer balance term
       (--balance; in AdvMoE trained in the lower level only, with the routers; in the joint methods part of
       the one loss, unless the routers are frozen), a router learning-rate multiplier
       (--router-lr), router noise and the official code's class-mod-N router supervision. The defaults are
       the paper's (--balance 0 --router-lr 1), chosen on real CIFAR-10's validation split (see Settings).
    3. Pre-activation BatchNorms (WRN, DenseNet) act on the pathway's r*C channels and are shared by
       all experts, like the stem, projection shortcuts and classifier.
    4. ImageNet-size inputs (>= 128 px) get a strided stem (7x7/2 conv + 3x3/2 max-pool) in every
       backbone; 32 and 64 px inputs use a 3x3/1 stem.
    5. Two independent shuffles of the training set feed B_phi and B_psi; an epoch is one pass of B_psi.
    6. In the lower level the BatchNorm running statistics (buffers of psi) keep updating on B_phi.
    7. Data parallelism (torchrun) averages each level's gradients with one all-reduce instead of wrapping
       the model in DistributedDataParallel, whose reducer cannot follow a level's partial backward.
    8. AT(Sparse) prunes channel groups: layers whose outputs are summed (a residual stream) keep the same
       channels, so the pruned network is really r*C wide (S-Dense's shape). Scores start from filter norms.
    9. Router utility compares an MoE and a Sparse-CNN trained separately, channel by channel position; it is
       reported beside the IoU of random pathways of the same sizes, and beside pathway diversity.
   10. AutoAttack is assembled from torchattacks' components with the reference settings (100 iterations,
       9 target classes, 5000 Square queries): torchattacks' own "standard" version runs 10 iterations.
   11. --width, --train-n and --val-n scale a run down for a laptop (1 / all data / none: the paper's).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Subset


ARCHS = ("resnet18", "wrn28_10", "vgg16", "densenet")
DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic")
METHODS = ("dense", "sdense", "moe", "advmoe", "sparse", "standard")
MOE_METHODS = ("moe", "advmoe", "standard")  # methods whose model is an MoE-CNN
TRAIN_PARAMS = ("all", "routers", "backbone")
LOSSES = ("trades", "pgdat")
ROUTERS = ("layer", "global")
EVAL_ATTACKS = ("pgd", "router", "soft", "fixed", "square", "autoattack")
MEAN_STD = {  # per-channel mean and std; the model normalizes as its first layer
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


# ==================================================================================================
# 1. MoE layers: router, top-1 gate with a straight-through estimator, channel-expert convolution
# ==================================================================================================
class Gate(NamedTuple):
    """One MoE layer's routing decision for a batch."""
    logits: torch.Tensor  # (B, N) router scores (with --router-noise in training: the noised scores)
    choice: torch.Tensor  # (B,) chosen expert, int64
    scale: torch.Tensor   # (B,) exactly 1.0 in value; carries the router's gradient (straight-through)


def top1_gate(logits: torch.Tensor, noise: float = 0.0, force: torch.Tensor | None = None) -> Gate:
    """Hard top-1 routing. `noise` (training only) perturbs the logits; `force` imposes the choice
    (used to attack with routing held fixed) while the gradient still reaches the router."""
    if noise > 0:
        logits = logits + noise * torch.randn_like(logits)
    probs = logits.float().softmax(-1)                                        # (B, N)
    choice = probs.argmax(-1) if force is None else force.expand(len(probs))  # (B,)
    if not probs.requires_grad:  # no gradient to carry (inference): the value alone
        return Gate(logits, choice, torch.ones_like(probs[:, 0]))
    p = probs.gather(1, choice[:, None]).squeeze(1)                           # (B,) p_chosen
    # straight-through: forward value 1 (the hard one-hot), backward d/dphi of the chosen expert's p
    # NOTE(official code): its mask passes the gradient to the chosen raw logit; here it flows through the
    # softmax probability, so every logit of the router gets a gradient (both are "straight-through").
    scale = 1.0 + (p - p.detach())
    return Gate(logits, choice, scale)


def straight_through(y: torch.Tensor, gate: Gate) -> torch.Tensor:
    """y_b = s_b * E_{e(b)}(x_b) with s_b = 1 + p_{e(b)} - sg(p_{e(b)}): the chosen expert's output, and
    the router's gradient. s is exactly 1, so without a gradient to carry the product is skipped."""
    if not gate.scale.requires_grad:
        return y
    return y * gate.scale.to(y.dtype)[:, None, None, None]


@dataclass
class Routing:
    """Per-forward routing context, created by the model's forward and passed down (never stored on a
    module). Each MoE layer appends its Gate, so the caller gets every decision back."""
    gates: list = field(default_factory=list)
    shared: Gate | None = None              # the global router's gate, reused by every layer
    dispatch: str = "sparse"                # "sparse" (real savings) | "masked" (CUDA) | "soft" (attacks)
    force: list | int | torch.Tensor | None = None  # per-layer choices, or one choice for every layer
                                                    # (an expert index, or a (B,) tensor), to impose
    noise: float = 0.0                      # router noise std (0 outside training)


class MoEConv(nn.Module):
    """A conv layer (optionally followed by its BatchNorm) whose output channels are split into N experts
    of `cout` channels each; a router picks one expert per input (Fig. 1a). With N = 1 it is a plain conv
    (the Dense / S-Dense layer), so every backbone is written once.

    Expert e owns filters [e*cout, (e+1)*cout) of one (N*cout, cin, k, k) weight. Its input is the
    pathway's cin channels, whichever expert produced them, so a pathway costs what an S-Dense layer costs.
    NOTE(official code): the same layout; but it computes all N*cout filters and masks them (cost N*r^2 of
    Dense), while the sparse path here convolves each input with its expert's filters only (cost r^2).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, n_experts: int, bn: bool, router: bool):
        super().__init__()
        self.cin, self.cout, self.stride, self.padding, self.n = cin, cout, stride, kernel // 2, n_experts
        self.weight = nn.Parameter(torch.empty(n_experts * cout, cin, kernel, kernel))
        # Kaiming (fan_out) of one expert, a standalone conv of cout filters: std = sqrt(2 / (cout * k * k)).
        # (Kaiming on the stacked (N*cout, ...) weight would shrink every expert's std by 1/sqrt(N).)
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (cout * kernel * kernel)))
        # NOTE(ours): a BatchNorm per expert, stored as one BatchNorm over the N*cout channels; expert e
        # uses channels [e*cout, (e+1)*cout) and is normalized over the inputs routed to it alone.
        # NOTE(official code): one BatchNorm of cout channels shared by whichever expert was gathered, so
        # its statistics mix experts whose filters differ.
        self.bn = nn.BatchNorm2d(n_experts * cout) if bn else None
        # Per-layer router (Fig. A1): pooled input features -> standardized -> linear (no bias) -> N logits.
        self.router = router_head(cin, n_experts) if (router and n_experts > 1) else None

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv of stride 1: a matrix product per input (see pointwise_forward)."""
        return self.weight.shape[-1] == 1 and self.stride == 1

    def expert(self, e: int) -> slice:
        return slice(e * self.cout, (e + 1) * self.cout)

    def conv_bn(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on the inputs x routed to it: (b, cin, H, W) -> (b, cout, H', W')."""
        y = F.conv2d(x, self.weight[self.expert(e)], None, self.stride, self.padding)
        if self.bn is None:
            return y
        s, bn = self.expert(e), self.bn
        # Running statistics of the expert's slice are updated in place (the slices are views of the buffers).
        return F.batch_norm(y, bn.running_mean[s], bn.running_var[s], bn.weight[s], bn.bias[s],
                            self.training, bn.momentum, bn.eps)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if self.n == 1:
            return self.conv_bn(x, 0)
        gate = self.route(x, routing)
        if routing.dispatch == "sparse":
            return self.pointwise_forward(x, gate) if self.pointwise else self.sparse_forward(x, gate)
        return self.masked_forward(x, gate, soft=routing.dispatch == "soft")

    def route(self, x: torch.Tensor, routing: Routing) -> Gate:
        layer = len(routing.gates)
        force = routing.force[layer] if isinstance(routing.force, list) else routing.force
        force = None if force is None else torch.as_tensor(force, device=x.device)
        if routing.shared is not None:  # global router: one decision for every layer
            gate = routing.shared if force is None else top1_gate(routing.shared.logits, force=force)
        else:
            # g_l(x) = top1(softmax(W_l std(GAP(x)))): pooled (B, cin) -> logits (B, N)
            gate = top1_gate(self.router(standardize(x.mean((2, 3)))), routing.noise, force)
        routing.gates.append(gate)
        return gate

    def sparse_forward(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """Group inputs by expert, one conv per group: only the chosen expert's channels are computed."""
        # One host read per layer: group sizes decide the shapes of the convs that follow (free on the CPU;
        # on CUDA it would stall the GPU, so "auto" takes masked_forward there).
        counts = torch.bincount(gate.choice, minlength=self.n).tolist()
        if max(counts) == len(x):  # one expert for the whole batch (always at batch 1): nothing to group
            return straight_through(self.conv_bn(x, counts.index(len(x))), gate)
        groups = gate.choice.argsort().split(counts)                        # N x (b_e,) input indices
        y = None
        for e, idx in enumerate(groups):
            if len(idx):
                ye = self.conv_bn(x[idx], e)                                 # (b_e, cout, H', W')
                y = output_like(ye, len(x)) if y is None else y
                y.index_copy_(0, idx, ye)                                    # rows of the inputs routed to e
        return straight_through(y, gate)

    def pointwise_forward(self, x: torch.Tensor, gate: Gate) -> torch.Tensor:
        """The sparse path of a 1x1 conv: y_b = W_{e(b)} x_b is a matrix product per input, so every input
        takes its own expert's filters in one batched matmul, without grouping the batch: only the chosen
        experts are computed, with static shapes and no host read. (Grouping copies every input and output of
        a layer; for DenseNet's many narrow 1x1 layers those copies cost more than the convolution.)"""
        w = self.weight.view(self.n, self.cout, self.cin)[gate.choice]         # (B, cout, cin): W_{e(b)}
        y = torch.matmul(w, x.flatten(2)).view(len(x), self.cout, *x.shape[2:])  # (B, cout, H, W)
        if self.bn is not None:
            scale, shift = self.expert_affine(y, gate.choice)                # (N, cout) each
            y = y * scale[gate.choice, :, None, None] + shift[gate.choice, :, None, None]
        return straight_through(y, gate)

    def masked_forward(self, x: torch.Tensor, gate: Gate, soft: bool = False) -> torch.Tensor:
        """Every expert's conv for every input, then each input's chosen expert: static shapes, no host sync
        (the CUDA dispatch, and the reference the sparse path is tested against). BatchNorm is per expert, as
        in the sparse path: in training over the inputs routed to it (updating its running statistics).
        soft=True (attacks only): the same hard output, but the backward pass sees the experts mixed by the
        router's probabilities (a surrogate gradient through routing)."""
        y = F.conv2d(x, self.weight, None, self.stride, self.padding)           # (B, N*cout, H', W')
        bn, train_bn = self.bn, self.bn is not None and self.training
        if bn is not None and not self.training:  # running statistics: one BatchNorm over all N*cout channels
            y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        y = rearrange(y, "b (n c) h w -> b n c h w", n=self.n)              # (B, N, cout, H', W')
        # y_b = E_{e(b)}(x_b): each input's rows of its chosen expert (a gather)
        hard = y[torch.arange(len(y), device=y.device), gate.choice]         # (B, cout, H', W')
        if train_bn:  # batch statistics per expert, from the B chosen rows only (not all N experts' outputs)
            scale, shift = self.expert_affine(hard, gate.choice)             # (N, cout) each
            hard = hard * scale[gate.choice, :, None, None] + shift[gate.choice, :, None, None]
        hard = straight_through(hard, gate)
        if not soft:
            return hard
        if train_bn:
            y = y * scale[:, :, None, None] + shift[:, :, None, None]        # every expert, normalized
        # y = y_soft + sg(y_hard - y_soft), y_soft = sum_e p_e E_e(x): the hard value, the soft gradient only
        probs = gate.logits.float().softmax(-1).to(y.dtype)[:, :, None, None, None]
        mix = (y * probs).sum(1)                                             # (B, cout, H', W')
        return mix + (hard - mix).detach()

    def expert_affine(self, y: torch.Tensor, choice: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's BatchNorm as an affine map, BN_e(y) = y * scale_e + shift_e with (N, cout) scale and
        shift. y (B, cout, H', W'): each input's chosen expert's output. In training the statistics of expert
        e are those of the inputs routed to it, mean_e = sum_{b: e(b)=e} sum_hw y_b / n_e and var_e likewise
        (two passes, as F.batch_norm), and its running statistics are updated; in eval, the running ones."""
        bn, n = self.bn, self.n
        if not self.training:
            mean, var = bn.running_mean.view(n, -1), bn.running_var.view(n, -1)
        else:  # statistics in >= float32, also under bf16 autocast (which would run the matmuls in bf16)
            y = y.to(torch.promote_types(y.dtype, torch.float32))
            with torch.autocast(y.device.type, enabled=False):
                onehot = F.one_hot(choice, n).to(y.dtype)                   # (B, N)
                count = onehot.sum(0) * (y.shape[-1] * y.shape[-2])         # (N,) inputs x pixels per expert
                mean = onehot.T @ y.sum((2, 3)) / count.clamp(min=1)[:, None]   # (N, cout)
                # sum_hw (y_b - mean_e(b))^2, (B, cout)
                centered = (y - mean[choice, :, None, None]).square().sum((2, 3))
                var = onehot.T @ centered / count.clamp(min=1)[:, None]      # (N, cout)
            self.update_running_stats(mean, var, count)
        # BN_e(y) = (y - mean_e) / sqrt(var_e + eps) * gamma_e + beta_e
        scale = bn.weight.view(n, -1) / torch.sqrt(var + bn.eps)
        return scale, bn.bias.view(n, -1) - mean * scale

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor):
        """running <- running + m * (batch statistic - running) for the experts that received inputs (m = 0
        for the others; the variance unbiased, n/(n-1)): what F.batch_norm does for each group in the sparse
        path."""
        bn = self.bn
        m = (count > 0).to(bn.running_mean.dtype)[:, None] * bn.momentum                     # (N, 1)
        bn.running_mean.view(self.n, -1).lerp_(mean.to(bn.running_mean.dtype), m)
        unbiased = var * (count / (count - 1).clamp(min=1))[:, None]
        bn.running_var.view(self.n, -1).lerp_(unbiased.to(bn.running_var.dtype), m)


def output_like(y: torch.Tensor, batch: int) -> torch.Tensor:
    """An empty (batch, ...) tensor in y's dtype and memory format (channels_last stays channels_last, so the
    layers after an MoE layer keep the fast format)."""
    layout = torch.channels_last if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return torch.empty((batch,) + y.shape[1:], dtype=y.dtype, device=y.device, memory_format=layout)


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Each input's pooled features at zero mean and unit variance over channels: (B, C) -> (B, C).
    NOTE(ours): a router reads pooled post-BatchNorm-ReLU features, which share a large positive mean; a plain
    linear router then gives every input nearly the same logits (an offset 2-5x their spread across inputs),
    so most layers send 95% or more of the inputs to one expert before any training, and SGD moves mostly
    that offset. Standardized per input, without a bias, the logits depend on which channels respond, not on
    how strongly all of them do."""
    # z_b <- (z_b - mean_c z_bc) / sqrt(var_c z_bc + eps)
    return F.layer_norm(z, z.shape[1:])


def router_head(cin: int, n_experts: int) -> nn.Linear:
    """The router's linear map to N logits: no bias (a shared offset is what the standardization removes) and a
    small init (std 0.01), so the first choices are the input's and the probabilities start near 1/N."""
    head = nn.Linear(cin, n_experts, bias=False)
    nn.init.normal_(head.weight, 0.0, 0.01)
    return head


class GlobalRouter(nn.Module):
    """The official code's image-level router, one decision shared by all layers (a small CNN; theirs is
    ResNet-20-like with 16/32/64 channels)."""

    def __init__(self, n_experts: int):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = router_head(64, n_experts)

    def forward(self, x):
        return self.head(standardize(self.features(x)))                      # (B, N)


# ==================================================================================================
# 2. Backbones, each written once; `spec` makes the same class Dense, S-Dense or MoE
# ==================================================================================================
@dataclass(frozen=True)
class Spec:
    """What distinguishes Dense (r=1, N=1), S-Dense (r<1, N=1) and MoE-CNN (N>=2) for any backbone.
    Channel counts passed in are the paper's C (Dense has round(W*C) of them at --width W); a tuple of counts
    is a concatenation of groups."""
    ratio: float = 1.0
    n_experts: int = 1
    layer_router: bool = True
    base: float = 1.0  # --width W: the Dense network has round(W * C) channels where the paper's has C

    def width(self, channels: int | tuple) -> int:
        """Channels of a tensor in the pathway (= S-Dense): r * round(W * C), at least 1; of a concatenation,
        the sum of its groups' widths (so a pruned Dense network and S-Dense have the same shapes at any
        r)."""
        if isinstance(channels, tuple):
            return sum(self.width(c) for c in channels)
        return max(1, round(self.ratio * max(1, round(self.base * channels))))

    def conv(self, cin, cout: int, kernel: int = 3, stride: int = 1, bn: bool = True) -> MoEConv:
        """A routed conv: N experts of r*cout filters, each reading the pathway's r*cin channels."""
        return MoEConv(self.width(cin), self.width(cout), kernel, stride, self.n_experts, bn,
                       self.layer_router)

    def shared_conv(self, cin, cout: int, kernel: int, stride: int, bn: bool = True) -> MoEConv:
        """A conv shared by all experts (stem, projection shortcut) at pathway width: an MoEConv, N = 1."""
        return MoEConv(self.width(cin), self.width(cout), kernel, stride, 1, bn, False)

    def bn(self, channels) -> nn.BatchNorm2d:
        """A pre-activation BatchNorm on the pathway, shared by all experts (NOTE(ours), deviation 3)."""
        return nn.BatchNorm2d(self.width(channels))

    def fc(self, channels, num_classes: int) -> nn.Linear:
        """The classifier, on the pathway's globally pooled channels."""
        return nn.Linear(self.width(channels), num_classes)


class Stem(nn.Module):
    """The shared stem on the RGB image. NOTE(ours): 3x3/1 for 32-64 px inputs; a 7x7/2 conv + 3x3/2
    max-pool for ImageNet-size inputs: conv-BN-ReLU-pool, or conv-pool where the stem has no BatchNorm
    (WRN and DenseNet, whose blocks start with one)."""

    def __init__(self, spec: Spec, cout: int, image_size: int, bn: bool = True):
        super().__init__()
        self.pool = image_size >= 128
        kernel, stride = (7, 2) if self.pool else (3, 1)
        self.conv = MoEConv(3, spec.width(cout), kernel, stride, 1, bn, False)

    def forward(self, x, routing):
        x = self.conv(x, routing)
        if self.pool:
            x = F.max_pool2d(F.relu(x) if self.conv.bn is not None else x, 3, 2, 1)
        return x


class BasicBlock(nn.Module):
    """ResNet block: relu(BN(conv2(relu(BN(conv1 x)))) + shortcut(x)); both 3x3 convs routed."""

    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = spec.conv(cin, cout, 3, stride), spec.conv(cout, cout, 3, 1)
        self.shortcut = spec.shared_conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x, routing):
        # (B, r*cin, H, W) -> (B, r*cout, H/stride, W/stride); each routed conv picks its expert per input
        out = self.conv2(F.relu(self.conv1(x, routing)), routing)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x, routing)))


class ResNet18(nn.Module):
    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem = Stem(spec, 64, image_size)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):  # 4 stages of 2 blocks
            blocks += [BasicBlock(spec, cin, cout, stride), BasicBlock(spec, cout, cout, 1)]
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.fc = spec.fc(512, num_classes)

    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))             # (B, r*64, 32, 32) on CIFAR
        for block in self.blocks:                    # stages of r*64, r*128, r*256, r*512 channels at
            x = block(x, routing)                    # 32, 16, 8, 4 px
        return self.fc(x.mean((2, 3)))               # pool (B, r*512) -> (B, classes)


class WideBlock(nn.Module):
    """Pre-activation wide block: conv2(relu(BN(conv1(relu(BN x))))) + shortcut. conv1 carries the middle
    BatchNorm (per expert); the first BatchNorm acts on the pathway and is shared (NOTE(ours))."""

    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = spec.bn(cin)
        self.conv1 = spec.conv(cin, cout, 3, stride, bn=True)
        self.conv2 = spec.conv(cout, cout, 3, 1, bn=False)
        self.shortcut = spec.shared_conv(cin, cout, 1, stride, bn=False) if (stride != 1 or cin != cout) \
            else None

    def forward(self, x, routing):
        o = F.relu(self.bn1(x))                      # pre-activation, (B, r*cin, H, W)
        out = self.conv2(F.relu(self.conv1(o, routing)), routing)   # (B, r*cout, H/stride, W/stride)
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
        self.blocks = nn.ModuleList(blocks)
        self.bn, self.fc = spec.bn(cin), spec.fc(cin, num_classes)

    def forward(self, x, routing):
        x = self.stem(x, routing)                    # (B, r*16, 32, 32) on CIFAR
        for block in self.blocks:                    # r*160, r*320, r*640 channels at 32, 16, 8 px
            x = block(x, routing)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))  # pool (B, r*640) -> (B, classes)


class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR style (one linear classifier); the first conv is the shared stem."""
    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem, layers, cin = Stem(spec, 64, image_size), [], 64
        for v in self.CFG[1:]:
            layers.append(nn.MaxPool2d(2) if v == "M" else spec.conv(cin, v, 3, 1))
            cin = cin if v == "M" else v
        self.layers = nn.ModuleList(layers)
        self.fc = spec.fc(512, num_classes)

    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))             # (B, r*64, 32, 32) on CIFAR
        for layer in self.layers:                    # five max-pools: 32 -> 1 px, up to r*512 channels
            x = layer(x) if isinstance(layer, nn.MaxPool2d) else F.relu(layer(x, routing))
        return self.fc(x.mean((2, 3)))               # (B, classes)


class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output concatenated to the input.
    The 1x1 conv carries the middle BatchNorm (per expert); the first acts on the shared pathway. `chans`
    lists the Dense channel counts of the concatenated input's groups."""

    def __init__(self, spec: Spec, chans: tuple, growth: int):
        super().__init__()
        self.bn = spec.bn(chans)
        self.conv1 = spec.conv(chans, 4 * growth, 1, 1, bn=True)
        self.conv2 = spec.conv(4 * growth, growth, 3, 1, bn=False)

    def forward(self, x, routing):
        # (B, C, H, W) -> 1x1 conv (B, r*4k, H, W) -> 3x3 conv (B, r*k, H, W), appended: (B, C + r*k, H, W)
        out = self.conv2(F.relu(self.conv1(F.relu(self.bn(x)), routing)), routing)
        return torch.cat([x, out], 1)


class DenseNet(nn.Module):
    """The CIFAR DenseNet-BC the authors use: depth 40, growth k = 12, compression 0.5 (so 3 dense blocks
    of (40-4)/6 = 6 bottleneck layers, transitions BN-ReLU-conv1x1-avgpool, routed like every conv)."""

    def __init__(self, spec: Spec, num_classes: int, image_size: int, depth: int = 40, growth: int = 12,
                 compression: float = 0.5):
        super().__init__()
        self.stem, chans, layers = Stem(spec, 2 * growth, image_size, bn=False), (2 * growth,), []
        for block in range(3):
            for _ in range((depth - 4) // 6):
                layers.append(DenseLayer(spec, chans, growth))
                chans += (growth,)
            if block < 2:  # transition: BN-ReLU-conv1x1 to half the channels, then avg-pool
                cout = int(sum(chans) * compression)
                layers.append(nn.ModuleDict({"bn": spec.bn(chans),
                                             "conv": spec.conv(chans, cout, 1, 1, bn=False)}))
                chans = (cout,)
        self.layers = nn.ModuleList(layers)
        self.bn, self.fc = spec.bn(chans), spec.fc(chans, num_classes)

    def forward(self, x, routing):
        x = self.stem(x, routing)
        for layer in self.layers:
            if isinstance(layer, DenseLayer):
                x = layer(x, routing)
            else:  # transition: (B, C, H, W) -> (B, C/2, H/2, W/2)
                x = F.avg_pool2d(layer["conv"](F.relu(layer["bn"](x)), routing), 2)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


BACKBONES = {"resnet18": ResNet18, "wrn28_10": WideResNet, "vgg16": VGG16, "densenet": DenseNet}


class MoECNN(nn.Module):
    """Normalization + backbone (+ the global router). model(x) returns logits, so any attack library can
    use it; model(x, return_routing=True) also returns the list of Gates, one per MoE layer."""

    def __init__(self, arch: str, num_classes: int = 10, image_size: int = 32, ratio: float = 1.0,
                 n_experts: int = 1, router: str = "layer", mean_std=MEAN_STD["cifar10"],
                 router_noise: float = 0.0, width: float = 1.0):
        super().__init__()
        spec = Spec(ratio, n_experts, layer_router=(router == "layer"), base=width)
        self.backbone = BACKBONES[arch](spec, num_classes, image_size)
        self.global_router = GlobalRouter(n_experts) if (router == "global" and n_experts > 1) else None
        self.register_buffer("mean", torch.tensor(mean_std[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(mean_std[1]).view(1, 3, 1, 1))
        self.router_noise = router_noise  # a hyper-parameter, not state

    def forward(self, x, return_routing: bool = False, dispatch: str = "auto", force=None):
        dispatch = resolve_dispatch(dispatch, x.device)
        x = (x - self.mean) / self.std               # (B, 3, H, W), inputs in [0,1] normalized here
        routing = Routing(dispatch=dispatch, force=force, noise=self.router_noise if self.training else 0.0)
        if self.global_router is not None:
            routing.shared = top1_gate(self.global_router(x), routing.noise)
        logits = self.backbone(x, routing)
        return (logits, routing.gates) if return_routing else logits


def resolve_dispatch(dispatch: str, device: torch.device) -> str:
    """With "auto", the default of training and inference: on CUDA the masked dispatch, whose static shapes
    need no host sync, so the GPU never waits for group sizes and torch.compile captures the whole forward (at
    the price of computing all N experts: N * r^2 of Dense's FLOPs instead of r^2); on the CPU the sparse
    one, which computes only the chosen experts (a host read costs nothing there)."""
    return ("masked" if device.type == "cuda" else "sparse") if dispatch == "auto" else dispatch


def router_params(model: nn.Module) -> list[nn.Parameter]:
    """phi: the routers' parameters."""
    return [p for n, p in model.named_parameters() if "router" in n]


def backbone_params(model: nn.Module) -> list[nn.Parameter]:
    """psi: everything else (stem, experts, BatchNorms, shortcuts, classifier)."""
    return [p for n, p in model.named_parameters() if "router" not in n]


def count_params(model: nn.Module) -> dict:
    return {"total": sum(p.numel() for p in model.parameters()),
            "routers": sum(p.numel() for p in router_params(model))}


# ==================================================================================================
# 3. Attacks and losses: one l_inf PGD that maximizes any loss; TRADES; the routing regularizer
# ==================================================================================================
@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the duration (BatchNorm running statistics, no router noise), then every module's own
    mode back (a part frozen in eval mode by --train-params stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def pgd(model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor], eps: float,
        step_size: float, steps: int, start: str = "uniform",
        generator: torch.Generator | None = None) -> torch.Tensor:
    """max_{|delta|_inf <= eps, x+delta in [0,1]} loss_fn(x + delta) by projected sign-gradient ascent
    (Madry et al. 2018), with the model in eval mode and gradients taken w.r.t. the input only.
    start: "uniform" in the eps-ball (test PGD) | "normal": x + 0.001*N(0,1) (TRADES); drawn from `generator`
    (the global stream when None)."""
    draw = torch.rand if start == "uniform" else torch.randn
    r = draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)      # (B, 3, H, W)
    # x'_0 = x + U(-eps, eps)^d (test PGD) or x + 0.001 N(0, I) (TRADES), projected like every step
    noise = (2 * r - 1) * eps if start == "uniform" else 0.001 * r
    x_adv = torch.min(torch.max(x + noise, x - eps), x + eps).clamp(0, 1)
    with evaluating(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)
            # x' <- Proj_{B_eps(x) ∩ [0,1]^d}( x' + alpha * sign(grad_x' loss) )
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor,
                   reduction: str = "batchmean") -> torch.Tensor:
    """KL(p || q) from logits, through log_softmax (stable where softmax underflows; the official code went
    NaN)."""
    # KL(p || q) = sum_c p_c (log p_c - log q_c), with log p and log q from log_softmax (no log of a 0)
    return F.kl_div(q_logits.float().log_softmax(-1), p_logits.float().log_softmax(-1), reduction=reduction,
                    log_target=True)


def ce_objective(model: nn.Module, y: torch.Tensor, dispatch: str = "auto", force=None) -> Callable:
    """Attack objective sum_b CE(f(x'_b), y_b) (optionally with routing forced, see Routing.force)."""
    # a sum, not a mean: each input's gradient is its own, whatever the batch size (sign() ignores scale)
    return lambda x_adv: F.cross_entropy(model(x_adv, dispatch=dispatch, force=force).float(), y,
                                         reduction="sum")


def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    # (AT) CE(f(x), y) + beta * KL(f(x) || f(x + delta))
    # NOTE(paper): TRADES as in its reference code: both sides of the KL carry gradient here; only attack
    # targets are detached.
    return F.cross_entropy(logits.float(), y) + beta * kl_from_logits(logits, logits_adv)


def routing_regularizer(gates: list[Gate], y: torch.Tensor, balance: float,
                        supervision: float) -> torch.Tensor:
    """NOTE(ours): the paper is silent on routing collapse (all inputs to one expert), which a plain
    straight-through router falls into within an epoch. Terms, averaged over the gates given (every MoE
    layer of the clean and of the adversarial forward):
      balance (Switch Transformer): N * sum_k f_k * P_k, f_k = fraction routed to k, P_k = mean p_k;
      supervision (NOTE(official code)): CE(router logits, y mod N), a fixed class-to-expert target."""
    total = torch.zeros((), device=y.device)
    for g in gates:  # one Gate per MoE layer (and per forward: clean and adversarial)
        probs = g.logits.float().softmax(-1)                                   # (B, N)
        n = probs.shape[1]
        f = F.one_hot(g.choice, n).float().mean(0)                            # (N,) fraction routed
        if balance:
            # lambda_bal * N * sum_k f_k * P_k: 1 when the routing is uniform, N when it has collapsed
            total = total + balance * n * (f * probs.mean(0)).sum()
        if supervision:
            # lambda_sup * CE(router logits, y mod N)
            total = total + supervision * F.cross_entropy(g.logits.float(), y % n)
    return total / max(len(gates), 1)


def expert_usage(gates: list[Gate]) -> torch.Tensor:
    """(L, N): fraction of the batch routed to each expert, per MoE layer."""
    n = gates[0].logits.shape[1]
    # f_{l,k} = (1/B) sum_b [e_l(x_b) = k]
    return torch.stack([F.one_hot(g.choice, n).float().mean(0) for g in gates])


# ==================================================================================================
# 4. Algorithm 1 (AdvMoE) and the baselines: each method is a step function of one table
# ==================================================================================================
class Objective(NamedTuple):
    """The training objective of every method and its inner attack: all that the method's functions read
    (Settings.objective builds it from the flags)."""
    loss: str           # "trades": CE + beta * KL | "pgdat": CE at PGD examples | "natural": CE, no attack
    beta: float         # TRADES weight 1/lambda
    eps: float          # l_inf radius of the training attack, pixel units
    step_size: float    # its step alpha (default 1.25 * eps / K: the authors' 5/255 at eps 8/255, K = 2)
    steps: int          # K, its number of steps
    balance: float      # routing regularizer weights, NOTE(ours): 0 in the paper (see routing_regularizer)
    supervision: float
    dispatch: str       # how the MoE layers run (see resolve_dispatch)


def training_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective) -> torch.Tensor:
    """The inner maximization of the training loss, K steps."""
    d = obj.dispatch
    if obj.loss == "pgdat":  # Madry: max CE
        return pgd(model, x, ce_objective(model, y, d), obj.eps, obj.step_size, obj.steps, "uniform")
    # TRADES: max_delta KL(f(x) || f(x+delta)); the clean target is computed once per attack and detached.
    with torch.no_grad(), evaluating(model):
        # f(x): (B, classes), eval mode, no gradient: the fixed P of KL(P || f(x')). (A copy: CUDA graphs,
        # with --compile, reuse their outputs.)
        target = model(x, dispatch=d).clone()
    return pgd(model, x, lambda xa: kl_from_logits(target, model(xa, dispatch=d), "sum"), obj.eps,
               obj.step_size, obj.steps, "normal")


def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective):
    """A fresh training attack against the current model, then the training loss at (x, x_adv).
    (loss "natural", --method standard: CE(f(x), y), no attack: stage 1 of the Sec. 4 study.)"""
    def forward(inputs):
        return model(inputs, return_routing=True, dispatch=obj.dispatch)
    if obj.loss == "natural":
        logits, gates = forward(x)
        objective, logits_adv, gates_adv = F.cross_entropy(logits.float(), y), logits, []
    elif obj.loss == "trades":
        x_adv = training_attack(model, x, y, obj)
        (logits_adv, gates_adv), (logits, gates) = forward(x_adv), forward(x)
        objective = trades_loss(logits, logits_adv, y, obj.beta)
    else:  # pgdat: min CE(f(x_adv), y)
        logits_adv, gates_adv = forward(training_attack(model, x, y, obj))
        logits, gates = logits_adv, []
        objective = F.cross_entropy(logits_adv.float(), y)
    reg = routing_regularizer(gates + gates_adv, y, obj.balance, obj.supervision)
    stats = {"loss": objective.detach(), "router_reg": reg.detach(),
             "acc": (logits.argmax(1) == y).float().mean(),
             "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    if gates_adv:
        stats["top_share"] = expert_usage(gates_adv).max(1).values.mean()   # mean over layers of max_k f_k
    return objective, reg, stats


def level(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, obj: Objective,
          regularize: bool = True) -> dict:
    """One adversarial-training update of the parameters held by `opt` (the others stay fixed). The routing
    regularizer is added only where the routers are trained (regularize): AdvMoE's lower level, not its
    upper."""
    objective, reg, stats = robust_loss(model, x, y, obj)
    # L = L_TRADES(psi, phi; B) (+ R(phi), the routing regularizer, where the routers are trained)
    loss = objective + reg if regularize else objective
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)  # gradients only for the parameters this level updates
    average_gradients(params)
    opt.step()
    return stats


# Eq. (1), the bi-level problem AdvMoE solves (psi: backbone and experts; phi: routers; D: the training set):
#     min_psi L_TRADES(psi, phi*(psi); D)   s.t.   phi*(psi) = argmin_phi L_TRADES(psi, phi; D)
# Algorithm 1 solves it by alternating optimization: per iteration one SGD step of each level, each against
# an attack regenerated for the model as it is then. Lines 1-2 (initialization, the loop): train, train_epoch.
def advmoe_step(model: nn.Module, opts: dict, batches: list, obj: Objective) -> dict:
    """One iteration of Algorithm 1, lines 3-5."""
    # 3: draw two different random batches B_phi and B_psi (two independent shuffles, see train_epoch)
    (x_phi, y_phi), (x_psi, y_psi) = batches
    # 4: lower level: with psi fixed, update phi by minimizing L_TRADES with a K-step PGD attack, SGD on B_phi
    #    (the attack is generated against (psi, phi); a routing regularizer, if any, is trained here only)
    router_stats = level(model, opts["phi"], x_phi, y_phi, obj, regularize=True)
    # 5: upper level: with phi fixed (= phi*), update psi by minimizing L_TRADES with a K-step PGD attack,
    #    SGD on B_psi (the attack regenerated against (psi, phi*); phi* here is one SGD step, not the argmin)
    stats = level(model, opts["psi"], x_psi, y_psi, obj, regularize=False)
    return {**stats, "router_loss": router_stats["loss"]}


def joint_step(model: nn.Module, opts: dict, batches: list, obj: Objective) -> dict:
    """The baselines AT(Dense), AT(S-Dense), AT(MoE) (and AT(Sparse)'s score learning and fine-tuning,
    natural training): min_{psi, phi} L_TRADES(psi, phi; D) jointly, one batch, one attack. The routing
    regularizer is added where the routers are trained (not with --train-params backbone)."""
    routers = any(g.get("name") == "routers" for g in opts["all"].param_groups)
    return level(model, opts["all"], *batches[0], obj, regularize=routers)


# Every method is one step function, and the number of batch streams it draws per iteration.
STEPS: dict[str, tuple[Callable, int]] = {"advmoe": (advmoe_step, 2), "moe": (joint_step, 1),
                                          "sdense": (joint_step, 1), "dense": (joint_step, 1),
                                          "sparse": (joint_step, 1), "standard": (joint_step, 1)}


# ==================================================================================================
# 5. Evaluation: SA, RA (PGD-50), adaptive attacks, AutoAttack, routing statistics, router utility, GFLOPs
# ==================================================================================================
def adversaries(name: str, model: nn.Module, x, y, s: Settings, gates: list[Gate], steps: int,
                gen: torch.Generator | None = None, log=None) -> list:
    """The attacks of --eval-attacks, as (label, x_adv) pairs. Hard top-1 routing can hide gradients,
    so plain PGD through the straight-through routers may overstate robustness; the router-aware attacks
    below are losses for the same PGD, and Square is gradient-free (gradient masking cannot fool it).
    gen: the attack's own random stream (PGD starts)."""
    def run(loss_fn):
        return pgd(model, x, loss_fn, s.eps, s.test_step_size, steps, "uniform", gen)

    if name == "pgd":  # the paper's RA: CE through the straight-through routers
        return [(f"pgd{steps}", run(ce_objective(model, y)))]
    if name == "square":
        attack = import_torchattacks().Square(model, norm="Linf", eps=s.eps, n_queries=s.square_queries,
                                              n_restarts=1, seed=s.seed)
        return [("square", attack(x, y).detach())]
    if name == "autoattack":
        return autoattack(model, x, y, s.eps, s.seed, log)
    if not gates:  # no routers: the router-aware attacks are plain PGD
        return []
    clean = [g.choice[:len(x)] for g in gates]  # L x (B,): e_l(x), each layer's clean choice
    if name == "router":
        def router_loss(x_adv):
            logits, gates_adv = model(x_adv, return_routing=True)
            # CE(f(x'), y) + (1/L) sum_l CE(router_l(x'), e_l(x)): also push each router off its clean choice
            push = sum(F.cross_entropy(g.logits.float(), c, reduction="sum")
                       for g, c in zip(gates_adv, clean))
            return F.cross_entropy(logits.float(), y, reduction="sum") + push / len(clean)
        return [("router", run(router_loss))]
    if name == "soft":  # hard forward, backward through experts mixed by router probabilities
        return [("soft", run(ce_objective(model, y, dispatch="soft")))]
    # "fixed": routing held fixed during the attack (each expert of a global router; the clean choices
    # of per-layer routers); the adversarial input is then classified with the model's own routing.
    forced = [(f"fixed{e}", e) for e in range(gates[0].logits.shape[1])] if model.global_router is not None \
        else [("fixed", clean)]
    return [(label, run(ce_objective(model, y, force=f))) for label, f in forced]


def autoattack_settings(eps: float, n_classes: int) -> dict[str, tuple[str, dict]]:
    """Standard AutoAttack (Croce & Hein 2020) with its reference settings: APGD-CE (100 iterations), APGD-T
    (100 iterations, 9 target classes), FAB-T (100 iterations, 9 target classes), Square (5000 queries); one
    restart each, l_inf. name -> (torchattacks class, its arguments), in the order they run.
    NOTE(ours): torchattacks' own AutoAttack(version="standard") builds APGD-CE, APGD-T and FAB-T with 10
    iterations and n_classes - 1 target classes, weaker than the reference; only this configuration is
    labelled "AutoAttack (standard)" here."""
    # torchattacks' targeted attacks try n_classes - 1 target classes; the reference tries min(9, classes - 1)
    targeted = min(9, n_classes - 1) + 1
    common = {"norm": "Linf", "eps": eps, "n_restarts": 1}
    return {"apgd-ce": ("APGD", {**common, "steps": 100, "loss": "ce", "rho": 0.75}),
            "apgd-t": ("APGDT", {**common, "steps": 100, "n_classes": targeted, "rho": 0.75}),
            "fab-t": ("FAB", {**common, "steps": 100, "multi_targeted": True, "n_classes": targeted}),
            "square": ("Square", {**common, "n_queries": 5000, "p_init": 0.8})}


def autoattack_components(model: nn.Module, eps: float, seed: int) -> list[tuple[str, object]]:
    """The four attacks of autoattack_settings, built from the optional torchattacks package."""
    ta = import_torchattacks()
    return [(name, getattr(ta, cls)(model, seed=seed, **kw))
            for name, (cls, kw) in autoattack_settings(eps, model.backbone.fc.out_features).items()]


def autoattack(model: nn.Module, x, y, eps: float, seed: int, log=None) -> list[tuple[str, torch.Tensor]]:
    """Run the components in order, as AutoAttack does: each attacks only the inputs still classified
    correctly, and an input fooled once stays fooled. Returns the adversarial batch after each component
    ("autoattack/apgd-ce", ...) and the final one ("autoattack")."""
    x_adv, found = x.clone(), []
    with torch.no_grad():
        robust = model(x).argmax(1) == y                                          # (B,)
    for name, attack in autoattack_components(model, eps, seed):
        t0, idx = time.perf_counter(), robust.nonzero().squeeze(1)
        if len(idx):
            adv = attack(x[idx], y[idx]).detach()
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            x_adv[idx[fooled]], robust[idx[fooled]] = adv[fooled], False
        if log:
            log(f"    autoattack {name}: {int(robust.sum())} of {len(y)} robust "
                f"({time.perf_counter() - t0:.0f} s)")
        found.append((f"autoattack/{name}", x_adv.clone()))
    return found + [("autoattack", x_adv)]


def import_torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise ConfigError("--eval-attacks square/autoattack and --eval-aa need the optional package "
                          "torchattacks: pip install --no-deps torchattacks scipy") from None
    return torchattacks


def evaluate(model: nn.Module, data, s: Settings, steps: int | None = None, limit: int = 0,
             attacks: tuple[str, ...] = ("pgd",), utility=None, split: str = "test", log=None) -> dict:
    """SA and RA in % (RA: PGD with `steps`, CE, uniform start, at the training eps), the RA of every other
    attack asked for (AutoAttack on the first --aa-n images only, with PGD's RA on the same images beside it),
    RA-worst (an input counts only if it is classified correctly clean and under every attack, as AutoAttack
    counts; over the images every attack saw), and routing statistics of the PGD attack: expert usage on clean
    and adversarial inputs, how often the attack flips a router's choice, pathway diversity, and the paper's
    4-way split of adversarial examples (Sec. 4, Insight 2): (1) neither router nor prediction fooled, (2)
    router fooled only, (3) prediction fooled only, (4) both. Router fooled = any layer's choice differs from
    its clean choice. Router robustness = (1)+(3); MoE robustness = (1)+(2). utility (router_utility_tables):
    each input's pathway IoU with a Sparse mask, clean and under PGD (Fig. 6), beside a random pathway's.
    Everything runs in float32 whatever autocast is active outside: FAB and Square stop just past the
    decision boundary and top-1 routing is an argmax, so a bf16 re-classification could flip them back."""
    steps = s.test_steps if steps is None else steps
    attacks = ("pgd",) + tuple(a for a in attacks if a != "pgd")
    device = next(model.parameters()).device
    # Each attack draws its random starts from a stream of its own, seeded from --seed: adding an attack
    # changes no other attack's RA, and evaluating during training leaves the training's random stream alone.
    gens = {a: torch.Generator(device).manual_seed(1000 * s.seed + EVAL_ATTACKS.index(a)) for a in attacks}
    n, correct, worst, covered, per_attack, seen, pgd_on_aa, worst_no_aa = 0, 0, 0, 0, {}, {}, 0, 0
    # per batch of the PGD attack: each input's expert at every layer, clean and adversarial (B, L), whether
    # it is still classified correctly (B,), and its pathway's IoU with a Sparse mask (B,)
    pathways: dict[str, list] = {"clean": [], "adv": []}
    pgd_correct, clean_correct, ious = [], [], {"clean": [], "adv": []}
    progress = Progress(f"evaluating on {split}", data.eval_len(limit, split), log, s.log_every)
    with evaluating(model), torch.autocast(device.type, enabled=False):
        for x, y in data.test_batches(s.eval_batch_size, limit, split):
            x = prep(x, s, device)
            with torch.no_grad():
                logits, gates = model(x, return_routing=True)
            ok = logits.argmax(1) == y                                            # (B,) correct, clean
            # RA-worst counts input b only if it is correct clean and under every attack that saw it:
            # survived_b = ok_b AND_a ok_adv_{a,b}; saw_all_b: every attack saw b (AutoAttack may stop short)
            survived, saw_all, ok_pgd, survived_no_aa = ok.clone(), torch.ones_like(ok), ok, ok.clone()
            for name in attacks:
                # AutoAttack is the costly one: --aa-n caps its images (the first ones of the evaluation)
                take = len(y) if name != "autoattack" or not s.aa_n else max(0, min(len(y), s.aa_n - n))
                saw_all[take:] = False
                if take == 0:
                    continue
                if name == "autoattack":  # Table 2 sets PGD's RA on the same images beside RA-AA
                    pgd_on_aa += ok_pgd[:take].sum()
                found = adversaries(name, model, x[:take], y[:take], s, gates, steps, gens[name], log)
                for label, x_adv in found:
                    with torch.no_grad():
                        logits_adv, gates_adv = model(x_adv, return_routing=True)
                    ok_adv = logits_adv.argmax(1) == y[:take]                 # (take,) still correct
                    per_attack[label] = per_attack.get(label, 0) + ok_adv.sum()
                    seen[label] = seen.get(label, 0) + take
                    survived[:take] &= ok_adv
                    if name != "autoattack":
                        survived_no_aa &= ok_adv
                    if name == "pgd":
                        ok_pgd = ok_adv
                    if name == "pgd" and gates:
                        n_experts = gates[0].logits.shape[1]
                        pathways["clean"].append(torch.stack([g.choice for g in gates], 1))      # (B, L)
                        pathways["adv"].append(torch.stack([g.choice for g in gates_adv], 1))    # (B, L)
                        pgd_correct.append(ok_adv)
                        clean_correct.append(ok)
                        if utility:
                            ious["clean"].append(pathway_iou(gates, utility.tables))
                            ious["adv"].append(pathway_iou(gates_adv, utility.tables))
                progress(n + len(y) if name == attacks[-1] else n + take,
                         lambda: f"({name} done on this batch)")
            n, correct = n + len(y), correct + ok.sum()
            worst, covered = worst + (survived & saw_all).sum(), covered + saw_all.sum()
            worst_no_aa = worst_no_aa + survived_no_aa.sum()
    # RA_a = 100 * (inputs still correct under attack a) / (inputs attack a saw)
    ras = {label: round(100 * v.item() / seen[label], 2) for label, v in per_attack.items()}
    result = {"sa": round(100 * correct.item() / n, 2), "ra": ras[f"pgd{steps}"], "n": n,
              "attack": f"PGD-{steps} (CE, eps {s.eps:.5f}, step {s.test_step_size:.5f}, uniform start)",
              "attacks": ras, "attack_n": seen,
              "ra_worst": round(100 * worst.item() / max(covered.item(), 1), 2),
              "ra_worst_n": covered.item(), "routing": {},
              # RA-worst over every attack but AutoAttack, on all n images (AutoAttack sees the first --aa-n)
              "ra_worst_without_aa": round(100 * int(worst_no_aa) / n, 2)}
    if "autoattack" in seen:
        classes = model.backbone.fc.out_features
        result["autoattack"] = {
            "label": "AutoAttack (standard)", "images": seen["autoattack"],
            "ra_pgd_same_images": round(100 * int(pgd_on_aa) / seen["autoattack"], 2),
            "components": [{"name": name, "attack": cls, "settings": kw,
                            "ra_after": ras.get(f"autoattack/{name}")}
                           for name, (cls, kw) in autoattack_settings(s.eps, classes).items()]}
    if pgd_correct:
        result["routing"] = routing_summary(torch.cat(pathways["clean"]), torch.cat(pathways["adv"]),
                                            torch.cat(pgd_correct), torch.cat(clean_correct), n_experts)
    if ious["clean"]:
        result["router_utility"] = {**{k: iou_summary(torch.cat(v)) for k, v in ious.items()},
                                    "random_pathway": iou_summary(utility.chance)}
    return result


def routing_summary(choice: torch.Tensor, choice_adv: torch.Tensor, ok_adv: torch.Tensor,
                    ok_clean: torch.Tensor, n_experts: int) -> dict:
    """result["routing"] from each input's pathway (n, L), clean and under PGD, and whether it is classified
    correctly under PGD and clean (n,) each: expert usage per layer (L, N), clean and under PGD; how often PGD
    flips each layer's choice; the 4-way split (Sec. 4, Insight 2) in % of the split_n inputs classified
    correctly when clean (an input already wrong was not fooled by the attack), router robustness = (1) + (3),
    MoE robustness = (1) + (2); pathway diversity, clean and under PGD."""
    n = len(choice)
    usage, usage_adv, flips, split_counts = routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts)
    m = max(int(ok_clean.sum()), 1)
    # % of the clean-correct inputs: (1) neither, (2) router only, (3) prediction only, (4) both fooled
    split_4 = [100 * v / m for v in split_counts.tolist()]
    return {"usage_clean": [[round(v / n, 4) for v in row] for row in usage.tolist()],
            "usage_adv": [[round(v / n, 4) for v in row] for row in usage_adv.tolist()],
            "flip_rate_per_layer": [round(v / n, 4) for v in flips.tolist()],
            "flip_rate_any_layer": round((choice != choice_adv).any(1).float().mean().item(), 4),
            "split_4way": dict(zip(("neither", "router_only", "prediction_only", "both"),
                                   [round(v, 2) for v in split_4])),
            "split_n": int(ok_clean.sum()),
            "router_robustness": round(split_4[0] + split_4[2], 2),
            "moe_robustness": round(split_4[0] + split_4[1], 2),
            "pathways": {"clean": pathway_diversity(choice, n_experts),
                         "adv": pathway_diversity(choice_adv, n_experts)}}


def pathway_diversity(choices: torch.Tensor, n_experts: int) -> dict:
    """choices (n, L): each input's pathway, its expert at every MoE layer. The number of distinct pathways
    used and the entropy of their distribution, H = -sum_p q_p log2 q_p in bits (0: one pathway for every
    input; at most log2 min(n, N^L))."""
    _, counts = choices.unique(dim=0, return_counts=True)
    q = counts.double() / counts.sum()
    most = math.log2(min(len(choices), n_experts ** choices.shape[1]))
    return {"distinct": len(counts), "entropy_bits": round(-(q * q.log2()).sum().item(), 3),
            "max_entropy_bits": round(most, 3), "inputs": len(choices)}


def iou_summary(iou: torch.Tensor) -> dict:
    """Mean and a 10-bin histogram on [0, 1] of per-input pathway IoUs."""
    hist = torch.histc(iou.float().cpu(), bins=10, min=0, max=1)
    return {"mean": round(iou.mean().item(), 4), "histogram_bins": [round(b / 10, 1) for b in range(11)],
            "histogram": [int(v) for v in hist.tolist()]}


def routing_counts(choice: torch.Tensor, choice_adv: torch.Tensor, ok_adv: torch.Tensor, ok_clean: torch.Tensor,
                   n_experts: int):
    """From pathways (B, L), clean and adversarial, and ok_adv, ok_clean (B,): inputs per expert per layer (L,
    N), clean and adversarial; flips per layer (L,); the 4-way split's counts (4,) over the clean-correct
    inputs."""
    flipped = choice != choice_adv                                             # (B, L)
    # router fooled: any layer's choice under attack differs from its clean choice
    fooled = flipped.any(1)                                                    # (B,)
    # the 4-way split (Sec. 4, Insight 2) of the inputs correct when clean: (1) neither fooled, (2) router
    # only, (3) prediction only, (4) both
    groups = torch.stack([~fooled & ok_adv, fooled & ok_adv, ~fooled & ~ok_adv, fooled & ~ok_adv]) & ok_clean
    usage, usage_adv = (F.one_hot(c, n_experts).sum(0) for c in (choice, choice_adv))   # (L, N) each
    return usage, usage_adv, flipped.sum(0), groups.sum(1)


class Utility(NamedTuple):
    """Router utility (Fig. 6): per MoE layer, the IoU of each expert's channels with the Sparse mask; and the
    per-input IoU that random pathways of the same sizes get (the chance level to read the IoU against)."""
    tables: list[torch.Tensor]  # per MoE layer, in forward order: (N,) IoU of each expert with the mask
    chance: torch.Tensor


def router_utility_tables(model: nn.Module, path: str, samples: int = 1000) -> Utility:
    """Fig. 6: per MoE layer, the IoU of each expert's channels with the AT(Sparse) checkpoint's kept
    channels. Expert e of a layer owns filters [e*c, (e+1)*c) of its N*c; with N*r = 1 those N*c filters are
    the Dense layer's C channels, which the Sparse mask indexes. NOTE(ours): the two models are trained
    separately, so channel e*c+j of the MoE and channel e*c+j of Dense correspond by position only."""
    ckpt = read_checkpoint(Path(path))
    extra = ckpt.get("extra") or {}
    if "keep" not in extra:
        raise ConfigError(f"--iou-with {path} is not an AT(Sparse) "
                          f"checkpoint: give <sparse run>/checkpoint.pt")
    tables, chance, wiring = [], [], channel_wiring(model)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():  # the MoE layers in forward order, the order of their Gates
        if not (isinstance(m, MoEConv) and m.n > 1):
            continue
        group = wiring[m][1]
        if group not in extra["sizes"]:
            raise ConfigError(f"--iou-with {path} is an AT(Sparse) run of another backbone "
                              f"({ckpt['identity']['arch']}, no layer {group}): "
                              f"give the Sparse run of this backbone")
        size, keep = extra["sizes"][group], extra["keep"][group]
        if m.n * m.cout != size or len(keep) != m.cout:
            raise ConfigError(f"--iou-with needs N*r = 1 and the Sparse run's r (layer {group}: {m.n} "
                              f"experts of {m.cout} channels, Sparse keeps {len(keep)} of {size})")
        kept = torch.zeros(size, dtype=torch.bool)
        kept[keep] = True
        inter = kept.view(m.n, m.cout).sum(1).float()                           # |E_e ∩ K|, (N,)
        # IoU(E_e, K) = |E_e ∩ K| / |E_e ∪ K|, and |E_e| = |K| = c
        tables.append((inter / (2 * m.cout - inter)).to(m.weight.device))
        # chance: `samples` random c-subsets of the layer's N*c channels, the same IoU with K
        picks = torch.rand(samples, size, generator=gen).argsort(1)[:, :m.cout]   # (samples, c)
        hits = kept[picks].sum(1).float()                                         # (samples,)
        chance.append(hits / (2 * m.cout - hits))
    if not tables:
        raise ConfigError("--iou-with measures an MoE-CNN's pathways: use "
                          "it with --method moe, advmoe or standard")
    return Utility(tables, torch.stack(chance).mean(0))  # a random pathway's IoU, averaged over layers


def pathway_iou(gates: list[Gate], tables: list[torch.Tensor]) -> torch.Tensor:
    """(B,): each input's IoU with the Sparse mask, averaged over MoE layers (its choice at each)."""
    # (L, B): each layer's IoU at the input's choice -> mean over layers -> (B,)
    return torch.stack([table[g.choice] for g, table in zip(gates, tables, strict=True)]).mean(0)


def gflops_per_input(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one eval forward, counted by torch's FlopCounterMode on the ops that actually run
    (convolutions and matrix products; a multiply-add counts 2), divided by the batch size. For MoE this
    is the chosen pathway plus the routers, because the sparse path computes nothing else."""
    from torch.utils.flop_counter import FlopCounterMode
    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, dispatch="sparse")  # (on CUDA, "auto" runs the masked dispatch: N times the experts' FLOPs)
    return counter.get_total_flops() / len(x) / 1e9


# ==================================================================================================
# OPERATIONS. Everything below serves the method above: settings, data, the training loop, AT(Sparse)'s
# pruning, data parallelism, files, report, bench and the command line.
# ==================================================================================================
# 6. Settings
# ==================================================================================================
class ConfigError(ValueError):
    """Bad user input: the CLI prints the message on one line and exits with status 2."""


class RunFailed(RuntimeError):
    """The run could not go on (a file could not be written): the CLI prints one line and exits with 1 (as for
    the FloatingPointError of a non-finite loss)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: the CLI prints the message and exits with status 130."""


def setting(default, help: str, kind: type | None = None):
    """A Settings field: its default, its --help text and its type (the default's, unless it is None)."""
    return field(default=default, metadata={"help": help, "type": kind or type(default)})


@dataclass
class Settings:
    # ---- what to train ----------------------------------------------------------------------------
    dataset: str = setting("cifar10", "cifar10 | cifar100 | tinyimagenet | imagenet | synthetic (offline)")
    arch: str = setting("resnet18", "resnet18 | wrn28_10 | vgg16 | densenet (DenseNet-BC-40, k=12)")
    method: str = setting("advmoe", "dense | sdense | moe | advmoe | sparse | standard: AT(Dense), "
                                    "AT(S-Dense), AT(MoE), AdvMoE, AT(Sparse) (HYDRA channel pruning of a "
                                    "Dense model, then AT fine-tuning), standard (natural training of an "
                                    "MoE-CNN; Sec. 4)")
    ratio: float = setting(0.5, "r in (0,1]: an expert (and S-Dense) keeps r*C of a layer's C channels")
    n_experts: int = setting(2, "N: experts per MoE layer (moe, advmoe, standard: N >= 2)")
    width: float = setting(1.0, "W > 0: base channel multiplier of every backbone (1: the paper's networks); "
                                "Dense has round(W*C) channels, S-Dense and an expert r of those")
    router: str = setting("layer", "layer: a gate per MoE layer (paper) | global: one image-level router "
                                   "(official code)")
    init: str = setting("", "checkpoint.pt whose weights start the run (sparse: an AT(Dense) run; otherwise "
                            "the same model)")
    train_params: str = setting("all", "all | routers | backbone: which parameters the joint methods train "
                                       "(Sec. 4 study: AT of the routers, then of the backbone, of an --init "
                                       "model)")
    prune_epochs: int = setting(20, "sparse: epochs of score learning (weights frozen) before --epochs of "
                                    "fine-tuning")
    # ---- robust loss and attacks (eps and step sizes in pixel units of [0,1] images) -----------------
    loss: str = setting("trades", "trades (default, beta-weighted KL) | pgdat (Madry: CE on PGD examples)")
    beta: float = setting(6.0, "TRADES weight 1/lambda")
    eps: float = setting(None, "l_inf radius (default: 8/255 on CIFAR and synthetic, 2/255 on "
                               "TinyImageNet/ImageNet)", float)
    train_steps: int = setting(2, "K: PGD steps of the training attack")
    train_step_size: float = setting(None, "training PGD step (default: 1.25*eps/K, the authors' 5/255 at "
                                           "eps 8/255 and K = 2)", float)
    test_steps: int = setting(50, "PGD steps of the final robustness evaluation (RA)")
    test_step_size: float = setting(None, "test PGD step (default: eps/4)", float)
    # ---- routing regularizers (NOTE(ours): the paper has none; it is silent on routing collapse) -----
    # Defaults: the paper's (no balance term, the routers at the backbone's learning rate). On real CIFAR-10
    # at laptop scale (results/cifar10_laptop/) it gave AdvMoE's best validation RA-worst, 18.85 (seeds 19.0,
    # 18.7), although it collapses most layers onto one expert; a balance term of 0.1 kept every expert in use
    # but lowered it (15.95 with the router lr x 0.1; 16.0 at the shared rate). They stay as options.
    balance: float = setting(0.0, "weight of the Switch balance term N*sum_k f_k*P_k (0: off, the paper)")
    router_noise: float = setting(0.0, "std of Gaussian noise added to router logits in training")
    router_lr: float = setting(1.0, "router learning rate = lr * router_lr (1: shared, the paper)")
    router_supervision: float = setting(0.0, "weight of CE(router, y mod N), the official code's router "
                                             "target")
    # ---- optimization (the authors' settings) --------------------------------------------------------
    epochs: int = setting(100, "training epochs (an epoch is one pass of B_psi over the training set)")
    batch_size: int = setting(128, "images per batch (each of B_phi and B_psi for advmoe)")
    lr: float = setting(0.1, "SGD learning rate, cosine-annealed per iteration to 0")
    momentum: float = setting(0.9, "SGD momentum")
    weight_decay: float = setting(0.0005, "SGD weight decay (all parameters)")
    seed: int = setting(1, "seed of weights, data order and attack starts")
    # ---- data ----------------------------------------------------------------------------------------
    data_dir: str = setting("data", "where data sets live (CIFAR is downloaded here when possible)")
    download: bool = setting(True, "let torchvision download CIFAR when it is missing")
    synthetic_train: int = setting(128, "training images of the synthetic data set (a smoke set for CPUs)")
    synthetic_test: int = setting(16, "test images of the synthetic data set (PGD-50 of Dense WRN-28-10 "
                                      "costs ~9 s an image on 2 cores)")
    train_n: int = setting(0, "train on a fixed random subset of this many training images (0: all but "
                              "--val-n)")
    val_n: int = setting(0, "hold this many training images out as a validation split, evaluated beside the "
                            "test set (choose settings on it, never on the test set)")
    # ---- evaluation ----------------------------------------------------------------------------------
    eval_n: int = setting(0, "test images for the final SA/RA (0: the whole test set)")
    eval_attacks: str = setting("pgd", "comma-separated: pgd (the paper's RA) | router | soft | fixed "
                                       "(router-aware PGD) | square | autoattack (need torchattacks); "
                                       "RA-worst over all of them")
    eval_aa: bool = setting(False, "also evaluate with AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; "
                                   "needs torchattacks): RA-AA, Table 2")
    aa_n: int = setting(0, "test images for AutoAttack (the first ones of the evaluation; 0: all of --eval-n)"
                           "")
    iou_with: str = setting("", "router utility (Fig. 6): IoU of each input's MoE pathway with the static "
                                "mask of this AT(Sparse) checkpoint.pt, on clean and PGD inputs (needs N*r = "
                                "1)")
    quick_eval_n: int = setting(500, "test images for the per-epoch SA / RA(PGD-10) check (0: skip)")
    square_queries: int = setting(5000, "queries of the Square attack (AutoAttack's standard 5000)")
    eval_batch_size: int = setting(256, "batch size of evaluation and attacks at test time")
    # ---- run -----------------------------------------------------------------------------------------
    out: str = setting("", "run folder (result.json, checkpoint.pt, log.jsonl); default runs/<name>")
    resume: bool = setting(False, "continue from <out>/checkpoint.pt (the recipe must be the same; --epochs "
                                  "may grow)")
    overwrite: bool = setting(False, "replace the run already in --out (without it, a folder holding a run "
                                     "is refused)")
    eval_only: str = setting("", "path of a checkpoint to evaluate instead of training")
    device: str = setting("auto", "auto | cpu | cuda | cuda:K")
    amp: bool = setting(True, "bf16 autocast on CUDA (ignored on CPU)")
    channels_last: bool = setting(True, "channels_last memory format on CUDA")
    train_dispatch: str = setting("auto", "MoE layers in training: auto (masked on CUDA, sparse on the CPU) "
                                          "| sparse (group by expert: only the chosen experts are computed, "
                                          "a host sync per layer) | masked (every expert, static shapes, no "
                                          "host sync)")
    cudnn_benchmark: bool = setting(False, "cuDNN autotuning per shape (helps Dense/S-Dense; MoE group sizes "
                                           "vary, so every new size is re-tuned)")
    compile: bool = setting(False, "torch.compile the training forwards (on CUDA one graph, with CUDA "
                                   "graphs; README, 'Speed and cost')")
    log_every: float = setting(30.0, "seconds between progress lines (done/total, images/s, ETA) in "
                                     "training, evaluation and attacks (0: after every batch)")

    def __post_init__(self):
        """Every flag is checked here, once: a bad value is a one-line ConfigError naming it and the fix.
        eps and the step sizes left out (None) are derived here, so a Settings object always holds numbers."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")
        choices = {"dataset": DATASETS, "arch": ARCHS, "method": METHODS, "loss": LOSSES, "router": ROUTERS,
                   "train_dispatch": ("auto", "sparse", "masked"), "train_params": TRAIN_PARAMS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {flag(name)} {getattr(self, name)!r}: "
                                  f"choose one of {', '.join(allowed)}")
        unknown = [a for a in self.eval_attacks.split(",") if a not in EVAL_ATTACKS]
        if unknown:
            raise ConfigError(f"unknown --eval-attacks {','.join(unknown)}: "
                              f"choose from {', '.join(EVAL_ATTACKS)}")
        if self.eps is None:
            self.eps = 2 / 255 if self.dataset in ("tinyimagenet", "imagenet") else 8 / 255
        if self.eps < 0:
            raise ConfigError(f"--eps {self.eps} is negative: give the l_inf radius in pixel units, "
                              f"e.g. 0.0314")
        if not math.isfinite(self.eps) or self.eps > 1:
            raise ConfigError(f"--eps {self.eps} is not a radius in pixel units of [0,1] images: give e.g. "
                              f"0.0314 (8/255)")
        if self.train_step_size is None:
            # NOTE(official code): 5/255 at eps 8/255 and K = 2 (the paper fixes no step); scaled with eps
            # and K, so the K steps together travel 1.25 eps, and TRADES' start near x is not thrown to a corner
            # of the box in one step (2.5 eps / K would be 10/255).
            self.train_step_size = 1.25 * self.eps / max(self.train_steps, 1)
        if self.test_step_size is None:
            self.test_step_size = self.eps / 4
        rules = (  # (what a value must be, the flags it applies to, the message)
            (lambda v: v >= 1, ("n_experts", "train_steps", "test_steps", "square_queries", "epochs",
                                "batch_size", "eval_batch_size", "synthetic_train", "synthetic_test"),
             "must be at least 1"),
            (lambda v: math.isfinite(v) and v >= 0, ("lr", "momentum", "weight_decay", "beta", "balance",
                                                     "router_lr", "router_noise", "router_supervision",
                                                     "train_step_size", "test_step_size"),
             "must be a finite number >= 0"),
            (lambda v: v >= 0, ("eval_n", "quick_eval_n", "aa_n", "prune_epochs", "train_n", "val_n",
                                "log_every"), "must be 0 or more"),
            (lambda v: 0 < v <= 1, ("ratio",),
             "is outside (0, 1]: an expert keeps a fraction r of the channels"),
            (lambda v: 0 < v <= 64, ("width",), "must be in (0, 64]: the channel multiplier of the backbone"))
        for ok, names, must in rules:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ConfigError(f"{flag(name)} {getattr(self, name)} {must}")
        if self.method in MOE_METHODS and self.n_experts < 2:
            raise ConfigError(f"--method {self.method} needs --n-experts >= 2 (with one expert use --method "
                              f"sdense)")
        if self.method == "sparse" and self.ratio == 1:
            raise ConfigError("--method sparse keeps a fraction --ratio of the channels: "
                              "give --ratio below 1")
        if self.train_params != "all" and (self.method == "advmoe" or not self.init):
            raise ConfigError(f"--train-params {self.train_params} freezes part of the model: use it with "
                              f"--init CKPT and a joint method (moe, standard), not advmoe (whose levels "
                              f"already split it)")
        if self.train_params != "all" and self.method not in MOE_METHODS:
            raise ConfigError(f"--train-params {self.train_params} needs an MoE-CNN (--method moe or "
                              f"standard), not {self.method}")
        if self.resume and self.overwrite and not self.eval_only:
            raise ConfigError("--resume and --overwrite contradict each other (continue the run in --out, or "
                              "replace it): give one of them")
        if {"square", "autoattack"} & set(self.attacks):
            import_torchattacks()  # fail now, not after training

    @property
    def attacks(self) -> tuple[str, ...]:
        """Every attack of the final evaluation: --eval-attacks, plus AutoAttack with --eval-aa."""
        named = self.eval_attacks.split(",") + (["autoattack"] if self.eval_aa else [])
        return tuple(dict.fromkeys(named))  # each once, in order

    # The model a method trains, by parameters and not by copies of the backbone. AT(Sparse) ends as a
    # network of S-Dense's shape (its pruned channels removed).
    @property
    def model_ratio(self) -> float:
        return 1.0 if self.method == "dense" else self.ratio

    @property
    def model_experts(self) -> int:
        return self.n_experts if self.method in MOE_METHODS else 1

    @property
    def objective(self) -> Objective:
        """What the method's functions use of these settings (section 4)."""
        return Objective("natural" if self.method == "standard" else self.loss, self.beta, self.eps,
                         self.train_step_size, self.train_steps, self.balance, self.router_supervision,
                         self.train_dispatch)

    @property
    def name(self) -> str:
        return (f"{self.dataset}_{self.arch}_{self.method}_r{self.model_ratio:g}_n{self.model_experts}"
                f"_s{self.seed}")


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a bad type, an unknown flag) are one-line ConfigErrors, like every other."""

    def error(self, message: str):
        raise ConfigError(f"{message} (python advmoe.py --help lists the flags)")


def settings_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """argparse flags from the Settings fields: --field-name, typed by the default, help from the field.
    defaults=False: a flag not on the command line is left out of the parsed namespace."""
    parser = Parser(
        description="AdvMoE: robust training of MoE-CNNs (ICCV 2023). Other commands: 'python advmoe.py "
                    "report DIR' (every table from the result.json files below DIR), 'python advmoe.py bench "
                    "--help' (speed and cost).", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):
        flag, default = "--" + f.name.replace("_", "-"), f.default if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"], default=default, help=f.metadata["help"])
    return parser


def parse_settings(argv: list[str]) -> Settings:
    return Settings(**vars(settings_parser().parse_args(argv)))


def given_flags(argv: list[str]) -> set[str]:
    """The Settings fields set on the command line (not left at their defaults)."""
    return set(vars(settings_parser(defaults=False).parse_args(argv)))


# ==================================================================================================
# 7. Data: inputs in [0,1]; CIFAR-size sets kept in memory as uint8 (on the GPU when there is one)
# ==================================================================================================
class TensorData:
    """A data set held as uint8 tensors (B, 3, H, W) on `device`, with batched crop/flip augmentation."""

    def __init__(self, train_set: tuple, test: tuple, num_classes: int, device: torch.device,
                 val: tuple | None = None):
        self.x_train, self.y_train = (t.to(device) for t in train_set)
        self.x_test, self.y_test = (t.to(device) for t in test)
        self.x_val, self.y_val = (t.to(device) for t in val) if val else (self.x_test[:0], self.y_test[:0])
        self.num_classes, self.image_size, self.device = num_classes, self.x_train.shape[-1], device
        self.shard = (0, 1)  # (rank, world size) under torchrun

    def train_batches(self, batch_size: int,
                      gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One shuffled epoch of augmented batches. The epoch's randomness (order, crop offsets, flips) is
        drawn at once on the CPU from `gen`, so it is a function of the seed and the epoch, and moved in one
        copy. Distributed: every process draws the same shuffle and takes a disjoint part of it."""
        n, pad = len(self.y_train), 4
        perm = torch.randperm(n, generator=gen)
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)  # crop offsets in the padded image
        flips = torch.rand(n, generator=gen) < 0.5
        perm, shifts, flips = (t.to(self.device, non_blocking=True)
                               for t in (own_part(perm, self.shard), shifts, flips))
        for i in range(0, len(perm) - batch_size + 1, batch_size):  # drop the last partial batch, as is usual
            idx = perm[i:i + batch_size]
            x = augment(self.x_train[idx], shifts[idx], flips[idx], pad)
            yield x, self.y_train[idx]

    def test_batches(self, batch_size: int, limit: int = 0,
                     split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the test set (or of the validation split held out of the training set), in order."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        n = self.eval_len(limit, split)
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)].float() / 255, y[i:min(i + batch_size, n)]

    def eval_len(self, limit: int = 0, split: str = "test") -> int:
        n = len(self.y_test if split == "test" else self.y_val)
        return min(limit, n) if limit else n

    def train_len(self, batch_size: int) -> int:
        return len(self.y_train) // self.shard[1] // batch_size


def own_part(perm: torch.Tensor, shard: tuple[int, int]) -> torch.Tensor:
    """This process's part of an epoch's shuffle, the same in every process (torchrun; shard = (rank, world
    size)): every process takes as many images, since an extra batch would wait forever in its all-reduce."""
    rank, world = shard
    return perm[:len(perm) - len(perm) % world][rank::world]


def augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip, for a whole uint8 batch in one gather."""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))                                        # (B, C, H+2p, W+2p)
    rows = shifts[:, 0, None] + torch.arange(h, device=x.device)              # (B, H)
    cols = shifts[:, 1, None] + torch.arange(w, device=x.device)              # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)                    # flip = read columns backwards
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    x = x[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]             # (B, C, H, W)
    return x.float() / 255


class FolderData:
    """TinyImageNet / ImageNet from ImageFolder trees (DATA_DIR/<name>/{train,val}/<class>/<image>)."""

    def __init__(self, root: Path, image_size: int, device: torch.device, train_n: int = 0, val_n: int = 0,
                 workers: int = 8):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder
        if image_size >= 128:  # ImageNet recipe
            train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
            test_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size),
                                 T.ToTensor()])
        else:  # TinyImageNet: 64x64, CIFAR-style augmentation
            train_tf = T.Compose([T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                                  T.ToTensor()])
            test_tf = T.ToTensor()
        images = ImageFolder(str(root / "train"), train_tf)
        self.num_classes, self.image_size = len(images.classes), image_size
        self.test = ImageFolder(str(root / "val"), test_tf)
        self.train, self.val = images, Subset(images, [])
        if train_n or val_n:
            keep, held = split_train(len(images), train_n, val_n)
            # the validation split: the same file list (scanned once), read with the test transform
            held_out = copy.copy(images)
            held_out.transform = test_tf
            self.val = Subset(held_out, held.tolist())
            self.train = Subset(images, keep.tolist())
        self.device, self.workers = device, workers
        self.shard = (0, 1)

    def _loader(self, dataset, batch_size, sampler=None, drop_last=False):
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=self.workers,
                          pin_memory=self.device.type == "cuda")

    def train_batches(self, batch_size, gen):
        order = own_part(torch.randperm(len(self.train), generator=gen), self.shard).tolist()
        for x, y in self._loader(self.train, batch_size, order, drop_last=True):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def test_batches(self, batch_size, limit=0, split="test"):
        seen = 0
        for x, y in self._loader(self.test if split == "test" else self.val, batch_size):
            if limit and seen >= limit:
                return
            keep = batch_size if not limit else min(batch_size, limit - seen)
            seen += keep
            yield x[:keep].to(self.device), y[:keep].to(self.device)

    def train_len(self, batch_size):
        return len(self.train) // self.shard[1] // batch_size

    def eval_len(self, limit=0, split="test"):
        n = len(self.test if split == "test" else self.val)
        return min(limit, n) if limit else n


def synthetic_data(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0):
    """An offline, learnable CIFAR-shaped set: each class is a smooth random colour pattern, each image
    that pattern plus a smooth per-image nuisance and pixel noise. Classes differ by far more than 8/255,
    so a robust classifier exists; the nuisance keeps it from being trivial."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear")

    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        nuisance = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
        x = 0.6 * protos[y] + 0.3 * nuisance + 0.1 * torch.rand(n, 3, 32, 32, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y

    return draw(n_train), draw(n_test)


def load_cifar(name: str, root: Path, download: bool):
    """CIFAR-10/100 as uint8 (B,3,32,32). DATA_DIR/<name>_{train,test}.npz (arrays x: uint8 NHWC, y) are
    used when present (for copies made offline); otherwise torchvision's copy, downloaded if allowed."""
    npz = [root / f"{name}_{split}.npz" for split in ("train", "test")]
    if any(p.exists() for p in npz):
        classes = 10 if name == "cifar10" else 100
        train_set, test = (read_npz(p, classes) for p in npz)
        if train_set[0].shape[1:] != test[0].shape[1:]:
            raise ConfigError(f"{npz[0]} holds {tuple(train_set[0].shape[2:])} images but {npz[1]} holds "
                              f"{tuple(test[0].shape[2:])}: train and test must have the same image size")
        return [train_set, test]
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        sets = [cls(str(root), train=is_train, download=download) for is_train in (True, False)]
    except Exception as e:  # offline, or files missing with --no-download
        raise ConfigError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}): run "
                          f"once with network access, or put the torchvision copy (e.g. "
                          f"cifar-10-batches-py/) or {name}_train.npz/{name}_test.npz in "
                          f"--data-dir") from None
    return [(nchw(d.data), torch.tensor(d.targets)) for d in sets]


def read_npz(path: Path, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DATA_DIR/<name>_<split>.npz, checked: x uint8 (N, H, W, 3) in 0..255, y integers (N,) in [0,
    classes)."""
    import numpy as np
    must = f"it must hold x: uint8 images (N, H, W, 3) and y: N integer labels in [0, {classes})"
    if not path.exists():
        raise ConfigError(f"{path} is missing (its other split is there): "
                          f"{must}; or remove both to use torchvision")
    try:
        z = np.load(path)
        files = getattr(z, "files", ())
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"{path} cannot be read as .npz ({type(e).__name__}): {must}") from None
    missing = [k for k in ("x", "y") if k not in files]
    if missing:
        raise ConfigError(f"{path} has no array {missing[0]!r}: {must}")
    x, y = z["x"], z["y"]
    if x.dtype != np.uint8:
        raise ConfigError(f"{path}: x is {x.dtype}, not uint8: {must} (scale "
                          f"float images in [0,1] by 255 and round)")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ConfigError(f"{path}: x has shape {x.shape}, not (N, H, W, 3): {must}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ConfigError(f"{path}: y is {y.dtype} of shape {y.shape}, not N integers: {must}")
    if len(x) != len(y):
        raise ConfigError(f"{path}: x has {len(x)} images but y {len(y)} labels: {must}")
    if len(y) == 0:
        raise ConfigError(f"{path} is empty (no image): {must}")
    if y.min() < 0 or y.max() >= classes:
        raise ConfigError(f"{path}: labels run from {y.min()} to {y.max()}, outside [0, {classes}): {must}")
    return nchw(x), torch.from_numpy(y).long()


def nchw(images) -> torch.Tensor:
    """A uint8 NHWC numpy array (how CIFAR is stored) as a (B, 3, H, W) tensor."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


SPLIT_SEED = 0  # the --train-n subset and the --val-n split: the same images for every run and every --seed


def split_train(n: int, train_n: int, val_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (sorted) of the training subset and of the disjoint validation split, drawn once from
    SPLIT_SEED: the validation images are the first val_n of a fixed permutation, the subset the next
    train_n."""
    if val_n >= n or train_n + val_n > n:
        raise ConfigError(f"--train-n {train_n} plus --val-n {val_n} "
                          f"exceed the {n} training images: lower them")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    held, rest = perm[:val_n], perm[val_n:]
    return (rest[:train_n] if train_n else rest).sort().values, held.sort().values


def load_data(s: Settings, device: torch.device):
    root = Path(s.data_dir)
    if s.dataset in ("tinyimagenet", "imagenet"):
        folder = root / ("tiny-imagenet-200" if s.dataset == "tinyimagenet" else "imagenet")
        if not (folder / "train").is_dir() or not (folder / "val").is_dir():
            raise ConfigError(f"{s.dataset} needs ImageFolder trees {folder}/train/<class>/ and "
                              f"{folder}/val/<class>/ (TinyImageNet's val images must "
                              f"first be moved into one folder per class)")
        return FolderData(folder, 64 if s.dataset == "tinyimagenet" else 224, device, s.train_n, s.val_n)
    if s.dataset == "synthetic":
        (train_set, test), classes = synthetic_data(s.synthetic_train, s.synthetic_test), 10
    else:
        (train_set, test) = load_cifar(s.dataset, root, s.download)
        classes = 10 if s.dataset == "cifar10" else 100
    val = None
    if s.train_n or s.val_n:
        keep, held = split_train(len(train_set[1]), s.train_n, s.val_n)
        (x, y), val = train_set, (train_set[0][held], train_set[1][held])
        train_set = (x[keep], y[keep])
    return TensorData(train_set, test, classes, device, val)


def data_summary(s: Settings, data) -> dict:
    """What result.json records of the data: images per split and how the subset / validation split were
    drawn."""
    return {"train_images": data.train_len(1) * data.shard[1], "val_images": data.eval_len(split="val"),
            "test_images": data.eval_len(), "train_n": s.train_n or None, "val_n": s.val_n or None,
            "split_seed": SPLIT_SEED if (s.train_n or s.val_n) else None}


# ==================================================================================================
# 8. The training loop: devices, train, epochs, progress; data parallelism
# ==================================================================================================
def build_model(s: Settings, num_classes: int, image_size: int) -> MoECNN:
    return MoECNN(s.arch, num_classes, image_size, s.model_ratio, s.model_experts, s.router,
                  MEAN_STD[s.dataset], s.router_noise, s.width)


def make_optimizers(model: nn.Module, s: Settings, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """AdvMoE: one SGD for the routers phi and one for the backbone psi (same settings and schedule).
    Joint methods: one SGD over everything, or over phi or psi alone (--train-params, the Sec. 4 study).
    With part of the model frozen (--train-params), its BatchNorms normalize with their running statistics and
    leave them fixed (freeze_batchnorm)."""
    kw = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if device.type == "cuda":
        kw["fused"] = True
    phi = {"params": router_params(model), "base_lr": s.lr * s.router_lr, "name": "routers"}
    psi = {"params": backbone_params(model), "base_lr": s.lr, "name": "backbone"}
    if s.method == "advmoe":
        return {"phi": torch.optim.SGD([phi], **kw), "psi": torch.optim.SGD([psi], **kw)}
    groups = {"all": [psi] + ([phi] if phi["params"] else []), "routers": [phi],
              "backbone": [psi]}[s.train_params]
    return {"all": torch.optim.SGD(groups, **kw)}


def set_lr(opts: dict, progress: float):
    """Cosine schedule: lr_t = lr_0 * (1 + cos(pi * t / T)) / 2, per iteration."""
    for opt in opts.values():
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * progress))


def train_step(model: nn.Module, opts: dict, batches: list, s: Settings) -> dict:
    """One iteration of --method: batches = [(x, y)] for the joint methods, [B_phi, B_psi] for AdvMoE."""
    return STEPS[s.method][0](model, opts, batches, s.objective)


def place(model: nn.Module, s: Settings, device: torch.device) -> nn.Module:
    model = model.to(device)
    cl = device.type == "cuda" and s.channels_last
    return model.to(memory_format=torch.channels_last) if cl else model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:K") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: advmoe.py runs on cpu or "
                          f"cuda (auto picks cuda when there is one)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for, but torch sees no CUDA device: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s), cuda:0 "
                          f"to cuda:{torch.cuda.device_count() - 1}")
    return device


def check_fits(s: Settings, num_classes: int, image_size: int, device: torch.device):
    """Refuse a model whose parameters, gradients and momentum alone would not fit in the device's free memory
    (counted on the meta device, where nothing is allocated), before building it."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(s, num_classes, image_size).parameters())
    need = 3 * 4 * params  # float32 weights, gradients, SGD momentum; activations come on top
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:  # MemAvailable counts the page cache the system can give back; free pages alone would not
        meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
        avail = [int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                 if line.startswith("MemAvailable:")]
        free = avail[0] if avail else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if need > free:
        raise ConfigError(f"the model has {params / 1e6:.0f}M parameters ({need / 2**30:.1f} GiB with "
                          f"gradients and momentum), more than the {free / 2**30:.1f} GiB free on {device}: "
                          f"lower --n-experts, --ratio or --width")


def compiled(model: nn.Module, s: Settings, device: torch.device) -> nn.Module:
    """--compile: the model as torch.compile captures it, for the training forwards. On CUDA the dispatch is
    the masked one ("auto"): no host read, static shapes, so the whole forward is one graph (fullgraph=True
    fails loudly if it is not) and mode "reduce-overhead" replays it as CUDA graphs, one launch instead of one
    per kernel. On the CPU, or with the sparse dispatch, the default mode, with a graph break per MoE
    layer."""
    if not s.compile:
        return model
    static = device.type == "cuda" and resolve_dispatch(s.train_dispatch, device) == "masked"
    return torch.compile(model, fullgraph=static, mode="reduce-overhead" if static else None)


def autocast(s: Settings, device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=s.amp and device.type == "cuda")


def train(s: Settings, log: Callable[[str], None] = print) -> dict | None:
    """Train one model, evaluate it, and write <out>/result.json; returns the result. Under torchrun every
    process trains on its part of each batch stream; rank 0 logs, checkpoints and evaluates (other ranks
    return None)."""
    rank, world, device = distributed(s)
    lead = rank == 0
    log = log if lead else (lambda _: None)
    out = Path(s.out or f"runs/{s.name}")
    with run_folder(out, s, lead):
        return train_in(out, s, rank, world, device, log)


def train_in(out: Path, s: Settings, rank: int, world: int, device: torch.device, log) -> dict | None:
    lead = rank == 0
    torch.manual_seed(s.seed)
    if device.type == "cpu" and s.dataset != "synthetic":
        log(f"warning: training {s.dataset} on the CPU will be slow; a CUDA device is recommended")
    torch.backends.cudnn.benchmark = s.cudnn_benchmark and device.type == "cuda"
    data = load_data(s, device)
    data.shard = (rank, world)
    check_fits(s, data.num_classes, data.image_size, device)
    model = place(build_model(s, data.num_classes, data.image_size), s, device)
    opts = make_optimizers(model, s, device)
    ckpt_path = out / "checkpoint.pt"
    if s.iou_with:  # fail now, not after training
        router_utility_tables(model, s.iou_with)
    if data.train_len(s.batch_size) == 0:
        raise ConfigError(f"--batch-size {s.batch_size} is larger than "
                          f"the training set (per process): lower it")
    start, history, train_seconds, extra = starting_point(out, model, opts, s, rank, world, log)
    with stop_on_signals() as stop:
        if s.method == "sparse" and start == 0:  # AT(Sparse): prune, then fine-tune below
            t0 = time.perf_counter()
            state, mask, prune_history = prune(s, data, device, stop, log)
            model.load_state_dict(state)
            train_seconds += time.perf_counter() - t0
            extra = {**mask, "prune_history": prune_history}
            log(f"pruned to {sum(map(len, mask['keep'].values()))} of {sum(mask['sizes'].values())} "
                f"channels; fine-tuning for {s.epochs} epochs")
        sync_model(model)
        if start == 0 and lead:  # the routing of the model before training: epoch 0
            row0 = {"epoch": 0, "routing": routing_snapshot(model, data, s, fresh=True)}
            if row0["routing"]:
                extra = {**extra, "routing_epoch0": row0["routing"]}
                log(format_routing(row0["routing"], "epoch 0 (before training): routing"))
                append_jsonl(out / "log.jsonl", row0)
        # Training forwards may go through torch.compile; checkpoints and evaluation use the module itself.
        net = compiled(model, s, device)
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            row = {"epoch": epoch + 1, **train_epoch(net, opts, data, s, epoch, device, stop, log)}
            sync_model(model)  # BatchNorm statistics of rank 0 everywhere
            train_seconds += time.perf_counter() - t0
            # the learning rate each parameter group ended the epoch with (routers and backbone may differ)
            row.update(seconds=round(time.perf_counter() - t0, 2),
                       **{f"lr_{g.get('name', 'scores')}": round(g["lr"], 6)
                          for o in opts.values() for g in o.param_groups})
            if not lead:
                continue
            if s.quick_eval_n and epoch + 1 < s.epochs:  # the final evaluation replaces the last one
                # on the validation split when there is one (settings are chosen there, not on the test set)
                split = "val" if data.eval_len(split="val") else "test"
                quick = evaluate(model, data, s, steps=10, limit=s.quick_eval_n, split=split)
                row.update(sa=quick["sa"], ra_pgd10=quick["ra"], quick_split=split)
            routing = routing_snapshot(model, data, s, (history[-1] if history else extra).get(
                "routing" if history else "routing_epoch0"))
            if routing:
                row["routing"] = routing
            history.append(row)
            log(format_row(row, s))
            save_checkpoint(ckpt_path, model, opts, s, epoch + 1, history, train_seconds, extra)
            append_jsonl(out / "log.jsonl", row)
    identical = ranks_identical(model)
    info = {"world_size": world, "ranks_identical": identical, "routing_epoch0": extra.get("routing_epoch0")}
    if s.method == "sparse":
        info["sparse"] = {"init": s.init or None, "prune_epochs": len(extra["prune_history"]),
                          "kept": {g: len(v) for g, v in extra["keep"].items()},
                          "prune_history": extra["prune_history"]}
    result = finish(model, data, s, out, history, train_seconds, device, log, info) if lead else None
    if world > 1:
        dist.barrier()
    return result


def starting_point(out: Path, model: nn.Module, opts: dict, s: Settings, rank: int, world: int, log):
    """(first epoch, history, training seconds so far, extra state): --resume from <out>/checkpoint.pt (a
    finished run's result.json is kept aside under its own name), else --init weights, else a fresh start."""
    ckpt_path = out / "checkpoint.pt"
    if s.resume and ckpt_path.exists():
        start, history, train_seconds, extra = load_checkpoint(ckpt_path, model, opts, s)
        log(f"resumed {ckpt_path} after epoch {start}")
        if rank == 0 and (out / "result.json").exists():
            kept = keep_aside(out / "result.json", f"result_epoch{start}")
            log(f"the result of epoch {start} is kept as {kept}")
        return start, history, train_seconds, extra
    if s.resume:
        log(f"--resume: no checkpoint in {out} yet, starting fresh")
    if s.init and s.method != "sparse":
        load_init(model, s.init, {k: getattr(s, k) for k in IDENTITY if k != "method"})
    if world > 1:
        torch.manual_seed(s.seed + rank)  # attack starts differ between processes
    return 0, [], 0.0, {}


def train_epoch(net: nn.Module, opts: dict, data, s: Settings, epoch: int, device, stop: list, log) -> dict:
    """One epoch of train_step; returns the epoch's mean statistics (one host sync, at the end)."""
    iters = data.train_len(s.batch_size)
    net.train()
    freeze_batchnorm(net, s.train_params)
    # Alg. 1 line 3: B_phi and B_psi come from two independent shuffles (NOTE(ours)).
    streams = STEPS[s.method][1]
    gens = [torch.Generator().manual_seed(s.seed * 1_000_003 + epoch * 7 + k) for k in range(streams)]
    sums, bad_step = {}, torch.full((), -1, device=device)
    progress = Progress(f"epoch {epoch + 1}/{s.epochs}", iters * s.batch_size * streams, log, s.log_every)
    for it, batches in enumerate(zip(*(data.train_batches(s.batch_size, g) for g in gens))):
        set_lr(opts, (epoch * iters + it) / (s.epochs * iters))
        with autocast(s, device):
            stats = train_step(net, opts, [(prep(x, s, device), y) for x, y in batches], s)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
        # remember the first non-finite step of either level without a host sync
        finite = torch.isfinite(stats["loss"]) & torch.isfinite(stats.get("router_loss", stats["loss"]))
        bad_step = torch.where((bad_step < 0) & ~finite, it, bad_step)
        progress((it + 1) * s.batch_size * streams, lambda: f"loss {sums['loss'].item() / (it + 1):.4f}")
        if stop:
            kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no epoch had finished"
            raise Interrupted(f"interrupted by {stop[0]} in epoch "
                              f"{epoch + 1}: {kept}; continue with --resume")
    if bad_step.item() >= 0:
        kept = f"kept the checkpoint of epoch {epoch}" if epoch else "no checkpoint was written"
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, iteration {bad_step.item() + 1}: "
                                 f"{kept}; lower --lr or check the data")
    return {k: round(v.item() / (it + 1), 4) for k, v in sums.items()}


def freeze_batchnorm(model: nn.Module, train_params: str):
    """--train-params: the frozen part's BatchNorms normalize with their running statistics and leave them
    fixed (eval mode). Routers frozen: the global router's BatchNorms; backbone frozen: every other one.
    (MoEConv's mode only selects its BatchNorm's statistics.)"""
    if train_params == "all":
        return
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, MoEConv)) and ("router" in name) == (train_params == "backbone"):
            m.eval()


class Progress:
    """A progress line at least every `every` seconds: what, done/total images, images per second, ETA."""

    def __init__(self, what: str, total: int, log, every: float = 30.0):
        self.what, self.total, self.log, self.every = what, total, log, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, details: Callable[[], str] = lambda: ""):
        now = time.perf_counter()
        if now - self.last < self.every or self.log is None:
            return
        self.last, rate = now, done / max(now - self.start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        self.log(f"  {self.what}: {done}/{self.total} images, {rate:.1f} img/s, ETA {eta:.0f} s "
                 f"{details()}".rstrip())


def prep(x: torch.Tensor, s: Settings, device: torch.device) -> torch.Tensor:
    """A batch of images as the model takes it: channels_last on CUDA (--channels-last), as it is
    elsewhere."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and s.channels_last else x


def format_row(row: dict, s: Settings) -> str:
    text = f"epoch {row['epoch']}/{s.epochs} loss {row['loss']:.4f} acc {100 * row['acc']:.1f} " \
           f"acc_adv {100 * row['acc_adv']:.1f}"
    if "router_loss" in row:
        text += f" router_loss {row['router_loss']:.4f}"
    if "sa" in row:
        text += f" | SA {row['sa']:.2f} RA(PGD-10) {row['ra_pgd10']:.2f}"
    if row.get("routing"):
        text += format_routing(row["routing"], " | routing")
    return text + f" | {row['seconds']:.1f}s"


def format_routing(r: dict, what: str) -> str:
    shares = sorted(r["top_share"])
    changed = f", majority changed in {r['majority_changed']}" if r.get("majority_changed") is not None else ""
    return f"{what}: collapsed {r['collapsed']}/{len(shares)}{changed}, top-expert share min {shares[0]:.2f} " \
           f"median {shares[len(shares) // 2]:.2f} max {shares[-1]:.2f}"


ROUTING_N = 256  # images of the per-epoch routing check


def routing_snapshot(model: nn.Module, data, s: Settings, previous: dict | None = None,
                     fresh: bool = False) -> dict | None:
    """The model's routing now (eval mode, clean inputs), on the first ROUTING_N images of the validation split
    (of the test set without one): per MoE layer the top expert's share and the majority expert, the number
    of collapsed layers (one expert takes >= 95%), pathway diversity, and the number of layers whose majority
    expert changed since `previous` (the last epoch's snapshot). None for a model without routers.
    fresh (epoch 0, before training): BatchNorm running statistics are not estimated yet, so a copy of the
    model normalizes with each batch's statistics (train mode), as the first training step will."""
    split = "val" if data.eval_len(split="val") else "test"
    device, choices = next(model.parameters()).device, []
    model = copy.deepcopy(model).train() if fresh else model
    with evaluating(model) if not fresh else contextlib.nullcontext(), torch.no_grad(), \
            torch.autocast(device.type, enabled=False):
        for x, _ in data.test_batches(s.eval_batch_size, ROUTING_N, split):
            _, gates = model(prep(x, s, device), return_routing=True)
            if not gates:
                return None
            choices.append(torch.stack([g.choice for g in gates], 1))          # (B, L)
    choice = torch.cat(choices)                                                 # (n, L)
    n_experts = gates[0].logits.shape[1]
    # f_{l,k}: share of the inputs layer l sends to expert k, (L, N)
    usage = F.one_hot(choice, n_experts).float().mean(0)
    top, majority = usage.max(1)
    snap = {"split": split, "images": len(choice), "top_share": [round(v, 4) for v in top.tolist()],
            "majority": majority.tolist(), "collapsed": int((top >= 0.95).sum()),
            "pathways": pathway_diversity(choice, n_experts)}
    if previous:
        snap["majority_changed"] = sum(a != b for a, b in zip(snap["majority"], previous["majority"]))
    return snap


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM end the run after the current iteration (the last epoch's checkpoint stays);
    the previous handlers come back afterwards."""
    stop: list = []

    def handler(signum, frame):
        stop.append(signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (e.g. a notebook worker)
            previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def average_gradients(params: list[nn.Parameter]):
    """Data parallelism under torchrun: the mean gradient over processes, in one flat all-reduce.
    NOTE(ours): explicit rather than a DistributedDataParallel wrapper, because each AdvMoE level
    back-propagates into its own parameters only, which DDP's reducer cannot follow. A parameter a
    process did not reach counts as a zero gradient there, so no process waits for it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def distributed(s: Settings) -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the process group when started by torchrun (WORLD_SIZE > 1),
    NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on the CPU."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), resolve_device(s.device)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def sync_model(model: nn.Module):
    """Every process takes rank 0's parameters and buffers (BatchNorm running statistics)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t, src=0)


def ranks_identical(model: nn.Module) -> bool | None:
    """Whether every process holds the same weights (checksums gathered from all ranks); None if alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    with torch.no_grad():
        mine = torch.stack([p.double().sum() for p in model.parameters()]).cpu()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return all(torch.equal(mine, other) for other in every)


# ==================================================================================================
# 9. AT(Sparse): robustness-aware channel pruning of a Dense network (HYDRA, for channels)
# ==================================================================================================
def channel_wiring(model: MoECNN) -> dict[nn.Module, tuple[tuple, str]]:
    """AT(Sparse)'s view of a backbone: for every layer that reads or writes the pathway's channels, (the
    channel groups its input concatenates, in order; the group it writes). Layers whose outputs are summed (a
    residual stream) write one group, so they keep the same channels and the pruned network is really r*C
    wide (NOTE(ours), deviation 8); a DenseNet layer reads the concatenation of every group before it. The
    stem reads RGB (no group); pre-activation BatchNorms and the classifier only read. Derived from the module
    structure, so the backbones carry no pruning wiring."""
    net, wire = model.backbone, {}
    if isinstance(net, (ResNet18, WideResNet)):
        # the index of the current residual stream: 1 if the stem feeds identity blocks (ResNet: the stem and
        # blocks 1-2's conv2 all write "stage1"); 0 if block 1 projects (WRN: the stem writes "stem" alone)
        stage = int(net.blocks[0].shortcut is None)
        stream = "stage1" if stage else "stem"
        wire[net.stem.conv] = ((), stream)
        for i, block in enumerate(net.blocks, 1):
            stage += block.shortcut is not None  # a projection shortcut starts the next stage's stream
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
                wire[layer["bn"]], wire[layer["conv"]] = (groups, ""), (groups, f"transition{transitions}")
                groups = (f"transition{transitions}",)
    if isinstance(net, (WideResNet, DenseNet)):
        wire[net.bn] = (groups, "")
    wire[net.fc] = (groups, "")
    return wire


def channel_groups(model: MoECNN) -> dict[str, int]:
    """Every channel group of a model (see channel_wiring) and its number of channels."""
    wire = channel_wiring(model)
    return {wire[m][1]: m.weight.shape[0] for m in model.modules() if isinstance(m, MoEConv)}


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k highest scores, 0 elsewhere; straight-through: d mask / d scores = identity (HYDRA)."""
    hard = torch.zeros_like(scores).scatter_(0, scores.topk(k).indices, 1.0)
    return hard + (scores - scores.detach())


class ChannelScores(nn.Module):
    """A Dense network whose channels are kept by learned importance scores, one per channel of every group:
    its forward is the Dense network with each group's top r*C channels kept (the others zeroed where they
    are read). The scores are the only parameters trained; the Dense weights stay frozen (its BatchNorm
    running statistics follow the masked network, as in HYDRA)."""

    def __init__(self, dense: MoECNN, ratio: float):
        super().__init__()
        self.dense, self.spec, self.wiring = dense, Spec(ratio), channel_wiring(dense)
        # HYDRA starts the scores in proportion to the weights: here the norm of the filters writing each
        # channel.
        # s_g[c] = sum over the convs writing group g of ||W[c]||_2, divided by its max: (C_g,) in (0, 1]
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

    def forward(self, x, return_routing: bool = False, dispatch: str = "auto", force=None):
        # m_g = 1[c among the top r*C_g of s_g] + s_g - sg(s_g): (C_g,) per group, straight-through
        masks = {g: top_k_mask(v, self.spec.width(len(v))) for g, v in self.scores.items()}

        def zero_pruned(layer, args):  # x -> x * m: the input channels `layer` does not keep are zeroed
            m = torch.cat([masks[g] for g in self.wiring[layer][0]]).to(args[0].dtype)      # (C_in,)
            return (args[0] * m.view(1, -1, *([1] * (args[0].dim() - 2))),) + args[1:]
        # every layer that consumes channels (a conv or the classifier; a BatchNorm is per channel) sees them
        # masked, for this forward only: the Dense network computes what the pruned network computes
        hooks = [m.register_forward_pre_hook(zero_pruned) for m, (reads, _) in self.wiring.items()
                 if reads and not isinstance(m, nn.BatchNorm2d)]
        try:
            return self.dense(x, return_routing, dispatch, force)
        finally:
            for h in hooks:
                h.remove()


def extract_sparse(dense: MoECNN, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruned network as a state dict of S-Dense's shape: each layer's kept output channels (rows) and
    kept input channels (columns) of the Dense weights. Pruned channels are removed, not masked, so what
    executes (and its GFLOPs) is an r*C-wide network; its outputs equal the masked Dense network's."""
    sizes, wiring = channel_groups(dense), channel_wiring(dense)

    def kept(groups: tuple) -> torch.Tensor:  # kept channels of a concatenation of groups, in its indices
        # offsets[i]: where group i starts in the concatenation; its kept indices shift by it
        offsets = [0] + torch.tensor([sizes[g] for g in groups]).cumsum(0).tolist()
        return torch.cat([keep[g].to(dense.mean.device) + o for g, o in zip(groups, offsets)])

    def bn_rows(bn: nn.BatchNorm2d, rows: torch.Tensor, prefix: str) -> dict:
        return {prefix + k: (v[rows] if v.dim() else v) for k, v in bn.state_dict().items()}

    state = {"mean": dense.mean, "std": dense.std}
    for name, m in dense.named_modules():
        if m not in wiring:
            continue
        reads, writes, prefix = *wiring[m], name + "."
        if isinstance(m, MoEConv):
            rows = kept((writes,))
            # the input channels it keeps (the stem reads RGB: all three)
            cols = kept(reads) if reads else torch.arange(m.weight.shape[1], device=rows.device)
            # W_sparse = W[kept rows][:, kept columns]: (r*C_out, r*C_in, k, k)
            state[prefix + "weight"] = m.weight[rows][:, cols]
            if m.bn is not None:
                state.update(bn_rows(m.bn, rows, prefix + "bn."))
        elif isinstance(m, nn.BatchNorm2d):  # pre-activation BatchNorm on the pathway
            state.update(bn_rows(m, kept(reads), prefix))
        else:  # the classifier
            state.update({prefix + "weight": m.weight[:, kept(reads)], prefix + "bias": m.bias})
    return {k: v.detach().clone() for k, v in state.items()}


def prune(s: Settings, data, device: torch.device, stop: list, log) -> tuple[dict, dict, list]:
    """AT(Sparse), phase 1: learn channel scores of the (--init) Dense network with the training loss
    (TRADES by default) for --prune-epochs, its weights frozen; then keep every group's top r*C channels.
    Returns the pruned S-Dense-shaped state dict, the mask (kept channels and group sizes), and the phase's
    per-epoch log. Phase 2,
    fine-tuning the weights with the mask fixed, is the ordinary training loop (train)."""
    dense = MoECNN(s.arch, data.num_classes, data.image_size, mean_std=MEAN_STD[s.dataset], width=s.width)
    dense = place(dense, s, device)
    if s.init:
        load_init(dense, s.init, {"dataset": s.dataset, "arch": s.arch, "method": "dense", "width": s.width},
                  f"<AT(Dense) {s.dataset} {s.arch} run>/checkpoint.pt")
    else:
        log("warning: --method sparse without --init: pruning starts from random weights (HYDRA prunes a "
            "trained model: pass --init <AT(Dense) run>/checkpoint.pt)")
    dense.requires_grad_(False)
    pruner = ChannelScores(dense, s.ratio)
    opt = torch.optim.SGD([{"params": list(pruner.scores.values()), "base_lr": s.lr}], lr=s.lr,
                          momentum=s.momentum, weight_decay=s.weight_decay)
    # the cosine schedule spans the pruning epochs; with --prune-epochs 0 none runs and the scores stay at the
    # filter norms (pruning by norm alone, then fine-tuning)
    phase = dataclasses.replace(s, epochs=max(s.prune_epochs, 1))
    history = []
    for epoch in range(s.prune_epochs):
        t0 = time.perf_counter()
        try:
            stats = train_epoch(pruner, {"all": opt}, data, phase, epoch, device, stop, log)
            row = {"epoch": epoch + 1, **stats}
        except Interrupted:  # nothing is saved before pruning ends
            raise Interrupted(f"interrupted by {stop[0]} in pruning epoch {epoch + 1}: no checkpoint is "
                              f"written before pruning ends; run the command again") from None
        row["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(row)
        log("prune " + format_row(row, phase))
    keep = pruner.keep()
    mask = {"keep": {g: v.tolist() for g, v in keep.items()}, "sizes": channel_groups(dense)}
    return extract_sparse(dense, keep), mask, history


def load_init(model: nn.Module, path: str, want: dict, hint: str = "a checkpoint of the same model"):
    """--init: start from another run's weights; `want` is what that run must have been."""
    ckpt = read_checkpoint(Path(path))
    theirs = {**ckpt["identity"], "method": ckpt["settings"]["method"]}
    check_identity(theirs, want, f"--init {path}", f"give {hint}")
    load_weights(model, ckpt["model"], path)


# ==================================================================================================
# 10. Files: results, atomic writes, run folders, checkpoints (data, not code), --eval-only
# ==================================================================================================
def finish(model, data, s: Settings, out: Path, history: list, train_seconds: float, device, log,
           extra: dict | None = None) -> dict:
    """Final evaluation (PGD-50, the other --eval-attacks, AutoAttack with --eval-aa, router utility with
    --iou-with) and result.json."""
    log(f"evaluating: SA and RA under PGD-{s.test_steps} on {s.eval_n or 'all'} test images"
        + (f", AutoAttack on {s.aa_n or 'all of them'}" if s.eval_aa else ""))
    t0 = time.perf_counter()
    utility = router_utility_tables(model, s.iou_with) if s.iou_with else None
    ev = evaluate(model, data, s, limit=s.eval_n, attacks=s.attacks, utility=utility, log=log)
    val = None
    if data.eval_len(split="val"):  # --val-n: the same attacks but AutoAttack, on the held-out images
        log(f"evaluating on the validation split ({data.eval_len(split='val')} images)")
        attacks = tuple(a for a in s.attacks if a != "autoattack")
        v = evaluate(model, data, s, attacks=attacks, split="val", log=log)
        val = {k: v[k] for k in ("sa", "ra", "ra_worst", "n", "attacks", "attack_n", "ra_worst_n")}
    x = next(data.test_batches(min(s.eval_batch_size, 64)))[0]
    result = {
        "dataset": s.dataset, "arch": s.arch, "method": s.method, "ratio": s.model_ratio,
        "n_experts": s.model_experts, "router": s.router if s.model_experts > 1 else None,
        "loss": s.loss, "epochs": len(history), "seed": s.seed, "eps": s.eps,
        "train_step_size": s.train_step_size, "train_steps": s.train_steps,
        "sa": ev["sa"], "ra": ev["ra"], "eval_n": ev["n"], "attack": ev["attack"], "attacks": ev["attacks"],
        "attack_n": ev["attack_n"], "ra_aa": ev["attacks"].get("autoattack"), "ra_worst": ev["ra_worst"],
        "ra_worst_n": ev["ra_worst_n"], "ra_worst_without_aa": ev["ra_worst_without_aa"],
        **({"router_utility": ev["router_utility"]} if "router_utility" in ev else {}),
        **({"autoattack": ev["autoattack"]} if "autoattack" in ev else {}), "val": val,
        "data": data_summary(s, data), "gflops": round(gflops_per_input(model, x), 4),
        "params": count_params(model), "routing": ev["routing"],
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
        "device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
        "command": command_line(s), **(extra or {}), "settings": dataclasses.asdict(s), "history": history,
    }
    write_json(out / "result.json", result)
    others = "".join(f"  {k} {v:.2f}" for k, v in result["attacks"].items() if not k.startswith("pgd"))
    log(f"SA {result['sa']:.2f}  RA {result['ra']:.2f}{others}  RA-worst {result['ra_worst']:.2f}  GFLOPs "
        f"{result['gflops']:.3f}  -> {out / 'result.json'}")
    return result


def non_default(s: Settings) -> list[str]:
    """The fields of s that differ from their defaults, in order. eps's default is its data set's; a step
    size's is the one derived from s's own eps and K (a derived value is not a choice)."""
    plain = Settings(dataset=s.dataset)
    derived = Settings(dataset=s.dataset, eps=s.eps, train_steps=s.train_steps)
    return [f.name for f in dataclasses.fields(s)
            if getattr(s, f.name) != getattr(derived if f.name.endswith("step_size") else plain, f.name)]


def command_line(s: Settings) -> str:
    """The command that reproduces a run: --dataset and the flags that differ from their defaults."""
    flags = [f"--{k.replace('_', '-')} {getattr(s, k)}" if not isinstance(getattr(Settings, k), bool) else
             f"--{'' if getattr(s, k) else 'no-'}{k.replace('_', '-')}" for k in ["dataset"] + non_default(s)]
    return "python advmoe.py " + " ".join(flags)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    head = Path(__file__).resolve().parent / ".git" / "HEAD"
    with contextlib.suppress(OSError):
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (head.parent / ref[5:]).read_text().strip()
        return ref
    return None


def atomic_write(path: Path, write: Callable[[str], None]):
    """Write through a temporary file in the same folder, then rename: never a half-written file, and when the
    write fails (a full disk) the previous file stays as it was. Permissions as a plain open() would give."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        raise RunFailed(f"cannot write {path} ({e.strerror}): the previous {path.name} is intact") from None
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch.save's zip writer raises RuntimeError on a full disk)
        why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:160]
        raise RunFailed(f"cannot write {path} ({why}): the previous {path.name} is intact; free "
                        f"space there and continue with --resume") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def append_jsonl(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


RUN_FILES = ("result.json", "checkpoint.pt", "log.jsonl")


@contextlib.contextmanager
def run_folder(out: Path, s: Settings, lead: bool = True):
    """The run's folder for its lifetime: created if missing (and removed again if the run stops before
    writing anything), locked against a second writer (an flock, released by the system however the process
    ends, so a lock left by a killed run is free again), and never replaced silently: a folder holding a run
    is refused unless --resume (training) or --overwrite."""
    if not lead:  # torchrun: rank 0 alone writes
        yield
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {out} ({e.strerror}): choose another "
                          f"--out") from None
    held = False
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (out / ".lock").read_text().strip() or "another process"
            raise ConfigError(f"--out {out} is in use by another run ({holder}): wait "
                              f"for it to end, or choose another --out") from None
        held = True
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        lock.flush()
        found = [f for f in RUN_FILES if (out / f).exists()]
        if found and s.overwrite:
            for f in found:
                (out / f).unlink()
        elif found and (s.eval_only or not s.resume):
            what = "an evaluation" if s.eval_only else "a run"
            raise ConfigError(f"--out {out} already holds {what} ({', '.join(found)}): choose another --out, "
                              + ("" if s.eval_only else "continue it with --resume, ")
                              + "or replace it with --overwrite")
        yield
    finally:
        if held:  # (a run refused the folder leaves the holder's lock alone)
            with contextlib.suppress(OSError):
                (out / ".lock").unlink()
        lock.close()
        if created and not any(out.iterdir()):  # stopped before writing anything: leave no empty folder
            out.rmdir()


def keep_aside(path: Path, stem: str) -> Path:
    """Rename path to <stem>.json (or <stem>_2.json, ...) in its folder, never over another file."""
    target, k = path.with_name(f"{stem}{path.suffix}"), 2
    while target.exists():
        target, k = path.with_name(f"{stem}_{k}{path.suffix}"), k + 1
    os.replace(path, target)
    return target


IDENTITY = ("dataset", "arch", "method", "model_ratio", "model_experts", "router", "width")


def save_checkpoint(path: Path, model, opts: dict, s: Settings, epoch: int, history: list,
                    train_seconds: float, extra: dict | None = None):
    """extra: what else the run needs (AT(Sparse): the mask, for --resume and --iou-with)."""
    state = {"settings": dataclasses.asdict(s), "identity": {k: getattr(s, k) for k in IDENTITY},
             "epoch": epoch, "history": history, "train_seconds": train_seconds, "extra": extra or {},
             "model": model.state_dict(), "opts": {k: o.state_dict() for k, o in opts.items()},
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


CHECKPOINT_KEYS = ("settings", "identity", "epoch", "history", "train_seconds", "model", "opts")


MODEL_FIELDS = ("arch", "method", "ratio", "n_experts", "router", "width")  # what a checkpoint's weights fit


# flags of the run itself and of evaluation: a --resume may change them (and --epochs); not the recipe
RUN_FIELDS = ("out", "resume", "overwrite", "eval_only", "device", "data_dir", "download", "amp",
              "channels_last", "train_dispatch", "cudnn_benchmark", "compile", "log_every", "eval_batch_size",
              "iou_with", "eval_aa", "aa_n")


EVAL_FIELDS = ("eval_n", "eval_attacks", "quick_eval_n", "square_queries", "test_steps", "test_step_size")


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by save_checkpoint, checked: anything else is a one-line ConfigError naming it."""
    path, fix = Path(path), "give the checkpoint.pt of a run of advmoe.py"
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist: give the "
                          f"path of a checkpoint.pt written by a run")
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a folder: give the checkpoint.pt inside it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # checkpoints are data, not code
    except Exception as e:  # truncated, empty, garbage, or a pickle that needs code
        raise ConfigError(f"checkpoint {path} cannot be read (torch.load: {type(e).__name__}): it is "
                          f"truncated, empty or not a torch file; {fix}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        lacks = ", ".join(k for k in CHECKPOINT_KEYS if k not in ckpt) if isinstance(ckpt, dict) \
            else "every key"
        raise ConfigError(f"checkpoint {path} is not a checkpoint of advmoe.py (a bare state_dict, or "
                          f"another program's file: it lacks {lacks}); {fix}")
    unknown = set(ckpt["settings"]) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise ConfigError(f"checkpoint {path} has settings this advmoe.py does not know "
                          f"({', '.join(sorted(unknown))}): it was written by another "
                          f"version; evaluate it with that version")
    return ckpt


def load_weights(model: nn.Module, state: dict, path) -> None:
    """model.load_state_dict, with a one-line ConfigError when the checkpoint's tensors do not fit the
    model."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)[:160]
        raise ConfigError(f"checkpoint {path} does not fit the model ({first[:160]}): "
                          f"give a checkpoint of the same model") from None


def check_identity(theirs: dict, want: dict, what: str, fix: str):
    """Refuse a checkpoint whose model differs from the one wanted, naming every difference."""
    diff = [f"{k} {theirs.get(k, 1.0 if k == 'width' else None)!r} != {v!r}" for k, v in want.items()
            if theirs.get(k, 1.0 if k == "width" else None) != v]  # (checkpoints from before --width: 1)
    if diff:
        raise ConfigError(f"{what} is from another model ({'; '.join(diff)}): {fix}")


def load_checkpoint(path: Path, model, opts: dict, s: Settings):
    ckpt = read_checkpoint(path)
    check_identity(ckpt["identity"], {k: getattr(s, k) for k in IDENTITY}, f"checkpoint {path}",
                   "use a matching --out or the same settings")
    recipe_flags = [f.name for f in dataclasses.fields(Settings)
                    if f.name not in RUN_FIELDS + EVAL_FIELDS + ("epochs",)]
    changed = [f"--{k.replace('_', '-')} {ckpt['settings'].get(k, getattr(Settings, k))} -> {getattr(s, k)}"
               for k in recipe_flags if ckpt["settings"].get(k, getattr(Settings, k)) != getattr(s, k)]
    if s.epochs < ckpt["epoch"]:
        raise ConfigError(f"--epochs {s.epochs} is below the {ckpt['epoch']} epochs {path} has trained: "
                          f"--resume continues a run; give --epochs {ckpt['epoch']} or more, or start a new "
                          f"--out")
    if changed:
        raise ConfigError(f"--resume would change the recipe of {path} ({'; '.join(changed)}): only "
                          f"--epochs and evaluation or run flags may change; give the values on the left, or "
                          f"start a new --out")
    load_weights(model, ckpt["model"], path)
    for k, o in opts.items():
        o.load_state_dict(ckpt["opts"][k])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    return ckpt["epoch"], ckpt["history"], ckpt["train_seconds"], ckpt.get("extra") or {}


def eval_only(s: Settings, log=print, given: set[str] | None = None) -> dict:
    """Evaluate a checkpoint at its own settings (model, data set, eps, test steps and step size, evaluation
    images and attacks), except the flags given on the command line (`given`; from Python, the fields of `s`
    that differ from their defaults) and the run's own flags (device, out, AutoAttack, ...)."""
    ckpt = read_checkpoint(Path(s.eval_only))
    theirs = ckpt["settings"]
    if given is None:
        given = set(non_default(s))
    clash = [f"--{k.replace('_', '-')} {getattr(s, k)} (the checkpoint's is "
             f"{theirs.get(k)})" for k in MODEL_FIELDS
             if k in given and getattr(s, k) != theirs.get(k, getattr(Settings, k))]
    if clash:
        raise ConfigError(f"--eval-only rebuilds the checkpoint's model: drop {', '.join(clash)}")
    values = {**theirs, **{k: getattr(s, k) for k in set(given) | set(RUN_FIELDS)}}
    if {"eps", "dataset"} & set(given):  # derive what was not given from the new eps / data set
        values.update({k: None for k in ("eps", "train_step_size", "test_step_size") if k not in given})
    s = Settings(**values)
    device = resolve_device(s.device)
    data = load_data(s, device)
    model = build_model(s, data.num_classes, data.image_size).to(device)
    load_weights(model, ckpt["model"], s.eval_only)
    out = Path(s.out or Path(s.eval_only).parent / "eval")
    # a training run's folder: its result stays
    if (out / "checkpoint.pt").exists() or (out / "log.jsonl").exists():
        out = out / "eval"
        log(f"--out holds a training run: this evaluation goes to {out}")
    with run_folder(out, s):
        return finish(model, data, s, out, ckpt["history"], ckpt["train_seconds"], device, log)


# ==================================================================================================
# 11. Report: every table of the paper from result.json files
# ==================================================================================================
METHOD_LABELS = {"sdense": "AT(S-Dense)", "sparse": "AT(Sparse)", "moe": "AT(MoE)", "advmoe": "AdvMoE",
                 "dense": "AT(Dense)", "standard": "standard (MoE)"}


TABLE1_METHODS = ("sdense", "sparse", "moe", "advmoe", "dense")  # rows of Table 1; Dense is the reference


STAGES = {"standard": "1. standard training of the MoE-CNN",
          "routers": "2. + AT of the routers (backbone frozen)",
          "backbone": "3. + AT of the backbone (routers frozen)"}


def trained(r: dict) -> bool:
    """A training run with every parameter trained (not an --eval-only re-evaluation, not a Sec. 4 stage)."""
    st = r["settings"]
    return not st.get("eval_only") and st.get("train_params", "all") == "all" and r["method"] != "standard"


def in_table1(r: dict) -> bool:
    """The paper's Table 1 protocol: N = 2 experts, r = 0.5 (Dense: r = 1)."""
    return trained(r) and r["method"] in TABLE1_METHODS and r["n_experts"] in (1, 2) and \
        r["ratio"] == (1.0 if r["method"] == "dense" else 0.5)


def md_table(head: list[str], rows: list[list], commands: list[dict]) -> list[str]:
    """A markdown table (blank cells where nothing was run), then the commands of the runs it shows."""
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    lines += ["", "<details><summary>commands and settings of these runs</summary>", ""]
    lines += [f"- `{r.get('command', '?')}` ({r['device']}, torch {r['torch']}, commit "
              f"{(r['commit'] or '?')[:10]}, {r['epochs']} epochs, eval on {r['eval_n']} "
              f"images)" for r in commands]
    return lines + ["", "</details>", ""]


def pick(results: list[dict], **want) -> dict | None:
    """The last run (by path) whose fields equal `want`; None (a blank cell) if there is none."""
    runs = [r for r in results if all(r.get(k) == v for k, v in want.items())]
    return runs[-1] if runs else None


def fmt(v, digits=2) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


REPORT_KEYS = ("dataset", "arch", "method", "ratio", "n_experts", "sa", "ra", "gflops", "settings", "routing")


def read_results(root: Path, warn=lambda text: print(text, file=sys.stderr)) -> list[dict]:
    """Every result.json below root, with its folder as "path"; a corrupt or incomplete one is skipped with a
    warning naming it (a run killed while writing, a file edited by hand), so one bad file costs one row."""
    results = []
    for p in sorted(root.rglob("result.json")):
        try:
            r = json.loads(p.read_text())
            missing = [k for k in REPORT_KEYS if k not in r] if isinstance(r, dict) else ["every key"]
            why = f"{', '.join(missing)} missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            missing, why = True, f"unreadable: {type(e).__name__}"
        if missing:
            warn(f"advmoe: warning: skipping {p} ({why}): not a complete result.json")
            continue
        results.append({**r, "path": str(p.parent.relative_to(root))})
    return results


def report(folder: str) -> str:
    """Markdown from every result.json below `folder`: Table 1 (SA, RA, GFLOPs; best RA of the same-cost
    methods in bold), Table 2 (AutoAttack), the N x r sweeps (Fig. 7, 8), the Sec. 4 study and 4-way split,
    routing under attack, recipes over seeds, router utility (Fig. 6) and every run. Blank cells were not run;
    nothing is filled in. When several runs fit one cell, the last by path is shown."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"report folder {folder} does not exist: give "
                          f"the folder holding the runs' result.json")
    results = read_results(root)
    if not results:
        raise ConfigError(f"no result.json below {folder}: train a run with --out inside it first")
    lines = [f"# Results in {folder}", ""]
    for section in (table1_section, table2_section, fig7_section, fig8_section, study_section,
                    routing_section, seeds_table, utility_section, runs_section):
        lines += section(results)
    text = "\n".join(lines)
    atomic_write(root / "report.md", lambda tmp: Path(tmp).write_text(text))
    return text


def table1_section(results: list[dict]) -> list[str]:
    """Table 1 per data set: SA, RA and GFLOPs of every method on every backbone (N = 2, r = 0.5);
    bold: the best RA at the pathway's cost (AT(Dense), the reference, excluded)."""
    lines = []
    table1 = [r for r in results if in_table1(r)]
    for dataset in sorted({r["dataset"] for r in table1}):
        archs = sorted({r["arch"] for r in table1 if r["dataset"] == dataset})
        cell = {(a, m): pick(table1, dataset=dataset, arch=a, method=m)
                for a in archs for m in TABLE1_METHODS}
        best = {}  # per backbone, the best RA at the pathway's cost (AT(Dense), the reference, excluded)
        for (a, m), c in cell.items():
            if c and m != "dense":
                best[a] = max(best.get(a, c["ra"]), c["ra"])
        rows = []
        for m in TABLE1_METHODS:
            row = [METHOD_LABELS[m]]
            for a in archs:
                c = cell[a, m]
                if not c:
                    row += [None] * 3
                    continue
                ra = f"**{c['ra']:.2f}**" if m != "dense" and c["ra"] == best.get(a) else fmt(c["ra"])
                row += [fmt(c["sa"]), ra, fmt(c["gflops"], 3)]
            rows.append(row)
        lines += [f"## Table 1: {dataset} (N = 2, r = 0.5; RA under PGD, steps in "
                  f"Runs; bold: best RA at the pathway's cost)", ""]
        lines += md_table(["method"] + [f"{a} {c}" for a in archs for c in ("SA", "RA", "GFLOPs")], rows,
                          [c for c in cell.values() if c])
    return lines


def table2_section(results: list[dict]) -> list[str]:
    """Table 2: every AutoAttack (standard) evaluation, with PGD's RA on the same images and the RA
    after each component; results of the older, weaker AutoAttack are named apart."""
    lines = []
    aa = [r for r in results if r.get("autoattack", {}).get("label") == "AutoAttack (standard)"]
    if aa:
        lines += ["## Table 2: AutoAttack (standard: APGD-CE, APGD-T, FAB-T 100 iterations, 9 targets; "
                  "Square 5000 queries)", "",
                  "RA (PGD) and RA-AA over the same images (the first AA images of the evaluation); "
                  "RA after each component, each run on the inputs still robust.", ""]
        rows = []
        for r in aa:
            parts = [fmt(c["ra_after"]) for c in r["autoattack"]["components"]]
            rows.append([r["path"], r["dataset"], r["arch"], METHOD_LABELS[r["method"]], fmt(r["sa"]),
                         fmt(r["autoattack"]["ra_pgd_same_images"]), fmt(r["ra_aa"]),
                         r["autoattack"]["images"]]
                        + parts + [f"{r['ra']:.2f} ({r['eval_n']})"])
        lines += md_table(["run", "dataset", "arch", "method", "SA", "RA (PGD)", "RA-AA", "images",
                           "after APGD-CE", "after APGD-T", "after FAB-T", "after Square",
                           "RA (PGD), all images (n)"], rows, aa)
    weak = [r for r in results if r.get("ra_aa") is not None and r not in aa]
    if weak:
        lines += ["Not in Table 2 (AutoAttack from torchattacks' AutoAttack(version='standard'), 10 "
                  "iterations, before commit c34d948: weaker than the standard "
                  "one): " + ", ".join(r["path"] for r in weak), ""]
    return lines


def fig7_section(results: list[dict]) -> list[str]:
    """Fig. 7: AdvMoE's RA over N (rows) and r (columns), per backbone."""
    lines = []
    sweep = [r for r in results if trained(r) and r["method"] == "advmoe"]
    for dataset, arch, runs in by_backbone(sweep):
        ns, ratios = sorted({r["n_experts"] for r in runs}), sorted({r["ratio"] for r in runs})
        if len(ns) * len(ratios) < 2:
            continue
        lines += [f"## Fig. 7: AdvMoE RA over N (rows) and r (columns), {dataset} {arch}", ""]
        cells = {(n, q): pick(runs, n_experts=n, ratio=q) for n in ns for q in ratios}
        rows = [[n] + [fmt(cells[n, q]["ra"]) if cells[n, q] else None for q in ratios] for n in ns]
        lines += md_table(["N"] + [f"r = {q:g}" for q in ratios], rows, [c for c in cells.values() if c])
    return lines


def fig8_section(results: list[dict]) -> list[str]:
    """Fig. 8: SA / RA of every method over r (N = 2), per backbone, AT(Dense) beside them."""
    lines = []
    fig8 = [r for r in results if trained(r) and r["n_experts"] in (1, 2) and r["method"] in TABLE1_METHODS]
    for dataset, arch, runs in by_backbone(fig8):
        ratios = sorted({r["ratio"] for r in runs if r["method"] != "dense"})
        if len(ratios) < 2:
            continue
        methods = [m for m in TABLE1_METHODS if m != "dense"]
        cells = {(q, m): pick(runs, ratio=q, method=m) for q in ratios for m in methods}
        dense = pick(runs, method="dense")
        lines += [f"## Fig. 8: SA / RA over r (N = 2), {dataset} {arch}", ""]
        rows = []
        for q in ratios:
            row = [f"{q:g}"]
            for c in [cells[q, m] for m in methods] + [dense]:
                row.append(f"{c['sa']:.2f} / {c['ra']:.2f}" if c else None)
            rows.append(row)
        lines += md_table(["r"] + [METHOD_LABELS[m] for m in methods] + ["AT(Dense), r = 1"], rows,
                          [c for c in list(cells.values()) + [dense] if c])
    return lines


def study_section(results: list[dict]) -> list[str]:
    """The Sec. 4 study (Insights 1-3): standard training, then AT of the routers or of the backbone,
    with the 4-way split of PGD examples; Table 1's runs of the backbone as references."""
    lines = []
    study = [r for r in results
             if r["method"] == "standard" or r["settings"].get("train_params", "all") != "all"]
    for dataset, arch, runs in by_backbone(study):
        stages = []  # (stage label, run): standard training, then the routers or the backbone adversarially
        for r in runs:
            stage = "standard" if r["method"] == "standard" else r["settings"]["train_params"]
            stages.append((STAGES[stage], r))
        for m in TABLE1_METHODS:
            if c := pick([r for r in results if in_table1(r)], dataset=dataset, arch=arch, method=m):
                stages.append((f"reference: {METHOD_LABELS[m]}", c))
        lines += [f"## Sec. 4 study (Insights 1-3): {dataset} {arch}", "",
                  "4-way split of PGD examples, % of the test images classified correctly when clean: (1) neither routers nor prediction fooled, "
                  "(2) routers only, (3) prediction only, (4) both. Router robustness "
                  "= (1)+(3), MoE robustness = (1)+(2).", ""]
        rows = [[label, fmt(r["sa"]), fmt(r["ra"])] + split_cells(r)
                for label, r in sorted(stages, key=lambda t: t[0])]
        lines += md_table(["stage", "SA", "RA", "router robustness", "MoE robustness", "(1)", "(2)", "(3)",
                           "(4)"], rows, [r for _, r in stages])
    return lines


def routing_section(results: list[dict]) -> list[str]:
    """Routing under attack, every MoE run: the 4-way split, the flip rate, pathway diversity."""
    lines = []
    moes = [r for r in results if r["routing"]]
    if moes:
        lines += ["## Routing under attack (4-way split of PGD examples, every MoE run)", ""]
        rows = []
        for r in moes:
            rows.append([r["path"], METHOD_LABELS[r["method"]], fmt(r["sa"]), fmt(r["ra"])] + split_cells(r)
                        + [fmt(r["routing"]["flip_rate_any_layer"], 3), pathway_cell(r, "clean"),
                           pathway_cell(r, "adv")])
        lines += md_table(["run", "method", "SA", "RA", "router robustness", "MoE robustness", "(1)", "(2)",
                           "(3)", "(4)", "flip rate", "pathways clean", "pathways PGD"], rows, moes)
    return lines


def utility_section(results: list[dict]) -> list[str]:
    """Fig. 6: router utility, the IoU of each input's pathway with the AT(Sparse) mask."""
    lines = []
    utility = [r for r in results if "router_utility" in r]
    if utility:
        lines += ["## Fig. 6: router utility, IoU of each input's pathway with the AT(Sparse) mask", "",
                  "Histogram: inputs per IoU bin [0, 0.1), ..., [0.9, 1.0].", ""]
        lines += ["Read the IoU against a random pathway's (the same channel counts, drawn at random): the "
                  "two models are trained separately and correspond by channel position only. The paper's "
                  "point is pathway diversity: how many distinct pathways the inputs take, and the entropy "
                  "of their distribution (bits; 0 = one pathway for all).", ""]
        rows = []
        for r in utility:
            u = r["router_utility"]
            rows.append([r["path"], METHOD_LABELS[r["method"]], fmt(u["clean"]["mean"], 3),
                         fmt(u["adv"]["mean"], 3),
                         fmt(u.get("random_pathway", {}).get("mean"), 3), pathway_cell(r, "clean"),
                         pathway_cell(r, "adv"), u["clean"]["histogram"], u["adv"]["histogram"]])
        lines += md_table(["run", "method", "mean IoU clean", "mean IoU PGD", "random pathway",
                           "pathways clean", "pathways PGD", "histogram clean", "histogram PGD"],
                          rows, utility)
    return lines


def runs_section(results: list[dict]) -> list[str]:
    """Every run: recipe, SA, RA under each attack, RA-worst, GFLOPs, device, torch and commit."""
    lines = []
    lines += ["## Runs", "",
              "RA: the paper's PGD; other attacks (--eval-attacks, --eval-aa) and RA-worst (robust "
              "under every attack run) beside it.", ""]
    rows = []
    for r in results:
        others = ", ".join(f"{k} {v:.2f}" for k, v in r.get("attacks", {}).items() if not k.startswith("pgd"))
        rows.append([r["path"], r["dataset"], r["arch"], r["method"], f"{r['ratio']:g}", r["n_experts"],
                     r["router"] or "", r["epochs"], fmt(r["sa"]), fmt(r["ra"]), r["attack"], others,
                     fmt(r.get("ra_worst")), fmt(r["gflops"], 3), r["device"], r["torch"],
                     (r["commit"] or "")[:10]])
    lines += md_table(["run", "dataset", "arch", "method", "r", "N", "router", "epochs", "SA", "RA", "attack",
                       "RA per attack", "RA-worst", "GFLOPs", "device", "torch", "commit"], rows, results)
    return lines


def by_backbone(results: list[dict]) -> Iterator[tuple[str, str, list[dict]]]:
    """(data set, backbone, its runs) for every pair that has runs, in order."""
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in results}):
        yield dataset, arch, [r for r in results if (r["dataset"], r["arch"]) == (dataset, arch)]


def recipe(r: dict) -> tuple:
    """What a run trained and how it was measured, without its seed and run flags (AutoAttack is a column of
    its own): runs of one recipe differ by seed only."""
    skip = set(RUN_FIELDS) | {"seed", "quick_eval_n"}
    return tuple(sorted((k, str(v)) for k, v in r["settings"].items() if k not in skip))


def seeds_table(results: list[dict]) -> list[str]:
    """Where some recipe was run with several seeds, every recipe: the mean over its seeds of SA, RA under
    each attack, RA-worst (test and validation), AutoAttack, routing collapse and pathway diversity, +- half
    the range between seeds."""
    groups: dict[tuple, list] = {}
    for r in results:
        if trained(r):
            groups.setdefault(recipe(r), []).append(r)
    if not any(len({r["seed"] for r in v}) > 1 for v in groups.values()):
        return []

    def cell(values, digits=2):
        values = [v for v in values if v is not None]
        if not values:
            return None
        mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
        return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 else "")

    def collapsed(r):  # layers where one expert takes at least 95% of the clean test images
        return sum(max(u) >= 0.95 for u in r["routing"]["usage_clean"]) if r["routing"] else None

    rows = []
    for runs in groups.values():
        r0, st = runs[0], runs[0]["settings"]
        routing = f"balance {st['balance']:g}, router lr x{st['router_lr']:g}" if r0["routing"] else ""
        square = [r["attacks"].get("square") for r in runs]
        rows.append([METHOD_LABELS[r0["method"]], routing, ", ".join(str(r["seed"]) for r in runs),
                     cell([r["sa"] for r in runs]), cell([r["ra"] for r in runs]), cell(square),
                     cell([worst_without_aa(r) for r in runs]),
                     cell([(r.get("val") or {}).get("ra_worst") for r in runs]),
                     cell([r.get("ra_aa") for r in runs]), fmt(r0["gflops"], 4),
                     cell([collapsed(r) for r in runs], 1) if r0["routing"] else None,
                     cell([r["routing"]["pathways"]["clean"]["entropy_bits"] for r in runs
                           if r["routing"].get("pathways")]) if r0["routing"] else None])
    lines = ["## Recipes over seeds (mean ± half the range where there are several)", "",
             "RA-worst: robust under PGD and every other attack but AutoAttack, on every evaluation image "
             "(test; val = the held-out training images, every attack but AutoAttack). RA-AA: on the "
             "first --aa-n images. "
             "Collapsed: MoE layers where one expert takes >= 95% of the clean test images (of "
             f"{len(next(iter(groups.values()))[0]['routing'].get('usage_clean', [])) or '?'}). "
             "Pathway entropy in bits (clean test images).", ""]
    return lines + md_table(["method", "routing", "seeds", "SA", "RA (PGD)", "Square", "RA-worst",
                             "val RA-worst", "RA-AA", "GFLOPs", "collapsed layers", "pathway entropy"], rows,
                            [r for runs in groups.values() for r in runs])


def worst_without_aa(r: dict) -> float | None:
    """RA-worst over every attack but AutoAttack, on all evaluation images (older results: when no AutoAttack
    ran, RA-worst is that number)."""
    return r.get("ra_worst_without_aa", None if "autoattack" in r.get("attacks", {}) else r["ra_worst"])


def pathway_cell(r: dict, which: str) -> str | None:
    """'distinct pathways / entropy in bits' of a run's inputs (clean or under PGD)."""
    p = r["routing"].get("pathways", {}).get(which) if r["routing"] else None
    return f"{p['distinct']} / {p['entropy_bits']:.2f}" if p else None


def split_cells(r: dict) -> list:
    rt = r["routing"]
    if not rt:
        return [None] * 6
    return [fmt(rt["router_robustness"]), fmt(rt["moe_robustness"])] + \
        [fmt(v) for v in rt["split_4way"].values()]


# ==================================================================================================
# 12. Bench: speed and cost, measured
# ==================================================================================================
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 datasheet rates


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                        repeats: int) -> dict[str, float]:
    """Median wall time of each fn, timed round-robin (A, B, C, A, B, C, ...) so that a machine whose speed
    drifts (a shared CPU, GPU clocks) biases no case against another. CUDA events on the GPU (after
    warm-up), perf_counter on the CPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench(argv: list[str], log=print) -> dict:
    """Training throughput (upper-level images/s through a whole step, attack included) of the four methods,
    inference throughput and latency of Dense / S-Dense / MoE, GFLOPs as executed, and achieved FLOP/s."""
    p = Parser(prog="advmoe.py bench", description=bench.__doc__, epilog=(
        "Every other flag is a training flag (python advmoe.py --help): --device, --batch-size (each of "
        "B_phi and B_psi), --router, --amp, --cudnn-benchmark, --train-dispatch (also the timed "
        "inference's), --compile, ..."))
    p.add_argument("--arch", default="resnet18", help=f"one of {', '.join(ARCHS)}, or 'all'")
    p.add_argument("--out", default="", help="JSON file to write (a .md table is written beside it)")
    p.add_argument("--infer-batch", type=int, default=0, help="large inference "
                                                              "batch (0: 1024 on GPU, 64 on CPU)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats, "
                                                          "median reported (0: 20 GPU / 5 CPU)")
    p.add_argument("--methods", default="dense,sdense,moe,advmoe", help="comma-separated methods (AT(Sparse) "
                   "fine-tunes S-Dense's shape: its step is S-Dense's)")
    p.add_argument("--skip-train", action="store_true", help="inference, latency and GFLOPs only")
    a, rest = p.parse_known_args(argv)
    base = parse_settings(["--dataset", "synthetic", "--quick-eval-n", "0", *rest])  # random inputs, no data
    device = resolve_device(base.device)
    gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = gpu and base.cudnn_benchmark
    if a.repeats < 0 or a.infer_batch < 0:
        raise ConfigError(f"--repeats {a.repeats} and --infer-batch {a.infer_batch} must be 0 (the device's "
                          f"default) or more")
    infer_batch, repeats = a.infer_batch or (1024 if gpu else 64), a.repeats or (20 if gpu else 5)
    archs = ARCHS if a.arch == "all" else (a.arch,)
    if any(arch not in ARCHS for arch in archs):
        raise ConfigError(f"unknown --arch {a.arch!r}: choose one of {', '.join(ARCHS)} or all")
    unknown = [m for m in a.methods.split(",") if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown --methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    name = device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if (gpu and base.amp) else None
    rows, warmup = [], (3 if gpu else 1)
    torch.manual_seed(0)
    for arch in archs:
        steps, infers, by = {}, {}, {}
        for method in a.methods.split(","):
            s = replace(base, arch=arch, method=method)
            model = place(build_model(s, 10, 32), s, device)
            net = compiled(model, s, device)
            data = [(prep(torch.rand(s.batch_size, 3, 32, 32, device=device), s, device),
                     torch.randint(10, (s.batch_size,), device=device)) for _ in range(STEPS[method][1])]
            opts = make_optimizers(model, s, device)
            steps[method] = bench_step(net, opts, data, s, device)
            by[method] = {"arch": arch, "method": method}
            if not a.skip_train:
                # counted on the eager model (a compiled one runs no operator a dispatch mode can see)
                by[method]["ops_train_step"] = count_ops(bench_step(model, opts, data, s, device))
            if method != "advmoe":  # inference of Dense, S-Dense, MoE (AdvMoE's model is the MoE's)
                by[method]["gflops"] = round(gflops_per_input(model.eval(), data[0][0][:16]), 4)
                for b in (infer_batch, 1, 32):
                    x = prep(torch.rand(b, 3, 32, 32, device=device), s, device)
                    # Balanced routing (inputs alternate between experts; the routers still run): the
                    # grouping's worst case, independent of what the briefly trained routers happen to do.
                    balanced = torch.arange(b, device=device) % s.model_experts
                    infers[method, b] = bench_inference(model, x, balanced, s, device)
                by[method]["ops_infer_forward"] = count_ops(infers[method, infer_batch])
        if not a.skip_train:
            for method, t in interleaved_medians(steps, device, warmup, repeats).items():
                by[method].update(train_img_s=round(base.batch_size / t, 1), train_step_ms=round(1000 * t, 2),
                                  epoch_s_cifar=round(50000 / base.batch_size * t, 1))
        for (method, b), t in interleaved_medians(infers, device, warmup, repeats).items():
            row = by[method]
            if b == infer_batch:
                row["infer_img_s"] = round(b / t, 1)
                row["achieved_tflops"] = round(row["gflops"] * b / t / 1e3, 2)
                row["fraction_of_peak"] = round(row["achieved_tflops"] / peak, 4) if peak else None
            else:
                row[f"latency_ms_b{b}"] = round(1000 * t, 3)
        if "dense" in by:
            for r in by.values():
                if "infer_img_s" in r:
                    r["infer_speedup_vs_dense"] = round(r["infer_img_s"] / by["dense"]["infer_img_s"], 2)
        if "sdense" in by and "advmoe" in by and not a.skip_train:
            ratio = by["advmoe"]["train_step_ms"] / by["sdense"]["train_step_ms"]
            by["advmoe"]["step_time_vs_sdense"] = round(ratio, 2)
        # (with --skip-train, AdvMoE has nothing of its own)
        measured = [r for r in by.values() if len(r) > 2]
        rows += measured
        for r in measured:
            log(json.dumps(r))
    result = {"device": name, "torch": torch.__version__, "commit": git_commit(), "batch": base.batch_size,
              "infer_batch": infer_batch, "repeats": repeats, "amp": base.amp and gpu, "router": base.router,
              "cudnn_benchmark": gpu and base.cudnn_benchmark,
              "train_dispatch": base.train_dispatch, "compile": base.compile,
              "peak_tflops": peak, "rows": rows}
    table = bench_table(result)
    log(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, result)
        atomic_write(out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table))
    return result


class OpCounter(TorchDispatchMode):
    """Counts the ATen operator calls that compute, made while active (forward and backward); views (reshape,
    transpose, slicing, detach), which launch no kernel, are left out."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> int:
    """Operator calls of one call of fn. On a launch-bound GPU each is about one kernel launch (and a host
    sync stalls the queue between them), so this count, measurable on the CPU, is the number to drive down."""
    with OpCounter() as counter:
        fn()
    return counter.calls


def bench_step(net, opts, data, s: Settings, device) -> Callable[[], None]:
    def step():
        net.train()
        with autocast(s, device):
            train_step(net, opts, data, s)
    return step


def bench_inference(model, x, force, s: Settings, device) -> Callable[[], None]:
    def infer():
        model.eval()
        with torch.no_grad(), autocast(s, device):
            model(x, dispatch=s.train_dispatch, force=force)
    return infer


def bench_table(result: dict) -> str:
    cols = ("arch", "method", "ops_train_step", "ops_infer_forward", "train_img_s", "train_step_ms",
            "epoch_s_cifar", "step_time_vs_sdense", "gflops",
            "infer_img_s", "infer_speedup_vs_dense", "latency_ms_b1", "latency_ms_b32", "achieved_tflops",
            "fraction_of_peak")
    head = (f"bench on {result['device']}, torch {result['torch']}, commit {(result['commit'] or '?')[:10]}, "
            f"train batch {result['batch']}, inference batch {result['infer_batch']}, bf16 {result['amp']}, "
            f"router {result['router']}, training dispatch {result['train_dispatch']}, cudnn.benchmark "
            f"{result['cudnn_benchmark']}, median of {result['repeats']} (cases timed in turn)\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    return head + "\n".join(lines) + "\n"


# ==================================================================================================
# 13. Command line
# ==================================================================================================
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["report"]:
            if len(argv) == 2 and argv[1] in ("-h", "--help"):
                print("usage: python advmoe.py report DIR\n\nWrite DIR/report.md (and print it): every table "
                      "of the paper from the result.json files below DIR. A corrupt or incomplete "
                      "result.json is skipped with a warning.")
                return 0
            if len(argv) != 2:
                raise ConfigError("usage: python advmoe.py report DIR (the folder holding the runs)")
            print(report(argv[1]), end="")
        elif argv[:1] == ["bench"]:
            bench(argv[1:])
        else:
            s = parse_settings(argv)
            eval_only(s, given=given_flags(argv)) if s.eval_only else train(s)
    except ConfigError as e:
        print(f"advmoe: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, RunFailed) as e:
        print(f"advmoe: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"advmoe: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside training's own handler: loading, the final evaluation, report
        print("advmoe: interrupted: nothing more was written (a run's last checkpoint is kept; evaluate it "
              "with --eval-only, or continue it with --resume)", file=sys.stderr)
        return 130
    return 0


def interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM ends the CLI as Ctrl-C does (training saves first)
    sys.exit(main())
