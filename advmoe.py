#!/usr/bin/env python3
"""AdvMoE: adversarially robust training of sparse Mixture-of-Experts CNNs, in one readable file.
Reference implementation of Zhang, Cai, Chen, Zhang, Zhang, Chen, Chang, Wang, Liu, "Robust Mixture-of-Expert
Training for Convolutional Neural Networks", ICCV 2023, arXiv:2308.10110. The paper's claim: router-expert
alternating adversarial training (Eq. 1, Algorithm 1) makes an MoE-CNN more robust than AT(S-Dense),
AT(Sparse) and AT(MoE) at S-Dense's inference cost (Table 1).
Usage
    python advmoe.py --dataset cifar10 --arch resnet18 --method advmoe      # train + evaluate one model
    python advmoe.py --dataset synthetic --width 0.25 --epochs 3 --out runs/try   # offline, on a CPU
    python advmoe.py --eval-only runs/try/checkpoint.pt                    # evaluate a checkpoint again
    python advmoe.py report runs/                                          # the tables, from result.json
    python advmoe.py bench --device cuda                                   # step time, images/s, GFLOPs
    torchrun --nproc_per_node=8 advmoe.py --dataset imagenet ...          # several GPUs
    bash train_all.sh                                # Tables 1-2, Figs. 7-8, Sec. 4 (not Fig. 6, Table 3)
Notation (paper -> code)
    psi      backbone and experts: every parameter whose name has no "router"    backbone_params()
    phi      routers (one per MoE layer, or the one global router)               router_params()
    N, r     experts per MoE layer; an expert has r*C filters                     --n-experts, --ratio
    S-Dense  the backbone with every layer's C channels times r
    eps      l_inf radius on inputs in [0,1] (8/255 on CIFAR; the model normalizes them itself)
    K        PGD steps in training (2); 50 at test time                        --train-steps, --test-steps
    beta     TRADES weight 1/lambda (6)                                         BETA
Map (read in order; the method is sections 1-5)
    1. Fig. 1a / A1: the MoE layer, MoEConv
    2. Eq. (1), Algorithm 1: advmoe_step; the baselines: joint_step; AT(Sparse)'s idea
    3. The attack and the loss Algorithm 1 calls: pgd, trades_loss
    4. Backbones: Spec makes Dense, S-Dense or an MoE-CNN of each of four; MoECNN wraps them
    5. Evaluation: SA, RA (PGD-50), RA-AA, the routing under attack (Insight 2), GFLOPs
    6. Beside the method: masked and soft forwards, AutoAttack, the global router, the routing regularizers
    7-14. Operations: settings, data, the training loop, AT(Sparse)'s pruning, files, report, bench, CLI
    Deviations from the paper: listed at the end of the file, marked NOTE(ours) where made (the main one:
    14, the default MoE recipe); NOTE(official code), NOTE(paper): what the authors' code or the paper does.
"""
from __future__ import annotations

import argparse, contextlib, copy, dataclasses, datetime, functools, importlib, inspect, json, math, os
import subprocess, sys, time
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
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "synthetic": ((0.5,) * 3, (0.25,) * 3)}

# ==================================================================================================
# 1. The MoE layer: router, top-1 gate with a straight-through estimator, channel-expert convolution
# ==================================================================================================
# An MoE layer (Fig. 1a) replaces one convolution of the backbone with N experts of r*C filters each (one
# weight of N*r*C filters); a small router looks at the layer's input and picks one expert per input
# (top-1, hard). Every input is thus computed by a pathway of r*C channels per layer, S-Dense's width.
# The choice is an argmax, so it has no gradient: the straight-through estimator below gives the router one.
# Gate: one MoE layer's routing decision for a batch: logits (B, N) router scores, choice (B,) the chosen
# expert e(b), scale (B,) the router's straight-through factor (top1_gate).
Gate = NamedTuple("Gate", [("logits", torch.Tensor), ("choice", torch.Tensor), ("scale", torch.Tensor)])

def top1_gate(logits: torch.Tensor, random: torch.Generator | None = None) -> Gate:
    """Hard top-1 routing: each input goes to its highest-scoring expert (softmax in float32). random: a
    uniformly random expert instead (evaluation's "does routing matter" check)."""
    probs = logits.float().softmax(-1)                                        # (B, N)
    choice = probs.argmax(-1) if random is None else torch.randint(
        probs.shape[1], probs.shape[:1], generator=random, device=probs.device)  # (B,)
    p = probs.gather(1, choice[:, None]).squeeze(1)                           # (B,) p_{e(b)}
    # s_b = 1 + p_{e(b)} - sg(p_{e(b)}) (sg: stop-gradient, detach): value 1, gradient that of p_{e(b)}, so
    # with y_b = s_b E_{e(b)}(x_b) (E_e: expert e's conv + BatchNorm) the router gets dL/dp_{e(b)} =
    # <dL/dy_b, E_{e(b)}(x_b)>: SGD raises p_{e(b)} where scaling that expert's output up would lower the loss
    # NOTE(official code): theirs passes the hard one-hot's gradient to the raw scores, skipping the softmax
    return Gate(logits, choice, 1.0 + (p - p.detach()))

def straight_through(y: torch.Tensor, gate: Gate) -> torch.Tensor:
    """y_b * s_b: the chosen expert's output in value, the router's gradient in the backward pass (with no
    graph to carry it, e.g. under torch.no_grad, s_b is a plain 1 and is skipped)."""
    return y * gate.scale.to(y.dtype)[:, None, None, None] if gate.scale.requires_grad else y

@dataclasses.dataclass
class Routing:
    """The routing of one forward pass, passed down by the model's forward; each MoE layer appends its Gate.
    Nothing is stored on a module, so TRADES' clean and adversarial forwards never mix their routings. A
    first read: dispatch "sparse", shared and random None."""
    dispatch: str                           # "sparse" here; "masked" | "soft": section 6
    gates: list = dataclasses.field(default_factory=list)
    shared: Gate | None = None              # the global router's gate, used by every layer (section 6)
    random: torch.Generator | None = None   # route to uniformly random experts (evaluation, section 5)

def standardize(z: torch.Tensor) -> torch.Tensor:
    """NOTE(ours), deviation 2: pooled post-ReLU features share a large positive mean, so a plain linear
    router gives every input nearly the same logits (many layers send 95% to one expert before training);
    standardized per input, the logits depend on which channels respond, not how strongly."""
    # z_b <- (z_b - mean_c z_bc) / sqrt(var_c z_bc + 1e-5), (B, C)
    return F.layer_norm(z, z.shape[1:])

def router_head(cin: int, n_experts: int) -> nn.Linear:
    """A router's linear map to N logits: no bias (it would prefer one expert for every input) and a small
    init, so the probabilities start near 1/N and the first choices follow the input's features."""
    head = nn.Linear(cin, n_experts, bias=False)
    nn.init.normal_(head.weight, 0.0, 0.01)
    return head

class MoEConv(nn.Module):
    """A conv (and its BatchNorm) with N experts of `cout` (= r*C) filters each; a router picks one expert per
    input (Fig. 1a). With N = 1 it is a plain conv (Dense, S-Dense).
    NOTE(ours), deviation 3 (the paper: experts as sub-networks of one backbone): expert e owns filters
    [e*cout, (e+1)*cout) of one (N*cout, cin, k, k) weight; all experts write the same cout channels, and the
    next conv reads them whichever expert ran. A first read: core and shared_bn off, so
    W_e = weight[rows(e)] with its own BatchNorm (the default adds a shared core, deviation 14)."""
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, n_experts: int, bn: bool, router: bool,
                 shared_bn: bool = False, standardized: bool = True, core: bool = False):
        super().__init__()
        self.cout, self.stride, self.padding, self.n = cout, stride, kernel // 2, n_experts
        self.shared_bn, self.standardized = shared_bn and n_experts > 1, standardized
        self.weight = nn.Parameter(torch.empty(n_experts * cout, cin, kernel, kernel))
        # Kaiming (fan_out) of one expert as a standalone conv: std = sqrt(2 / (cout * k * k))
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (cout * kernel * kernel)))
        # NOTE(ours), deviation 14 (a first read skips it): a core W_shared; `weight` then holds D_e = 0
        self.core = nn.Parameter(self.weight.detach()[:cout].clone()) if core and n_experts > 1 else None
        if self.core is not None:
            nn.init.zeros_(self.weight)
        # NOTE(ours), deviation 1: a BatchNorm per expert, stored as one BatchNorm over N*cout channels;
        # --shared-bn: one BatchNorm over the pathway's cout channels for every expert (the authors' code).
        self.bn = nn.BatchNorm2d(cout if self.shared_bn else n_experts * cout) if bn else None
        # the per-layer router (Fig. A1) on the layer's pooled input: router_head (above)
        self.router = router_head(cin, n_experts) if (router and n_experts > 1) else None
    def rows(self, e: int) -> slice:
        """Expert e's filters (and BatchNorm channels)."""
        return slice(e * self.cout, (e + 1) * self.cout)
    def filters(self, rows: slice = slice(None)) -> torch.Tensor:
        """The filters of `rows` (whole experts): W_e (with a core, W_shared + D_e: still one conv)."""
        w = self.weight[rows]                                                     # (len(rows), cin, k, k)
        return w if self.core is None else w + self.core.repeat(len(w) // self.cout, 1, 1, 1)
    def conv(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's filters: (b, cin, H, W) -> (b, cout, H', W')."""
        return F.conv2d(x, self.filters(self.rows(e)), None, self.stride, self.padding)
    def normalize(self, y: torch.Tensor, s: slice) -> torch.Tensor:
        """The BatchNorm's channels s on y (batch statistics in training, running ones in eval). A slice of a
        buffer is a view, so F.batch_norm's in-place update of the running statistics reaches the buffer."""
        bn = self.bn
        return y if bn is None else F.batch_norm(y, bn.running_mean[s], bn.running_var[s], bn.weight[s],
                                                  bn.bias[s], self.training, bn.momentum, bn.eps)
    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        # N = 1 (Dense, S-Dense, a shared conv): the conv and its BatchNorm, nothing routed
        if self.n == 1:
            return self.normalize(self.conv(x, 0), slice(None))
        # g_l(x) = top1(softmax(W_l std(GAP(x)))) (std: standardize), or the global router's one gate
        pooled = x.mean((2, 3))                                                   # (B, cin)
        gate = routing.shared if routing.shared is not None else top1_gate(
            self.router(standardize(pooled) if self.standardized else pooled), routing.random)
        routing.gates.append(gate)
        # "masked" (CUDA's default: the same values and gradients) and "soft" (the soft attack's): section 6
        if routing.dispatch != "sparse":
            return masked_forward(self, x, gate, soft=routing.dispatch == "soft")
        # the sparse path: sort the batch by expert, run each expert on its slice (split keeps empty pieces,
        # so e is the expert's index), undo the sort. E.g. choice [1, 0, 1] -> sizes [1, 2]: expert 0 gets x1,
        # expert 1 gets x0 and x2; order.argsort() puts the outputs back in the batch's order.
        # y_b = E_{e(b)}(x_b): one conv of r*C filters per expert, on the inputs routed to it (S-Dense's cost)
        order, sizes = gate.choice.argsort(), gate.choice.bincount(minlength=self.n).tolist()  # one host read
        xs = x[order].split(sizes)                                                # N x (b_e, cin, H, W)
        y = torch.cat([self.conv(xe, e) for e, xe in enumerate(xs) if len(xe)])  # (B, cout, H', W'), sorted
        # each expert's BatchNorm on its rows (split(sizes) again), or one BatchNorm for them all
        y = self.normalize(y, slice(None)) if self.shared_bn else torch.cat([
            self.normalize(ye, self.rows(e)) for e, ye in enumerate(y.split(sizes)) if len(ye)])
        # back in the batch's order; s_b multiplies in the router's gradient
        return straight_through(y[order.argsort()], gate)

# ==================================================================================================
# 2. Algorithm 1 (AdvMoE) and the baselines: each method is a step function
# ==================================================================================================
# Sec. 4 of the paper: routers phi and experts psi trained jointly against one attack (AT(MoE)) do not adapt
# to each other (Insight 3). AdvMoE alternates: the routers are fitted to the current experts (lower
# level), the experts to the routers so fitted (upper level), each against a fresh attack. Eq. (1), with
# psi: backbone and experts, phi: routers, D: the training set:
#     min_psi L_TRADES(psi, phi*(psi); D)   s.t.   phi*(psi) = argmin_phi L_TRADES(psi, phi; D)
# Algorithm 1: one SGD step of each level per iteration, the lower level's step standing in for the argmin.
# Each method is a step function on a list of batches. The attack and loss called here, pgd (projected
# sign-gradient ascent on any loss, in eval mode) and trades_loss (CE + beta KL), are in section 3.
# Objective (Settings.objective): the loss ("trades": the paper's), beta, the attack's eps (on [0,1] inputs),
# step alpha (1.25 eps / K, deviation 13) and K steps; balance, supervision: R(phi)'s weights; authors:
# section 6.
Objective = NamedTuple("Objective", [("loss", str), ("beta", float), ("eps", float), ("step_size", float),
                                     ("steps", int), ("balance", float), ("supervision", float),
                                     ("authors", bool)])

def advmoe_step(model: nn.Module, opts: dict, batches: list, obj: Objective, reduce=None) -> dict:
    """One iteration of Algorithm 1, lines 3-5."""
    # 3: draw two different random batches B_phi and B_psi (two independent shuffles: batch_streams)
    (x_phi, y_phi), (x_psi, y_psi) = batches
    # 4: lower level: with psi fixed, update phi by minimizing L_TRADES (+ R(phi), see level) with a K-step
    #    PGD attack, SGD on B_phi (BatchNorm running statistics still update on B_phi: deviation 6)
    router_stats = level(model, opts["phi"], x_phi, y_phi, obj, regularize=True, reduce=reduce)
    # 5: upper level: with phi fixed (= phi*), update psi by minimizing
    #    L_TRADES with a K-step PGD attack made anew against (psi, phi*), SGD on B_psi
    stats = level(model, opts["psi"], x_psi, y_psi, obj, regularize=False, reduce=reduce)
    return {**stats, "router_loss": router_stats["loss"]}

def level(model: nn.Module, opt: torch.optim.Optimizer, x, y, obj: Objective, regularize: bool,
          reduce: Callable | None = None) -> dict:
    """One adversarial-training update of the parameters `opt` holds; the others stay fixed. `reduce`:
    torchrun's average of their gradients."""
    objective, reg, stats = robust_loss(model, x, y, obj)
    # L = L_TRADES(psi, phi; B), + R(phi) where the routers are trained (AdvMoE's lower level, or a joint
    # method's one loss). R(phi): 0 in the paper; by default the Switch balance term 0.1 N sum_k f_k P_k
    # (deviation 14; f_k: the share routed to k, P_k: its mean router probability), averaged over the gates
    # of both forwards
    loss = objective + reg if regularize else objective
    # backward(inputs=...) leaves the other level's .grad untouched: its parameters are "fixed"
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    if obj.authors:  # an option, --router authors: the routers learn from R(phi) alone (section 6; skip)
        authors_backward(model, params, objective, reg)
    else:
        loss.backward(inputs=params)
    if reduce:
        reduce(params)
    opt.step()
    return stats

def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective):
    """The training loss of one batch, R(phi) of its forwards, and the batch's accuracy, clean and
    adversarial. A first read: the trades branch."""
    # model(x, return_routing=True) (MoECNN, section 4) also returns a Gate per MoE layer, for R(phi)
    forward = functools.partial(model, return_routing=True)
    if obj.loss == "trades":  # the paper's: a fresh attack against the model as it is now, x' = argmax KL
        x_adv = training_attack(model, x, y, obj)
        # x' first, so the clean batch updates BatchNorm's running statistics last (as TRADES' code does)
        (logits_adv, gates_adv), (logits, gates) = forward(x_adv), forward(x)
        # CE(f(x), y) + beta KL(f(x) || f(x'))
        objective = trades_loss(logits, logits_adv, y, obj.beta)
    elif obj.loss == "pgdat":  # an option, Madry: CE(f(x'), y), x' = argmax CE; no clean forward
        (logits_adv, gates_adv), gates = forward(training_attack(model, x, y, obj)), []
        logits, objective = logits_adv, F.cross_entropy(logits_adv.float(), y)
    else:  # an option, "natural" (Sec. 4's first stage, natural training): CE(f(x), y), no attack
        (logits, gates), gates_adv = forward(x), []
        logits_adv, objective = logits, F.cross_entropy(logits.float(), y)
    reg = routing_regularizer(gates, gates_adv, y, obj)
    stats = {"loss": objective.detach(), "acc": (logits.argmax(1) == y).float().mean(),
             "acc_adv": (logits_adv.argmax(1) == y).float().mean()}
    if obj.balance or obj.supervision:  # logged
        stats["router_reg"] = reg.detach()
    return objective, reg, stats

def training_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, obj: Objective) -> torch.Tensor:
    """The inner maximization of the training loss: K steps (2 by default) of 1.25 eps / K (5/255 at eps
    8/255, K = 2), in eval mode."""
    if obj.loss == "trades":
        with torch.no_grad(), evaluating(model):
            target = model(x).clone()  # P = f(x), fixed (cloned for --compile)
        # max_delta KL(f(x) || f(x + delta)), started at x + 0.001 N(0, I)
        return pgd(model, x, lambda xa: kl_from_logits(target, model(xa), "sum"), obj.eps, obj.step_size,
                   obj.steps, start="normal")
    # an option, pgdat (Madry): max CE
    return pgd(model, x, ce_objective(model, y), obj.eps, obj.step_size, obj.steps)

def joint_step(model: nn.Module, opts: dict, batches: list, obj: Objective, reduce=None) -> dict:
    """AT(Dense), AT(S-Dense), AT(MoE) (and AT(Sparse)'s score learning, natural training): min over every
    trained parameter of L_TRADES (or --loss's) at once, one batch, one attack: the routers and the experts
    adapt to each other only through the shared gradient step (Sec. 4: not enough)."""
    # make_optimizers names phi's group "routers" (Dense and S-Dense have none)
    routers = any(g["name"] == "routers" for g in opts["all"].param_groups)
    return level(model, opts["all"], *batches[0], obj, regularize=routers, reduce=reduce)

# NOTE(official code): SGD with momentum 0.9 and weight decay 5e-4 on every parameter, routers included.
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4

def make_optimizers(model: nn.Module, s, device) -> dict[str, torch.optim.Optimizer]:
    """AdvMoE: one SGD for the routers phi and one for the backbone psi, same settings, one schedule (the
    paper adds no hyper-parameter here; --router-lr scales phi's rate, deviation 7). Joint methods: one SGD
    over everything, or over phi or psi alone (--train-params, default "all"; the Sec. 4 study)."""
    # fused: CUDA's kernel (None: the CPU's default)
    kw = dict(lr=s.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda" or None)
    phi = {"params": router_params(model), "base_lr": s.lr * s.router_lr, "name": "routers"}
    # psi = backbone_params; with the shared core (deviation 14; a first read skips it) the experts' offsets
    # D_e are a group of their own, held at 0 for the first --tie-epochs (upcycling), then trained
    offsets = {m.weight for m in model.modules() if isinstance(m, MoEConv) and m.core is not None}
    backbone = backbone_params(model)
    psi = [{"params": [p for p in backbone if p not in offsets], "base_lr": s.lr, "name": "backbone"}]
    if offsets:
        psi.append({"params": [p for p in backbone if p in offsets], "base_lr": s.lr, "name": "offsets"})
    if s.method == "advmoe":
        return {"phi": torch.optim.SGD([phi], **kw), "psi": torch.optim.SGD(psi, **kw)}
    groups = {"all": psi + ([phi] if phi["params"] else []), "routers": [phi], "backbone": psi}
    return {"all": torch.optim.SGD(groups[s.train_params], **kw)}

# Every method: its step function and the number of batch streams it draws per iteration (AdvMoE reads two
# batches per iteration: twice the images and backward passes of a joint method per epoch).
STEPS = {"advmoe": (advmoe_step, 2), "moe": (joint_step, 1), "sdense": (joint_step, 1),
         "dense": (joint_step, 1), "sparse": (joint_step, 1)}

def set_lr(opts: dict, progress: float, tied: bool = False):
    """The one schedule of every level: lr_t = lr_0 (1 + cos(pi t / T)) / 2, per iteration; 0 for the
    offsets of shared-core experts while they are tied (--tie-epochs). NOTE(official code): theirs steps it
    per epoch."""
    for opt in opts.values():
        for group in opt.param_groups:
            on = not (tied and group["name"] == "offsets")
            group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * progress)) * on

def batch_streams(data, s, epoch: int):
    """Alg. 1 line 3: each iteration's batches, one per stream of the method. NOTE(ours), deviation 6:
    AdvMoE's B_phi and B_psi come from two independent shuffles of the training set, each a function of seed
    and epoch."""
    streams = range(STEPS[s.method][1])
    # a seed per (run seed, epoch, stream): each its own shuffle, drawn again alike by a resumed run
    gens = [torch.Generator().manual_seed(s.seed * 1_000_003 + epoch * 7 + k) for k in streams]
    return zip(*(data.train_batches(s.batch_size, g) for g in gens))

# AT(Sparse), the pruning baseline of Table 1 (HYDRA, for channels; deviation 8): start from a trained
# AT(Dense) network, freeze its weights and learn one score per channel with the same training loss
# (joint_step over the scores alone, epochs/5 epochs); keep the top r*C channels of every layer, which gives
# S-Dense's shapes, then fine-tune that network with joint_step like any method. prune() (section 10) runs
# the first phase; the training loop the second.

# ==================================================================================================
# 3. Attacks and losses: one l_inf PGD that maximizes any loss; TRADES
# ==================================================================================================
# Robustness is accuracy under the worst perturbation delta with |delta|_inf <= eps. Every gradient attack of
# this file is one projected sign-gradient ascent (pgd) on some loss (AutoAttack's come from torchattacks):
# cross-entropy for the test RA, TRADES' KL to the clean output for the training attack. An MoE-CNN offers
# an attack two ways in (Sec. 4): move the routers' choices (another pathway) or fool the pathway chosen; a
# gradient through the straight-through gate carries both. TRADES trades clean accuracy for a flat output
# around each input, with the weight beta = 1/lambda.
@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode for the duration (BatchNorm running statistics), then every module's own mode back."""
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
    """KL(p || q) from logits through log_softmax: finite where a softmax underflows."""
    # KL(p || q) = sum_c p_c (log p_c - log q_c): F.kl_div(input=log q, target=log p) is KL(target || input)
    return F.kl_div(q_logits.float().log_softmax(-1), p_logits.float().log_softmax(-1), reduction=reduction,
                    log_target=True)

def ce_objective(model: nn.Module, y: torch.Tensor, dispatch: str = "auto") -> Callable:
    """The objective of test PGD (and of the pgdat training attack), sum_b CE(f(x'_b), y_b): a sum, so an
    input's gradient does not shrink with the batch size (PGD reads only its sign; a tiny one could
    underflow). dispatch "auto": masked on CUDA, sparse on the CPU (MoECNN.forward)."""
    return lambda x_adv: F.cross_entropy(model(x_adv, dispatch=dispatch).float(), y, reduction="sum")

def trades_loss(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    # TRADES: CE(f(x), y) + beta * KL(f(x) || f(x + delta))
    # as in TRADES' reference code, both sides of the KL carry gradient (only attack targets are detached)
    return F.cross_entropy(logits.float(), y) + beta * kl_from_logits(logits, logits_adv)

# NOTE(paper): TRADES' weight 1/lambda = beta = 6 for every method (the TRADES default).
BETA = 6.0

# ==================================================================================================
# 4. Backbones, each written once; `Spec` makes the same class Dense, S-Dense or MoE-CNN
# ==================================================================================================
# Each backbone builds its convolutions through a Spec, so one class is Dense (r = 1, N = 1), S-Dense (every
# channel count times r) or an MoE-CNN (N experts of r*C channels per routed conv). Routed: every conv but the
# stem and the projection shortcuts; shared by the experts: the stem, projection shortcuts, pre-activation
# BatchNorms (WRN, DenseNet) and the classifier (deviations 4, 5). A pathway (one expert per routed conv)
# thus has exactly S-Dense's shapes and cost. Reading order: Spec, ResNet-18 (the main backbone), then MoECNN.
class Spec(NamedTuple):
    """What tells Dense (r = 1, N = 1), S-Dense (r < 1, N = 1) and MoE-CNN (N >= 2) apart, for any backbone.
    Channel counts passed in are the paper's C (a tuple: a concatenation of groups, DenseNet). layer_router:
    a router per MoE layer (False: the global router decides); base: --width W (1: the paper's networks)."""
    ratio: float = 1.0
    n_experts: int = 1
    layer_router: bool = True
    base: float = 1.0
    shared_bn: bool = False
    standardized: bool = True
    shared_core: bool = False
    def width(self, channels: int | tuple) -> int:
        """Channels of a tensor in the pathway (= S-Dense): round(r * round(W * C)), at least 1; of a
        concatenation, the sum of its groups' widths."""
        if isinstance(channels, tuple):  # DenseNet only
            return sum(self.width(c) for c in channels)
        # e.g. ResNet-18's 64 at W = 0.25: 16 Dense channels, 8 in a pathway at r = 0.5
        return max(1, round(self.ratio * max(1, round(self.base * channels))))
    # Every conv of the blocks is made here: which of them is routed is decided in one place.
    def conv(self, cin, cout, kernel: int = 3, stride: int = 1, bn: bool = True, shared: bool = False):
        """A routed conv: N experts of r*cout filters, each reading the pathway's r*cin channels; shared=True:
        one conv for all experts (a projection shortcut; the stem is built by Stem)."""
        n = 1 if shared else self.n_experts  # a shared conv: N = 1, so no router either
        return MoEConv(self.width(cin), self.width(cout), kernel, stride, n, bn=bn, router=self.layer_router,
                       shared_bn=self.shared_bn, standardized=self.standardized, core=self.shared_core)
    def bn(self, channels) -> nn.BatchNorm2d:
        """NOTE(ours), deviation 5: a pre-activation BatchNorm on the pathway, shared by all experts."""
        return nn.BatchNorm2d(self.width(channels))
    def fc(self, channels, num_classes: int) -> nn.Linear:
        """The classifier on the pathway's pooled features, shared by all experts (deviation 5)."""
        return nn.Linear(self.width(channels), num_classes)

# ResNet-18 (He et al. 2016), CIFAR variant: a 3x3 stem, then 4 stages of 2 BasicBlocks with 64, 128, 256 and
# 512 channels (times r in a pathway); the first block of stages 2-4 halves the resolution, and its 1x1
# projection shortcut is shared by the experts. Routed: both 3x3 convs of every block, 16 MoE layers. At
# CIFAR-10: Dense 11.17 M parameters, 1.11 GFLOPs per image; S-Dense (r = 0.5) 2.80 M, 0.28; the MoE-CNN
# (N = 2) runs one pathway, S-Dense's 0.28 GFLOPs, with 5.55 M parameters (8.30 M with the shared core).
class BasicBlock(nn.Module):
    """ResNet block: relu(BN(conv2(relu(BN(conv1 x)))) + shortcut(x)); both 3x3 convs routed."""
    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = spec.conv(cin, cout, 3, stride), spec.conv(cout, cout)
        # a 1x1 projection (shared) where the shape changes: the first block of stages 2-4
        self.shortcut = spec.conv(cin, cout, 1, stride, shared=True) if (stride, cin) != (1, cout) else None
    def forward(self, x, routing):
        # (B, r*cin, H, W) -> (B, r*cout, H/stride, W/stride); each routed conv picks its expert per input
        out = self.conv2(F.relu(self.conv1(x, routing)), routing)
        # the sum is the residual stream: every expert of conv2 writes into the same r*cout channels
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x, routing)))

class ResNet18(nn.Module):
    """ResNet-18 for 32-64 px inputs (the 7x7 ImageNet stem for larger ones), as described above."""
    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem, blocks, cin = Stem(spec, 64, image_size), [], 64
        # 4 stages of 2 blocks; the first block of stages 2-4 doubles the width and halves the resolution
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(spec, cin, cout, stride), BasicBlock(spec, cout, cout, 1)]
            cin = cout
        self.blocks, self.fc = nn.ModuleList(blocks), spec.fc(512, num_classes)
    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))            # (B, r*64, 32, 32) on CIFAR
        for block in self.blocks:                   # r*64, r*128, r*256, r*512 channels at 32, 16, 8, 4 px
            x = block(x, routing)
        return self.fc(x.mean((2, 3)))              # pool (B, r*512) -> (B, classes)

# Below: the shared stem, then three more backbones in the same pattern with their own blocks. A first read
# can skip to "The model a method trains", above `class MoECNN`, which wraps them all.
#
# The stem, the first conv on the RGB image, is shared by the experts and r*C wide (deviation 4): a pathway is
# then exactly S-Dense, and the first routers pool the stem's r*C features rather than 3 colour channels.
class Stem(nn.Module):
    """NOTE(ours), deviation 4: the shared stem on the RGB image: 3x3/1 for 32-64 px; 7x7/2 + 3x3/2 max-pool
    for ImageNet-size inputs (conv-BN-ReLU-pool, or conv-pool where the blocks start with a BatchNorm)."""
    def __init__(self, spec: Spec, cout: int, image_size: int, bn: bool = True):
        super().__init__()
        self.pool = image_size >= 128
        self.conv = MoEConv(3, spec.width(cout), 7 if self.pool else 3, 2 if self.pool else 1, 1, bn=bn,
                            router=False)
    def forward(self, x, routing):
        x = self.conv(x, routing)  # (B, r*C, H, W), or (B, r*C, H/2, W/2) with the ImageNet stem
        # ImageNet stem: its max-pool halves again, (B, r*C, H/4, W/4)
        return F.max_pool2d(F.relu(x) if self.conv.bn else x, 3, 2, 1) if self.pool else x

# WRN-28-10 (Zagoruyko & Komodakis 2016): pre-activation blocks, BN-ReLU-conv twice, in 3 groups of 4 with
# 160, 320 and 640 channels. Routed: both 3x3 convs of every block, 24 MoE layers. The first BatchNorm of a
# block acts on the residual stream, which every expert writes into, so it is shared (deviation 5); the middle
# one follows conv1 and is per expert. Dense: 36.5 M parameters, 10.5 GFLOPs; S-Dense and a pathway 2.6.
class WideBlock(nn.Module):
    """Pre-activation wide block: conv2(relu(BN(conv1(relu(BN x))))) + shortcut. conv1 carries the middle
    BatchNorm (per expert); the first acts on the pathway, shared (deviation 5). No dropout (the paper names
    none)."""
    def __init__(self, spec: Spec, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = spec.bn(cin), spec.conv(cin, cout, 3, stride)
        # conv2 has no BatchNorm: the next block's pre-activation BatchNorm (or the final one) follows the sum
        self.conv2 = spec.conv(cout, cout, bn=False)
        self.shortcut = spec.conv(cin, cout, 1, stride, bn=False, shared=True) if (stride, cin) != (1, cout) \
            else None
    def forward(self, x, routing):
        o = F.relu(self.bn1(x))                                      # pre-activation, (B, r*cin, H, W)
        out = self.conv2(F.relu(self.conv1(o, routing)), routing)    # (B, r*cout, H/stride, W/stride)
        # a projection reads the pre-activated input, as in the reference WRN; an identity, the stream itself
        return out + (x if self.shortcut is None else self.shortcut(o, routing))

class WideResNet(nn.Module):
    """WRN-28-10 (Zagoruyko & Komodakis): 3 groups of (28-4)/6 = 4 blocks, widths 160, 320, 640; it ends with
    BN-ReLU (pre-activation), then the pooled features' classifier."""
    def __init__(self, spec: Spec, num_classes: int, image_size: int, depth: int = 28, widen: int = 10):
        super().__init__()
        # the stem has no BatchNorm: the first block's own first BatchNorm normalizes what it writes
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

# VGG-16 with BatchNorm: 13 3x3 conv-BN-ReLU layers in 5 groups (64, 128, 256, 512, 512 channels), a 2x2
# max-pool after each group, one linear classifier on the pooled 512 features (the CIFAR variant). The first
# conv is the shared stem; the other 12 are MoE layers, each but the first fed by the routed conv before it.
# Dense: 14.7 M parameters, 0.63 GFLOPs; S-Dense and a pathway 0.16.
class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR style (one linear classifier); the first conv is the shared stem."""
    CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    def __init__(self, spec: Spec, num_classes: int, image_size: int):
        super().__init__()
        self.stem, layers, cin = Stem(spec, 64, image_size), [], 64
        # CFG[0] is the stem; "M": a 2x2 max-pool, which has no parameters and keeps the channels
        for v in self.CFG[1:]:  # every conv but the first reads the routed conv before it
            layers.append(nn.MaxPool2d(2) if v == "M" else spec.conv(cin, v))
            cin = cin if v == "M" else v
        self.layers, self.fc = nn.ModuleList(layers), spec.fc(512, num_classes)
    def forward(self, x, routing):
        x = F.relu(self.stem(x, routing))            # (B, r*64, 32, 32) on CIFAR
        # each conv is conv-BN (the BatchNorm inside the MoEConv, per expert), then the ReLU here
        for layer in self.layers:                   # five max-pools: 32 -> 1 px, up to r*512 channels
            x = layer(x) if isinstance(layer, nn.MaxPool2d) else F.relu(layer(x, routing))
        return self.fc(x.mean((2, 3)))              # (B, classes)

# DenseNet-BC-40 (Huang et al. 2017), k = 12: every bottleneck layer reads the concatenation of all earlier
# outputs of its block and appends k new channels. Its input is thus a concatenation of groups written by
# different layers (a tuple of channel counts: Spec.width scales each group, so a pathway stays S-Dense).
# Routed: the 1x1 and 3x3 convs of 18 layers and the 2 transitions' 1x1 convs, 38 MoE layers. Dense:
# 0.18 M parameters, 0.145 GFLOPs; S-Dense and a pathway 0.037.
class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output appended to the input. The 1x1
    conv carries the middle BatchNorm (per expert); the first acts on the shared pathway. `chans`: the Dense
    channel counts of the concatenated input's groups."""
    def __init__(self, spec: Spec, chans: tuple, growth: int):
        super().__init__()
        self.bn = spec.bn(chans)
        # the 1x1 conv reads every group so far: its router pools the whole concatenation
        self.conv1, self.conv2 = spec.conv(chans, 4 * growth, 1), spec.conv(4 * growth, growth, bn=False)
    def forward(self, x, routing):
        # (B, C, H, W) -> 1x1 conv (B, r*4k, H, W) -> 3x3 conv (B, r*k, H, W), appended: (B, C + r*k, H, W)
        return torch.cat([x, self.conv2(F.relu(self.conv1(F.relu(self.bn(x)), routing)), routing)], 1)

class DenseNet(nn.Module):
    """The CIFAR DenseNet-BC: depth 40, growth k = 12, compression 0.5: 3 dense blocks of
    (40-4)/6 = 6 bottleneck layers; transitions BN-ReLU-conv1x1-avgpool, routed like every conv."""
    def __init__(self, spec: Spec, num_classes: int, image_size: int, depth: int = 40, growth: int = 12):
        super().__init__()
        self.stem, chans, layers = Stem(spec, 2 * growth, image_size, bn=False), (2 * growth,), []
        for block in range(3):
            for _ in range((depth - 4) // 6):
                layers.append(DenseLayer(spec, chans, growth))
                # the layer appends one group of k channels
                chans += (growth,)
            if block < 2:
                # transition: BN-ReLU-conv1x1 to half the channels (compression 0.5), then a 2x2 avg-pool;
                # it reads the block's whole concatenation and starts the next block with one group
                cout = sum(chans) // 2
                layers.append(nn.ModuleDict({"bn": spec.bn(chans), "conv": spec.conv(chans, cout, 1, bn=0)}))
                chans = (cout,)
        self.layers, self.bn, self.fc = nn.ModuleList(layers), spec.bn(chans), spec.fc(chans, num_classes)
    def forward(self, x, routing):
        x = self.stem(x, routing)
        # a transition is a ModuleDict of its BatchNorm and conv (so their parameters are named "bn", "conv")
        for layer in self.layers:  # a transition: (B, C, H, W) -> (B, C/2, H/2, W/2)
            x = layer(x, routing) if isinstance(layer, DenseLayer) else \
                F.avg_pool2d(layer["conv"](F.relu(layer["bn"](x)), routing), 2)
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))

# The model a method trains: the inputs in [0,1] are normalized by the model itself (so an attack's eps-ball
# lives in pixel units), then the backbone: the forward creates one Routing, every MoE layer appends its Gate
# to it, and the caller gets them back (return_routing=True) for the routing regularizer, the 4-way split and
# the routing statistics. With the global router its one Gate is decided before the backbone runs and every
# MoE layer uses it.
BACKBONES = {"resnet18": ResNet18, "wrn28_10": WideResNet, "vgg16": VGG16, "densenet": DenseNet}

class MoECNN(nn.Module):
    """Normalization + backbone (+ the global router). model(x) returns logits, so any attack library can use
    it; model(x, return_routing=True) also returns the Gates, one per MoE layer, in forward order. Dense,
    S-Dense and the MoE-CNN are this class with other (ratio, n_experts); AT(Sparse)'s pruned network loads
    into S-Dense's. dispatch: "sparse" | "masked" | "soft" | "auto" (masked on CUDA, sparse on the CPU: see
    forward)."""
    def __init__(self, arch: str, num_classes: int = 10, image_size: int = 32, ratio: float = 1.0,
                 n_experts: int = 1, router: str = "layer", mean_std=MEAN_STD["cifar10"], width: float = 1.0,
                 shared_bn: bool = False, router_standardize: bool = True, shared_core: bool = False):
        super().__init__()
        # (a first read skips this) NOTE(official code), --router authors: their routing shares a layer's
        # BatchNorm among its experts and reads unstandardized features
        authors = router == "authors"
        spec = Spec(ratio, n_experts, layer_router=router == "layer", base=width, shared_core=shared_core,
                    shared_bn=shared_bn or authors, standardized=router_standardize and not authors)
        self.backbone = BACKBONES[arch](spec, num_classes, image_size)
        self.global_router = GlobalRouter(n_experts, spec.standardized) \
            if (router != "layer" and n_experts > 1) else None
        self.register_buffer("mean", torch.tensor(mean_std[0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(mean_std[1]).view(1, 3, 1, 1))
    def forward(self, x, return_routing: bool = False, dispatch: str = "auto",
                random_routing: torch.Generator | None = None):
        # "auto": the sparse path on the CPU (only the chosen experts), the masked one on CUDA (no host sync)
        dispatch = ("masked" if x.is_cuda else "sparse") if dispatch == "auto" else dispatch
        x = (x - self.mean) / self.std               # (B, 3, H, W), inputs in [0,1] normalized here
        shared = None if self.global_router is None else top1_gate(self.global_router(x), random_routing)
        routing = Routing(dispatch, shared=shared, random=random_routing)
        # every MoE layer of the backbone appends its Gate to routing.gates, in forward order; with the global
        # router (section 6) its one Gate is decided above and every layer reuses it
        logits = self.backbone(x, routing)
        return (logits, routing.gates) if return_routing else logits

# Algorithm 1's two levels split the parameters by name: phi is every router (one per MoE layer, or the
# global router), psi everything else, the experts' filters and BatchNorms included.
def router_params(model: nn.Module) -> list[nn.Parameter]:
    """phi: the routers' parameters."""
    return [p for n, p in model.named_parameters() if "router" in n]

def backbone_params(model: nn.Module) -> list[nn.Parameter]:
    """psi: everything else (stem, experts, BatchNorms, shortcuts, classifier)."""
    return [p for n, p in model.named_parameters() if "router" not in n]

# ==================================================================================================
# 5. Evaluation: SA, RA (PGD-50), stronger attacks, AutoAttack, routing statistics, GFLOPs
# ==================================================================================================
# The paper reports SA (clean accuracy), RA under PGD-50 at the training eps, RA under AutoAttack (Table 2)
# and GFLOPs. Hard top-1 routing is an argmax, so a gradient attack through it can overstate robustness
# (gradient masking): the soft attack differentiates through the experts mixed by the routers' probabilities,
# and Square needs no gradient. RA-worst counts an image robust only if it survives every attack run.
# Protocol: PGD-50, step eps/4, uniform start (Table 1's RA); AutoAttack at its reference settings (Table 2);
# eval mode, float32, seeded by the run's seed. Then the routing under attack (Insight 2).
# A first read: adversaries, evaluate's docstring (the numbers), routing_counts (Insight 2's split),
# routing_summary's docstring, pathway_diversity and gflops_per_input (the bodies of evaluate and
# routing_summary are bookkeeping).
EVAL_BATCH = 256  # images per batch of evaluation (the attacks' random starts are drawn per batch)

def adversaries(name: str, model: nn.Module, x, y, s, steps: int, gen: torch.Generator | None = None,
                log=None) -> list[tuple[str, torch.Tensor]]:
    """NOTE(ours), deviation 9: the attacks of --eval-attacks, as (label, x_adv) pairs, the soft attack and
    Square beside the paper's PGD (RA-worst over all; why: the section's header). Labels: "pgd<steps>",
    "soft", "square", and AutoAttack's "autoattack/<component>" after each component, then "autoattack". A
    model without routers has no soft attack (it would be PGD again)."""
    if name == "pgd":  # the paper's RA: CE through the straight-through routers
        return [(f"pgd{steps}", pgd(model, x, ce_objective(model, y), s.eps, s.test_step_size, steps,
                                    generator=gen))]
    if name == "soft":  # the hard forward; the backward through experts mixed by the router's probabilities
        return [("soft", pgd(model, x, ce_objective(model, y, "soft"), s.eps, s.test_step_size, steps,
                             generator=gen))] if router_params(model) else []
    # Square (Andriushchenko et al. 2020): random search over the eps-ball's faces that only reads the
    # model's outputs, so a hidden gradient cannot mislead it
    if name == "square":
        attack = import_torchattacks().Square(model, norm="Linf", eps=s.eps, n_queries=s.square_queries,
                                              n_restarts=1, seed=s.seed)
        return [("square", attack(x, y).detach())]
    # AutoAttack: its four components in turn, each on what the earlier ones left robust (section 6)
    return autoattack(model, x, y, s.eps, s.seed, log)

def evaluate(model: nn.Module, data, s, steps: int | None = None, limit: int = 0, attacks=("pgd",),
             split: str = "test", log=lambda line: None) -> dict:
    """In %, on the first `limit` images (n) of `split`, each attack at the training eps:
        SA        = 100 * #{b : f(x_b) = y_b} / n
        RA_a      = 100 * #{b : f(x'_b) = y_b} / n_a, x' = attack a's example; n_a = the images a saw (n;
                    AutoAttack: the first --aa-n); RA = RA_PGD
        RA-worst  = 100 * #{b : correct clean and under every attack} / #{b : every attack saw b}
        4-way split of Insight 2 under PGD, over the images correct when clean (routing_summary).
        SA with random routing: SA with every routing decision replaced by a uniformly random expert (does
                    the routing matter? If not, the experts are interchangeable: S-Dense with copies).
    Everything runs in float32: FAB and Square stop just past the decision boundary, and routing is an argmax,
    so a bf16 re-classification could flip them back."""
    steps, device, classes = steps or s.test_steps, next(model.parameters()).device, model.backbone.fc
    attacks = ("pgd",) + tuple(a for a in attacks if a != "pgd")
    # PGD, the soft attack and the random routing each draw from their own stream, seeded by the run's seed
    # and a fixed index (Square and AutoAttack seed torchattacks with the run's seed): adding an attack
    # changes no other attack's RA, and an --eval-only gives a run's numbers again
    gens = {a: torch.Generator(device).manual_seed(1000 * s.seed + 2 * k)
            for k, a in enumerate(EVAL_ATTACKS + ("random routing",))}
    # label -> per batch, (b,) correct under it; paths: per batch, (B, L) each input's expert at every layer
    correct, paths, routed = {"clean": []}, {"clean": [], f"pgd{steps}": []}, bool(router_params(model))
    with evaluating(model), torch.autocast(device.type, enabled=False):
        for x, y in data.test_batches(EVAL_BATCH, limit, split):
            done, found = sum(map(len, correct["clean"])), [("clean", x)]       # done: images before it
            # every attack on the whole batch, but AutoAttack (minutes per batch) on the first --aa-n images
            for name in attacks:
                take = len(y) if name != "autoattack" or not s.aa_n else max(0, min(len(y), s.aa_n - done))
                if take:
                    found += adversaries(name, model, x[:take], y[:take], s, steps, gens[name], log)
            # classify each attack's examples (and the clean batch) once more, recording the pathways: the
            # routing under attack is compared with the clean routing input by input. "random routing": the
            # clean batch, each MoE layer drawing its expert uniformly (the global router: one draw per image)
            with torch.no_grad():
                for label, x_adv in found + ([("random routing", x)] if routed else []):
                    random = gens[label] if label == "random routing" else None
                    logits, gates = model(x_adv, return_routing=True, random_routing=random)
                    correct.setdefault(label, []).append(logits.argmax(1) == y[:len(x_adv)])
                    if gates and label in paths:
                        paths[label].append(torch.stack([g.choice for g in gates], 1))
            log(f"  evaluated {done + len(y)}/{data.eval_len(limit, split)} images of {split}")
    # the numbers of the docstring; the AutoAttack components' labels ("autoattack/<name>") are reported, not
    # counted in RA-worst, which runs over the images every final attack saw
    ok = {k: torch.cat(v) for k, v in correct.items()}                           # label -> (n_a,)
    rand = percent(ok.pop("random routing")) if "random routing" in ok else None
    # final: the clean prediction and every attack's final examples (AutoAttack's "autoattack/<component>"
    # rows are steps within it); RA-worst ANDs them over the first seen_all images, those every attack saw
    pgd_ok, final = ok[f"pgd{steps}"], ["clean"] + [k for k in ok if k != "clean" and "/" not in k]
    seen_all = min(len(ok[k]) for k in final)                             # images every final attack saw
    ras = {k: percent(v) for k, v in ok.items() if k != "clean"}
    result = {"sa": percent(ok["clean"]), "ra": percent(pgd_ok), "sa_random_routing": rand,
              "n": len(ok["clean"]), "attacks": ras,
              "attack": f"PGD-{steps} (CE, eps {s.eps:.5f}, step {s.test_step_size:.5f}, uniform start)",
              "attack_n": {k: len(v) for k, v in ok.items() if k != "clean"},
              "ra_worst": percent(torch.stack([ok[k][:seen_all] for k in final]).all(0)),
              "ra_worst_n": seen_all,
              "ra_worst_without_aa": percent(torch.stack([ok[k] for k in final if k != "autoattack"]).all(0)),
              "routing": {}}
    if "autoattack" in ok:
        result["autoattack"] = {
            "label": "AutoAttack (standard)", "images": len(ok["autoattack"]),
            "ra_pgd_same_images": percent(pgd_ok[:len(ok["autoattack"])]),
            "components": [{"name": k, "attack": cls, "settings": kw, "ra_after": ras.get(f"autoattack/{k}")}
                           for k, (cls, kw) in autoattack_settings(s.eps, classes.out_features).items()]}
    if paths["clean"]:
        result["routing"] = routing_summary(*(torch.cat(p) for p in paths.values()), pgd_ok, ok["clean"],
                                            max(m.n for m in model.modules() if isinstance(m, MoEConv)))
    return result

def percent(correct: torch.Tensor) -> float:
    """100 * (the share of True in `correct`), 2 decimals: SA, RA_a, RA-worst."""
    return round(100 * correct.float().mean().item(), 2)

SPLIT_4WAY = ("neither", "router_only", "prediction_only", "both")  # Insight 2's (1)-(4): what was fooled
# The routing statistics, from each input's pathway (its expert at every MoE layer, (B, L)) clean and under
# PGD, and whether it is classified correctly. Insight 2 splits the examples by which of the two ways in an
# attack took: it moved the routers' choices (another pathway), fooled the pathway chosen, both, or neither.
# The paper finds that routers made robust alone leave the prediction fragile. Counts first (routing_counts),
# shares after (routing_summary).
def routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts: int, layers=slice(None)):
    """From each input's pathway (B, L), clean and under attack, and whether it is classified correctly under
    attack and clean (B,): inputs per expert per layer (L, N), clean and under attack; flips per layer (L,);
    the 4-way split's counts (4,), over the inputs correct when clean only (`layers`: those whose flips
    count)."""
    # a layer "flips" an input when the attack moved its choice of expert there
    flipped = choice != choice_adv                                             # (B, L)
    fooled = flipped[:, layers].any(1)                                         # (B,) a layer's choice moved
    # Insight 2: (1) neither router nor prediction fooled, (2) router only, (3) prediction only, (4) both
    groups = torch.stack([~fooled & ok_adv, fooled & ok_adv, ~fooled & ~ok_adv, fooled & ~ok_adv]) & ok_clean
    usage, usage_adv = (F.one_hot(c, n_experts).sum(0) for c in (choice, choice_adv))   # (L, N) each
    return usage, usage_adv, flipped.sum(0), groups.sum(1)

def rounded(t: torch.Tensor, n: int = 1) -> list:
    """t / n as nested lists of numbers with 4 decimals (for JSON)."""
    return (t.double() / n).round(decimals=4).tolist()

def routing_summary(choice, choice_adv, ok_adv, ok_clean, n_experts: int) -> dict:
    """result["routing"]: expert usage per layer, clean and under PGD; how often PGD flips each layer's
    choice; the 4-way split in % of the split_n clean-correct inputs, router robustness (choices unmoved) =
    neither + prediction_only and MoE robustness = neither + router_only; pathway diversity, clean and under
    PGD. A collapsed layer (one expert takes 95% or more of the clean inputs) can hardly flip, so router
    robustness is also given over the other layers, with their mean flip rate."""
    # n inputs in all; m of them correct when clean, the split's denominator (NOTE(ours), deviation 10)
    n, m = len(choice), max(int(ok_clean.sum()), 1)
    usage, usage_adv, flips, split = routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts)
    # the same split, counting a router fooled only where a layer that routes (not collapsed) moved
    live = usage.max(1).values < 0.95 * n                                      # (L,) layers not collapsed
    split_live = routing_counts(choice, choice_adv, ok_adv, ok_clean, n_experts, live)[3]
    split, split_live = ([100 * v / m for v in t.tolist()] for t in (split, split_live))  # % of clean-correct
    # usage_*: (L, N) shares; flip rates: per layer, and of inputs whose pathway moved anywhere; the split and
    # the two robustness shares in %; pathways: how many distinct pathways the inputs take, and their entropy
    return {"usage_clean": rounded(usage, n), "usage_adv": rounded(usage_adv, n),
            "flip_rate_per_layer": rounded(flips, n),
            "flip_rate_any_layer": round((choice != choice_adv).any(1).float().mean().item(), 4),
            "split_4way": dict(zip(SPLIT_4WAY, [round(v, 2) for v in split])),
            "split_n": int(ok_clean.sum()), "router_robustness": round(split[0] + split[2], 2),
            "moe_robustness": round(split[0] + split[1], 2), "uncollapsed_layers": int(live.sum()),
            "router_robustness_uncollapsed": round(split_live[0] + split_live[2], 2),
            "flip_rate_uncollapsed": round(flips[live].double().mean().item() / n, 4) if live.any() else None,
            "pathways": {"clean": pathway_diversity(choice), "adv": pathway_diversity(choice_adv)}}

# A pathway is the tuple of experts an input runs, one per MoE layer: N^L are possible. How many the inputs
# use, and how evenly, tells routing that routes (many, high entropy) from routing that collapsed (one, 0
# bits).
def pathway_diversity(choices: torch.Tensor) -> dict:
    """choices (n, L), each input's pathway: the number of distinct pathways and the entropy of their
    distribution in bits, H = sum_p q_p log2(1 / q_p) (0: one pathway for every input)."""
    _, counts = choices.unique(dim=0, return_counts=True)
    q = counts.double() / counts.sum()
    return {"distinct": len(counts), "entropy_bits": round((q * (1 / q).log2()).sum().item(), 3),
            "inputs": len(choices)}

def gflops_per_input(model: nn.Module, x: torch.Tensor) -> float:
    """NOTE(ours), deviation 11: FLOPs of one eval forward on the sparse path, counted by torch's
    FlopCounterMode on the convs and linear maps that run (a multiply-add counts 2), per input: for an
    MoE-CNN the chosen pathway and the routers, nothing else. The paper's GFLOPs compare Dense, S-Dense and
    the MoE-CNN at inference: an MoE-CNN's is S-Dense's plus its routers' (a pooled linear map per layer),
    whatever N. Dense ResNet-18 at 32 px: 1.11 GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    # on the sparse path an MoE-CNN's count is what one input runs, not N experts' worth (the masked path's)
    with evaluating(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, dispatch="sparse")
    return counter.get_total_flops() / len(x) / 1e9

# ==================================================================================================
# 6. Beside the method: masked and soft forwards, AutoAttack's assembly, the global router, the regularizers
# ==================================================================================================
# The masked forward (CUDA's default) gives the sparse path's values and gradients; the balance term of the
# default loss is computed here (routing_regularizer); the rest are options. A GPU prefers to run
# every expert on every input and keep each input's own expert (the masked forward: CUDA trains on it; the
# tests' reference for the sparse path); the same forward mixes the experts by the router's probabilities for
# the soft attack (section 5). Then the plumbing of AutoAttack (section 5); the routing variants the paper
# does not train: one global router for every layer (the authors' code); and the routing regularizers: the
# balance term, on by default (section 2's R(phi), deviation 14), the authors' router loss.
def masked_forward(self: MoEConv, x: torch.Tensor, gate: Gate, soft: bool = False):
    """The sparse path reads the group sizes on the host, which stalls a GPU once per layer; on CUDA ("auto")
    every expert runs on every input instead (static shapes, no host read, one graph for torch.compile) at N
    times the experts' FLOPs. soft=True: the forward of the surrogate-gradient attack."""
    y = F.conv2d(x, self.filters(), None, self.stride, self.padding)        # (B, N*cout, H', W')
    y = rearrange(y, "b (n c) h w -> b n c h w", n=self.n)              # (B, N, cout, H', W')
    # E_{e(b)}(x_b): each input's rows of its chosen expert (a gather)
    hard = y[torch.arange(len(y), device=y.device), gate.choice]         # (B, cout, H', W')
    if self.bn is not None:
        # each expert's BatchNorm as y * scale_e + shift_e, (N, cout) each; a shared one is one group of
        # statistics for every input, (1, cout) each
        group = gate.choice * (not self.shared_bn)                             # (B,)
        scale, shift = expert_affine(self, hard, group)
        hard = hard * scale[group, :, None, None] + shift[group, :, None, None]
        y = y * scale[:, :, None, None] + shift[:, :, None, None] if soft else y
    hard = straight_through(hard, gate)
    if not soft:
        return hard
    # y = y_soft + sg(y_hard - y_soft), y_soft = sum_e p_e E_e(x): the hard value, the mixture's gradient
    mix = (y * gate.logits.float().softmax(-1).to(y.dtype)[:, :, None, None, None]).sum(1)
    return mix + (hard - mix).detach()

def expert_affine(self: MoEConv, y: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BN_g(y) = y * scale_g + shift_g from the B chosen outputs y (B, cout, H', W') and each input's
    statistics group g (its expert, or 0 when shared): in training, those of its inputs, as F.batch_norm
    computes them for a group of the sparse path (in float32); in eval, its running statistics."""
    bn, n = self.bn, 1 if self.shared_bn else self.n
    mean, var = bn.running_mean.view(n, -1), bn.running_var.view(n, -1)
    if self.training:
        y = y.to(torch.promote_types(y.dtype, torch.float32))
        with torch.autocast(y.device.type, enabled=False):
            onehot = F.one_hot(group, n).to(y.dtype)                         # (B, G)
            count = onehot.sum(0) * y[0, 0].numel()                          # (G,) inputs x pixels
            # mean_g = sum_{b in g} sum_hw y_b / n_g;  var_g = sum_{b in g} (y_b - mean_g)^2 / n_g
            mean = onehot.T @ y.sum((2, 3)) / count.clamp(min=1)[:, None]    # (G, cout)
            var = onehot.T @ (y - mean[group, :, None, None]).square().sum((2, 3)) \
                / count.clamp(min=1)[:, None]
        used, dt = (count > 0)[:, None], bn.running_mean.dtype                # (G, 1): groups with inputs
        with torch.no_grad():  # running <- running + m (stat - running) where the group had inputs
            m = used.to(dt) * bn.momentum
            bn.running_mean.view(n, -1).lerp_(mean.to(dt), m)
            bn.running_var.view(n, -1).lerp_((var * (count / (count - 1).clamp(min=1))[:, None]).to(dt), m)
        # a group without inputs in this batch is read only by the soft mixture: its running statistics
        mean = torch.where(used, mean, bn.running_mean.view(n, -1).to(mean.dtype))
        var = torch.where(used, var, bn.running_var.view(n, -1).to(var.dtype))
    # BN_g(y) = (y - mean_g) / sqrt(var_g + eps) * gamma_g + beta_g
    scale = bn.weight.view(n, -1) / torch.sqrt(var + bn.eps)
    return scale, bn.bias.view(n, -1) - mean * scale

# AutoAttack (Table 2), assembled from torchattacks' components at the reference settings (deviation 9):
# the plumbing behind adversaries' "autoattack".
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
    # x_adv: the clean batch, each input replaced by the first example that fooled it; robust: not fooled yet
    ta, x_adv, found = import_torchattacks(), x.clone(), []
    with torch.no_grad():
        robust = model(x).argmax(1) == y                                         # (B,)
    for name, (cls, kw) in autoattack_settings(eps, model.backbone.fc.out_features).items():
        # RA-AA = 100 * #{b : no component fooled b} / n; a component sees only what the earlier ones left
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

# The global router (the authors' architecture, --router global): one decision per image, from the image
# itself, shared by every MoE layer, so an input runs one of N fixed pathways. The paper's Fig. A1 instead has
# a router per layer, reading that layer's input; results/moe_learnability/ compares both.
class GlobalRouter(nn.Module):
    """NOTE(ours), deviation 7: an image-level router (theirs a ResNet-20-like CNN on the raw image, this
    three conv-BN-ReLU layers of 16/32/64 channels on the normalized one), its pooled features standardized
    (not under --router authors), a head with no bias and a small init (theirs: a default linear layer)."""
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

# NOTE(official code): the weight alpha of their router's class-mod-N loss (--router authors)
AUTHORS_ALPHA = 6.0

def authors_backward(model: nn.Module, params: list, objective: torch.Tensor, reg: torch.Tensor):
    """NOTE(official code), --router authors: the routers' gradient is that of R(phi) alone (their router
    loss), the other parameters' that of the task loss: the task gradient never reaches the router."""
    routers = set(router_params(model))
    own, rest = [p for p in params if p in routers], [p for p in params if p not in routers]
    for part, value in ((rest, objective), (own, reg)):
        if part and value.requires_grad:
            value.backward(inputs=part, retain_graph=True)

def routing_regularizer(gates: list[Gate], gates_adv: list[Gate], y: torch.Tensor, obj) -> torch.Tensor:
    """NOTE(ours), deviations 7 and 14: terms the paper does not have, averaged over the gates given (each MoE
    layer of the clean and of the adversarial forward); by default only the balance term, 0.1 with the shared
    core. --router authors: the authors' router loss instead, the only one their router learns from."""
    total, balance, supervision = torch.zeros((), device=y.device), obj.balance, obj.supervision
    if obj.authors:
        # NOTE(official code): alpha * CE(g(x), y mod N) + beta * KL(g(x) || g(x_adv)) on the global gate
        g = (gates or gates_adv)[0]
        kl = obj.beta * kl_from_logits(g.logits, gates_adv[0].logits) if gates and gates_adv else 0.0
        return supervision * F.cross_entropy(g.logits.float(), y % g.logits.shape[1]) + kl
    for g in gates + gates_adv:
        probs, n = g.logits.float().softmax(-1), g.logits.shape[1]                # (B, N)
        if balance:
            # Switch Transformer: lambda * N * sum_k f_k P_k, f_k the share routed to k, P_k the mean p_k
            total = total + balance * n * (F.one_hot(g.choice, n).float().mean(0) * probs.mean(0)).sum()
        if supervision:
            # NOTE(official code): lambda * CE(router logits, y mod N), a fixed class-to-expert target
            total = total + supervision * F.cross_entropy(g.logits.float(), y % n)
    return total / max(len(gates + gates_adv), 1)

# ==================================================================================================
# OPERATIONS. The method ends with section 5 (section 6: its speed path, variants, regularizers); what follows
# runs it: settings, data, the training loop, AT(Sparse)'s pruning mechanics, files, report, bench, CLI.
# ==================================================================================================
# 7. Settings
# ==================================================================================================
class ConfigError(ValueError):
    """Bad user input: the CLI prints it on one line and exits with status 2."""

@dataclasses.dataclass
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
    # W: base channel multiplier of every backbone (1: the paper's networks; NOTE(ours), deviation 12)
    width: float = 1.0
    # layer: a router per MoE layer (the paper) | global: one image-level router, trained by the task loss |
    # authors: the authors' code: a global router trained only by 6 CE(y mod N) (+ 6 KL(clean || adversarial)
    # of its outputs under an attack), no task gradient, one BatchNorm shared by the experts, unstandardized
    router: str = "layer"
    # one BatchNorm shared by a layer's experts (the authors' code) instead of one per expert (deviation 1)
    shared_bn: bool = False
    # routers read their pooled features standardized per input (deviation 2); --no-router-standardize: raw
    router_standardize: bool = True
    # NOTE(ours), deviation 14: experts share a core, W_e = W_shared + D_e, D_e = 0 at init (the same FLOPs,
    # 1.5x the weights at N = 2), and are upcycled: D_e stays 0 for the first --tie-epochs (default: a
    # quarter of the epochs), then trains. Default: on for the MoE methods, off under --router authors (the
    # authors' independent experts)
    shared_core: bool = None
    tie_epochs: int = None
    # checkpoint.pt whose weights start the run (sparse: the AT(Dense) run to prune)
    init: str = ""
    # all | routers | backbone: what a joint method trains (the Sec. 4 study, with --init)
    train_params: str = "all"
    # --- loss and attacks (eps in pixel units of [0,1]; PGD step 1.25*eps/K in training, eps/4 at test)
    # trades (CE + beta * KL) | pgdat (Madry: CE on PGD examples) | natural (CE, no attack)
    loss: str = "trades"
    # l_inf radius (default: 8/255 on CIFAR and synthetic, 2/255 on TinyImageNet and ImageNet)
    eps: float = None
    # K: PGD steps of the training attack
    train_steps: int = 2
    # PGD steps of the final evaluation (RA)
    test_steps: int = 50
    # --- routing regularizers (NOTE(ours), deviations 7 and 14: none in the paper)
    # weight of the Switch balance term N * sum_k f_k P_k (default: 0.1 with the shared core, else 0)
    balance: float = None
    # the routers' learning rate: lr * router_lr (0 freezes routing at its initialization)
    router_lr: float = 1.0
    # weight of CE(router logits, y mod N), the authors' router target (default: 6 with --router authors,
    # else 0)
    router_supervision: float = None
    # --- optimization (the authors' settings; SGD momentum 0.9, weight decay 5e-4)
    # training epochs (an epoch is one pass of B_psi over the training set; sparse: after epochs/5 of pruning)
    epochs: int = 100
    # images per batch (each of B_phi and B_psi for advmoe)
    batch_size: int = 128
    # SGD learning rate, cosine-annealed per iteration to 0
    lr: float = 0.1
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
    # autoattack (standard, Table 2; both need torchattacks); RA-worst: robust under all of them
    eval_attacks: str = "pgd"
    # images for AutoAttack, the first ones of the evaluation (0: all)
    aa_n: int = 0
    # images of the per-epoch SA / RA (PGD-10) check, on the validation split when there is one (0: none)
    quick_eval_n: int = 500
    # queries of the Square attack
    square_queries: int = 5000
    # --- the run
    # run folder (result.json, checkpoint.pt, log.jsonl; default: runs/<name>)
    out: str = ""
    # continue the run in --out from its last checkpoint (--epochs may grow)
    resume: bool = False
    # evaluate this checkpoint.pt instead of training
    eval_only: str = ""
    # auto | cpu | cuda | cuda:K
    device: str = "auto"
    # torch.compile the training forwards (on CUDA one graph, replayed as CUDA graphs)
    compile: bool = False
    def __post_init__(self):
        """A bad value: a one-line ConfigError naming the flag and the fix. Defaults left None are derived."""
        if self.shared_core is None:  # deviation 14's recipe: upcycled shared-core experts, balanced
            self.shared_core = self.method in MOE_METHODS and self.router != "authors"
        derived = {"eps": 2 / 255 if self.dataset in ("tinyimagenet", "imagenet") else 8 / 255,
                   "router_supervision": AUTHORS_ALPHA if self.router == "authors" else 0.0,
                   "tie_epochs": self.epochs // 4 * self.shared_core, "balance": 0.1 * self.shared_core}
        vars(self).update({k: v for k, v in derived.items() if getattr(self, k) is None})
        # (the test a value passes, its flags, what it must be); --eval-attacks: a comma-separated list
        finite = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
        rules = [
            (lambda v: v > 0, "n_experts train_steps test_steps square_queries epochs batch_size", "> 0"),
            (lambda v: v >= 0, "eval_n quick_eval_n aa_n train_n val_n tie_epochs", ">= 0"),
            (finite, "lr balance router_lr router_supervision", "finite, >= 0"),
            (lambda v: finite(v) and v <= 1, "eps", "a radius in pixels of [0,1] images: 0.0314"),
            (lambda v: 0 < v <= 1, "ratio", "in (0, 1]: an expert keeps r of the channels"),
            (lambda v: 0 < v <= 64, "width", "in (0, 64]: the backbone's channel multiplier"),
            *[(lambda v, a=a: set(v.split(",")) <= set(a), k, f"one of {', '.join(a)}") for k, a in {
                "dataset": DATASETS, "arch": ARCHS, "method": METHODS, "eval_attacks": EVAL_ATTACKS,
                "loss": ("trades", "pgdat", "natural"), "router": ("layer", "global", "authors"),
                "train_params": ("all", "routers", "backbone")}.items()]]
        for ok, names, must in rules:
            if bad := [name for name in names.split() if not ok(getattr(self, name))]:
                raise ConfigError(f"{flag(bad[0])} {getattr(self, bad[0])!r} must be {must}")
        if self.method in MOE_METHODS and self.n_experts < 2:
            raise ConfigError(f"--method {self.method} needs --n-experts 2 or more (one: --method sdense)")
        if self.tie_epochs and not self.shared_core:
            raise ConfigError("--tie-epochs ties the offsets of shared-core experts: add --shared-core")
        if self.method == "sparse" and self.ratio == 1:
            raise ConfigError("--method sparse keeps a fraction --ratio of the channels: give one below 1")
        if self.train_params != "all" and (self.method != "moe" or not self.init):
            raise ConfigError(f"--train-params {self.train_params} freezes part of an MoE-CNN: use it with "
                              f"--method moe and --init CKPT")
        if {"square", "autoattack"} & set(self.attacks):
            import_torchattacks()  # fail now, not after training
    attacks = property(lambda self: tuple(dict.fromkeys(self.eval_attacks.split(","))))  # each attack once
    # NOTE(ours), deviation 13 / NOTE(official code): the training step, 5/255 at eps 8/255 and K = 2 (none in
    # the paper), scaled with eps and K (2.5 eps / K would throw TRADES' start to a corner). Test PGD: eps/4.
    train_step_size = property(lambda self: 1.25 * self.eps / self.train_steps)
    test_step_size = property(lambda self: self.eps / 4)
    # AT(Sparse) learns its channel scores for a fifth of the epochs first (the paper: 20 of 100; deviation 8)
    prune_epochs = property(lambda self: max(1, self.epochs // 5))
    # the model a method trains (AT(Sparse) ends in S-Dense's shape), and the run's default folder name
    model_ratio = property(lambda self: 1.0 if self.method == "dense" else self.ratio)
    model_experts = property(lambda self: self.n_experts if self.method in MOE_METHODS else 1)
    name = property(lambda self: f"{self.dataset}_{self.arch}_{self.method}_r{self.model_ratio:g}"
                                 f"_n{self.model_experts}_s{self.seed}")
    # what the method's functions read of these settings (section 2)
    objective = property(lambda self: Objective(self.loss, BETA, self.eps, self.train_step_size,
                                                self.train_steps, self.balance, self.router_supervision,
                                                self.router == "authors"))

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
def import_torchattacks():
    with contextlib.suppress(ImportError):
        return importlib.import_module("torchattacks")
    raise ConfigError("--eval-attacks square and autoattack need the optional package torchattacks: "
                      "pip install --no-deps torchattacks scipy")

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a bad type or an unknown flag: one line, like every other error
        raise ConfigError(f"{message} (python advmoe.py --help lists the flags)")

@functools.cache  # built from Settings' source once (argparse parsers keep no state between parse_args calls)
def settings_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The flags of Settings by group, each field's comment its help; defaults=False: only the flags given."""
    parser = Parser(usage="python advmoe.py [flags] | report DIR | bench [flags]", description="AdvMoE: "
                    "train and evaluate one model (the flags below), or: 'report DIR' (the tables from the "
                    "result.json files below DIR), 'bench' (step time, images/s, GFLOPs per method).")
    types, group, text = {"str": str, "int": int, "float": float}, parser, []
    for line in (line.strip() for line in inspect.getsource(Settings).splitlines()):
        if line.startswith("# ---"):
            group = parser.add_argument_group(line[5:].strip())
        elif line.startswith("#"):
            text.append(line[2:])
        elif f := Settings.__dataclass_fields__.get(line.split(":")[0]):  # f.type: the annotation, a string
            kw = {"action": argparse.BooleanOptionalAction} if f.type == "bool" else {"type": types[f.type]}
            shown = f" (default: {f.default})" if f.type != "bool" and f.default not in (None, "") else ""
            group.add_argument(flag(f.name), default=f.default if defaults else argparse.SUPPRESS,
                               help=" ".join(text) + shown, **kw)
            text = []
    return parser
def parse_settings(argv: list[str]) -> Settings:
    return Settings(**vars(settings_parser().parse_args(argv)))

# ==================================================================================================
# 8. Data: inputs in [0,1]; CIFAR-size sets kept on the device as uint8 with batched augmentation
# ==================================================================================================
class TensorData:
    """A data set as uint8 (B, 3, H, W) on the device, augmented a batch at a time; shard: (rank, world)."""
    def __init__(self, train: tuple, test: tuple, val: tuple, num_classes: int, device, shard=(0, 1)):
        splits = zip(("train", "test", "val"), (train, test, val))
        self.splits = {k: tuple(t.to(device) for t in v) for k, v in splits}
        self.num_classes, self.image_size, self.device = num_classes, train[0].shape[-1], device
        self.shard, self.sizes = shard, {k: len(v[1]) for k, v in self.splits.items()}
    def train_batches(self, batch_size: int, gen: torch.Generator):
        """One shuffle drawn at once from `gen`, each process its part; the last partial batch is dropped."""
        (x, y), pad = self.splits["train"], 4
        perm = own_part(torch.randperm(len(y), generator=gen), self.shard).to(self.device)
        shifts = torch.randint(0, 2 * pad + 1, (len(y), 2), generator=gen).to(self.device)  # crop offsets
        flips = (torch.rand(len(y), generator=gen) < 0.5).to(self.device)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            yield augment(x[idx], shifts[idx], flips[idx], pad), y[idx]
    def test_batches(self, batch_size: int, limit: int = 0, split: str = "test"):
        """The first `limit` images (0: all) of the test set or of the validation split, in order."""
        (x, y), n = self.splits[split], self.eval_len(limit, split)
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)].float() / 255, y[i:min(i + batch_size, n)]
    def eval_len(self, limit: int = 0, split: str = "test") -> int:  # images evaluated of `split`
        return min(limit or self.sizes[split], self.sizes[split])
    def train_len(self, batch_size: int) -> int:  # batches per epoch and process
        return self.sizes["train"] // self.shard[1] // batch_size

def own_part(perm: torch.Tensor, shard: tuple) -> torch.Tensor:
    """This process's part of a shuffle, as many images in each (an extra batch would hang in all-reduce)."""
    return perm[:len(perm) - len(perm) % shard[1]][shard[0]::shard[1]]
def augment(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding `pad` and horizontal flip of a uint8 batch, in one gather."""
    b, c, h, w = x.shape
    x = F.pad(x, (pad, pad, pad, pad))                                        # (B, C, H+2p, W+2p)
    rows = shifts[:, 0, None] + torch.arange(h, device=x.device)              # (B, H)
    cols = shifts[:, 1, None] + torch.arange(w, device=x.device)              # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)                    # a flip reads them backwards
    bi, ci = torch.arange(b, device=x.device), torch.arange(c, device=x.device)
    x = x[bi[:, None, None, None], ci[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return x.float() / 255                                                    # (B, C, H, W)

class FolderData(TensorData):
    """TinyImageNet / ImageNet: ImageFolder trees DATA_DIR/<name>/{train,val}/<class>/ via a DataLoader."""
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
        self.shard, self.sizes = shard, {k: len(v) for k, v in self.splits.items()}
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

SYNTHETIC = (2048, 512)  # training and test images of the synthetic set (--train-n and --eval-n take fewer)
@functools.cache  # the same tensors for every run of a process (nothing writes into them)
def synthetic_data(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0):
    """Offline CIFAR-shaped images: a class's smooth colour pattern, a smooth nuisance, noise (learnable)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g), size=32, mode="bilinear")
    def draw(n):
        y = torch.randint(num_classes, (n,), generator=g)
        nuisance = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")
        x = 0.6 * protos[y] + 0.3 * nuisance + 0.1 * torch.rand(n, 3, 32, 32, generator=g)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    return draw(n_train), draw(n_test)
def load_cifar(name: str, root: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CIFAR-10/100 as uint8 (B, 3, 32, 32): DATA_DIR/<name>_{train,test}.npz, else torchvision's copy."""
    npz = [root / f"{name}_{split}.npz" for split in ("train", "test")]
    if any(p.exists() for p in npz):
        return [read_npz(p) for p in npz]
    from torchvision.datasets import CIFAR10, CIFAR100
    try:
        sets = [(CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train, download=True)
                for train in (True, False)]
    except Exception as e:
        raise ConfigError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}): run "
                          f"once online, or put {name}_train.npz and {name}_test.npz in --data-dir") from None
    return [as_nchw(d.data, d.targets) for d in sets]
def as_nchw(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as stored (N, H, W, 3) and labels (N,) -> (N, 3, H, W) in their dtype, and int64 labels."""
    return rearrange(torch.as_tensor(x), "n h w c -> n c h w").contiguous(), torch.as_tensor(y).long()
def read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """DATA_DIR/<name>_<split>.npz: x uint8 (N, H, W, 3) -> (N, 3, H, W), y (N,) integer labels."""
    import numpy as np
    try:
        with np.load(path) as z:
            x, y = as_nchw(z["x"], z["y"])
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and y.shape == x.shape[:1]
    except Exception as e:  # missing, not a zip, truncated, no x or y, wrong shapes
        raise ConfigError(f"{path} cannot be read ({type(e).__name__}): it must be an .npz of x (uint8 "
                          f"images N, H, W, 3) and y (N integer labels)") from None
    return x, y

SPLIT_SEED = 0  # the --train-n subset and the --val-n split: the same images for every run and seed
def split_train(n: int, train_n: int, val_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices (train, val): val a fixed shuffle's first val_n, train its next train_n (0: rest)."""
    if val_n >= n or train_n + val_n > n:
        raise ConfigError(f"--train-n {train_n} plus --val-n {val_n} exceed the {n} training images: "
                          f"lower them")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[val_n:val_n + (train_n or n)].sort().values, perm[:val_n].sort().values
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
# 9. The training loop; data parallelism under torchrun
# ==================================================================================================
def build_model(s: Settings, num_classes: int, image_size: int) -> MoECNN:
    return MoECNN(s.arch, num_classes, image_size, s.model_ratio, s.model_experts, s.router,
                  MEAN_STD[s.dataset], s.width, s.shared_bn, s.router_standardize, s.shared_core)
def resolve_device(name: str) -> torch.device:
    with contextlib.suppress(RuntimeError):
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        if device.type == "cpu" or device.type == "cuda" and (device.index or 0) < torch.cuda.device_count():
            return device
    raise ConfigError(f"--device {name} is not a device torch sees here: use cpu, or cuda / cuda:K on a GPU")
def compiled(model: nn.Module, on: bool, device) -> nn.Module:
    """--compile: torch.compile of the training forwards (on CUDA one graph, replayed as CUDA graphs)."""
    cuda = device.type == "cuda"
    return torch.compile(model, fullgraph=cuda, mode="reduce-overhead" if cuda else None) if on else model
def train(s: Settings, log: Callable[[str], None] = print) -> dict | None:
    """Train one model, evaluate it, write <out>/result.json and return it; a checkpoint and a log.jsonl row
    per epoch. Under torchrun each process trains on its part of every batch; rank 0 writes and evaluates."""
    rank, world, device = distributed(s)
    log, out = (log if rank == 0 else (lambda _: None)), Path(s.out or f"runs/{s.name}")
    if rank == 0:  # only rank 0 writes
        check_out(out, s)
    torch.manual_seed(s.seed)
    data = load_data(s, device, (rank, world))
    if data.train_len(s.batch_size) == 0:
        raise ConfigError(f"--batch-size {s.batch_size} is larger than the training set: lower it")
    model = build_model(s, data.num_classes, data.image_size).to(device)
    opts = make_optimizers(model, s, device)
    start, history, seconds, extra = starting_point(out, model, opts, s, data, rank, log)
    sync_model(model)
    net = compiled(model, s.compile, device)  # checkpoints and evaluation use the module itself
    for epoch in range(start, s.epochs):
        t0 = time.perf_counter()
        row = {"epoch": epoch + 1, **train_epoch(net, opts, data, s, epoch, device, log)}
        sync_model(model)  # rank 0's BatchNorm statistics everywhere
        seconds += time.perf_counter() - t0
        if rank == 0:
            history.append(epoch_row(row, model, opts, data, s, history, extra, t0, log))
            save_checkpoint(out / "checkpoint.pt", model, opts, s, epoch + 1, history, seconds, extra)
            # log.jsonl: epoch 0's row (the routing before training) goes with the first epoch's
            first = [{"epoch": 0, "routing": extra["routing_epoch0"]}] if "routing_epoch0" in extra else []
            with open(out / "log.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in (first if epoch == 0 else []) + [row])
    # all leave together (a gloo group torn down while rank 0 evaluates can abort): a barrier that outwaits it
    done = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) if world > 1 else None
    try:
        return finish(model, data, s, out, history, seconds, device, log, {"world_size": world, **extra}) \
            if rank == 0 else None
    finally:
        if done:
            dist.barrier(group=done)

PROGRESS_SECONDS = 30.0  # at least this long between two progress lines of training
def train_epoch(net: nn.Module, opts: dict, data, s: Settings, epoch: int, device, log) -> dict:
    """One epoch of the method's step; returns the epoch's mean statistics (one host sync, at the end)."""
    (step, streams), iters = STEPS[s.method], data.train_len(s.batch_size)
    freeze_batchnorm(net.train(), s.train_params)
    sums, bad_step, total = {}, torch.full((), -1, device=device), iters * s.batch_size * streams
    start = last = time.perf_counter()
    for it, batches in enumerate(batch_streams(data, s, epoch)):
        set_lr(opts, (epoch * iters + it) / (s.epochs * iters), tied=epoch < s.tie_epochs)
        # NOTE(ours), deviation 12: training on CUDA runs under bf16 autocast (evaluation in float32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            stats = step(net, opts, batches, s.objective, average_gradients)
        sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
        # the first non-finite step of either level, remembered without a host sync
        finite = torch.isfinite(stats["loss"]) & torch.isfinite(stats.get("router_loss", stats["loss"]))
        bad_step = torch.where((bad_step < 0) & ~finite, it, bad_step)
        if (now := time.perf_counter()) - last >= PROGRESS_SECONDS:  # images done, images/s, ETA, loss
            done, last = (it + 1) * s.batch_size * streams, now
            rate = done / (now - start)
            log(f"  epoch {epoch + 1}/{s.epochs}: {done}/{total} images, {rate:.1f} img/s, ETA "
                f"{(total - done) / rate:.0f} s loss {sums['loss'].item() / (it + 1):.4f}")
    if bad_step.item() >= 0:
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, iteration {bad_step.item() + 1} "
                                 f"(the last checkpoint is kept): lower --lr or check the data")
    return {k: round(v.item() / (it + 1), 4) for k, v in sums.items()}
def epoch_row(row: dict, model, opts: dict, data, s: Settings, history: list, extra: dict, t0, log) -> dict:
    """The epoch's log row and line: training statistics, learning rates, SA / RA (PGD-10), the routing."""
    row.update({f"lr_{g['name']}": round(g["lr"], 6) for o in opts.values() for g in o.param_groups})
    if s.quick_eval_n and row["epoch"] < s.epochs:
        split = "val" if data.eval_len(split="val") else "test"  # settings are chosen there
        quick = evaluate(model, data, s, steps=10, limit=s.quick_eval_n, split=split)
        row.update(sa=quick["sa"], ra_pgd10=quick["ra"], quick_split=split)
    previous = history[-1].get("routing") if history else extra.get("routing_epoch0")
    if r := routing_snapshot(model, data, previous):
        row.update(routing=r, expert_spread=expert_spread(model))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    shown = ("loss", "acc", "acc_adv", "router_loss", "router_reg", "sa", "ra_pgd10", "seconds")
    text = " ".join(f"{k} {row[k]:.4g}" for k in shown if k in row)
    if r:
        text += f" | routing: collapsed {r['collapsed']}/{len(r['top_share'])}, majority changed in " \
                f"{r.get('majority_changed')}, top-expert share max {max(r['top_share']):.2f}, expert " \
                f"spread {sum(row['expert_spread']) / len(row['expert_spread']):.3f}"
    log(f"epoch {row['epoch']}/{s.epochs} {text}")
    return row
def routing_snapshot(model: nn.Module, data, previous: dict | None = None, fresh: bool = False):
    """The routing of the first 256 validation (else test) images: per layer the top expert's share and the
    majority, layers collapsed (>= 95%), pathways, majorities changed; fresh (epoch 0): train mode, a copy."""
    if not router_params(model):
        return None
    split = "val" if data.eval_len(split="val") else "test"
    net = copy.deepcopy(model).train() if fresh else model
    with (contextlib.nullcontext() if fresh else evaluating(net)), torch.no_grad():
        choice = torch.cat([torch.stack([g.choice for g in net(x, return_routing=True)[1]], 1)   # (b, L)
                            for x, _ in data.test_batches(256, 256, split)])                  # (n, L)
    # f_{l,k}: the share of the inputs layer l routes to expert k, (L, N)
    top, majority = F.one_hot(choice, int(choice.max()) + 1).float().mean(0).max(1)
    snap = {"split": split, "images": len(choice), "top_share": rounded(top), "majority": majority.tolist(),
            "collapsed": int((top >= 0.95).sum()), "pathways": pathway_diversity(choice)}
    if previous:
        snap["majority_changed"] = sum(a != b for a, b in zip(snap["majority"], previous["majority"]))
    return snap
def expert_spread(model: nn.Module) -> list[float]:
    """Per MoE layer, mean_e ||W_e - W_ref|| / ||W_ref|| (W_ref: the shared core, or the experts' mean)."""
    spread = []
    for m in (m for m in model.modules() if isinstance(m, MoEConv) and m.n > 1):
        w = m.filters().detach().view(m.n, m.cout, -1)                           # (N, cout, cin*k*k)
        ref = w.mean(0) if m.core is None else m.core.detach().view(m.cout, -1)
        spread.append(((w - ref).flatten(1).norm(dim=1) / ref.norm()).mean())
    return rounded(torch.stack(spread)) if spread else []  # one host read
def freeze_batchnorm(model: nn.Module, train_params: str):
    """--train-params: the frozen part's BatchNorms (and MoEConvs, which hold them) in eval mode."""
    for name, m in model.named_modules():
        if train_params != "all" and isinstance(m, (nn.BatchNorm2d, MoEConv)) and \
                ("router" in name) == (train_params == "backbone"):
            m.eval()

# torchrun: each process trains on its own part of the same shuffles (own_part); gradients are averaged by
# one all-reduce per level (NOTE(ours), deviation 12)
def distributed(s: Settings) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun, joins the process group (NCCL, a GPU each; CPU: gloo)."""
    world, device = int(os.environ.get("WORLD_SIZE", "1")), resolve_device(s.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device
def average_gradients(params: list[nn.Parameter]):
    """The mean gradient over processes in one flat all-reduce (a parameter not reached: a zero gradient)."""
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
# 10. AT(Sparse): robustness-aware channel pruning of a Dense network (HYDRA, for channels)
# ==================================================================================================
def channel_wiring(model: MoECNN) -> dict[nn.Module, tuple[tuple, str]]:
    """Per layer: (the channel groups its input concatenates, the group it writes); NOTE(ours), deviation 8:
    summed outputs (a residual stream) are one group, pruned alike."""
    net, wire = model.backbone, {}
    if isinstance(net, (ResNet18, WideResNet)):
        # stream k ("stage{k}"): every conv2 and projection until the next projection; the stem's is ResNet's
        # stage1 (identity blocks follow) but WRN's stage0 (its first block projects)
        stage = int(net.blocks[0].shortcut is None)
        wire[net.stem.conv] = ((), f"stage{stage}")
        for i, block in enumerate(net.blocks, 1):
            reads, mid, stage = (f"stage{stage}",), f"block{i}_mid", stage + (block.shortcut is not None)
            wire[block.conv1], wire[block.conv2] = (reads, mid), ((mid,), f"stage{stage}")
            if block.shortcut is not None:
                wire[block.shortcut] = (reads, f"stage{stage}")
            if isinstance(block, WideBlock):  # its pre-activation BatchNorm
                wire[block.bn1] = (reads, "")
        groups = (f"stage{stage}",)
    elif isinstance(net, VGG16):  # a chain: conv k reads conv k-1's output (conv1: the stem's)
        wire[net.stem.conv], groups = ((), "conv1"), ("conv1",)
        for k, conv in enumerate((m for m in net.layers if isinstance(m, MoEConv)), 2):
            wire[conv], groups = (groups, f"conv{k}"), (f"conv{k}",)
    else:  # DenseNet: layer k reads every group before it and appends its own; a transition starts anew
        wire[net.stem.conv], groups = ((), "stem"), ("stem",)
        for k, layer in enumerate(net.layers, 1):
            if isinstance(layer, DenseLayer):
                wire[layer.bn], wire[layer.conv1] = (groups, ""), (groups, f"layer{k}_mid")
                wire[layer.conv2], groups = ((f"layer{k}_mid",), f"layer{k}"), groups + (f"layer{k}",)
            else:  # transition t: the t-th non-DenseLayer, this one included
                name = f"transition{sum(not isinstance(m, DenseLayer) for m in net.layers[:k])}"
                wire[layer["bn"]], wire[layer["conv"]], groups = (groups, ""), (groups, name), (name,)
    # the last groups are read by the final pre-activation BatchNorm (WRN, DenseNet) and the classifier
    wire.update({m: (groups, "") for m in (getattr(net, "bn", None), net.fc) if m is not None})
    return wire
def channel_groups(model: MoECNN) -> dict[str, int]:
    """Every channel group (see channel_wiring) and its number of channels."""
    return {g: m.weight.shape[0] for m, (_, g) in channel_wiring(model).items() if isinstance(m, MoEConv)}
def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """1 on the k highest scores, 0 elsewhere; straight-through, d mask / d scores = identity (HYDRA)."""
    return torch.zeros_like(scores).scatter_(0, scores.topk(k).indices, 1.0) + (scores - scores.detach())

class ChannelScores(nn.Module):
    """A Dense network with a score per channel of each group; forward zeroes all but a group's top r*C."""
    def __init__(self, dense: MoECNN, ratio: float):
        super().__init__()
        self.dense, self.spec, self.wiring = dense, Spec(ratio), channel_wiring(dense)
        # HYDRA starts from the weights: s_g[c] = sum over the convs writing group g of ||W[c]||_2, / its max
        norms: dict[str, torch.Tensor] = {}
        for m, (_, group) in self.wiring.items():
            if isinstance(m, MoEConv):
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
        # the convs and the classifier read masked inputs, for this forward only (BatchNorms are per channel)
        hooks = [m.register_forward_pre_hook(zero_pruned) for m, (reads, _) in self.wiring.items()
                 if reads and not isinstance(m, nn.BatchNorm2d)]
        try:
            return self.dense(x, return_routing, dispatch)
        finally:
            for h in hooks:
                h.remove()

def extract_sparse(dense: MoECNN, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pruned network as S-Dense's state dict: each layer's kept rows (outputs) and columns (inputs)."""
    sizes, wiring = channel_groups(dense), channel_wiring(dense)
    def kept(groups: tuple) -> torch.Tensor:  # the kept channels of a concatenation of groups, in its indices
        offsets = [0] + torch.tensor([sizes[g] for g in groups]).cumsum(0).tolist()
        return torch.cat([keep[g].to(dense.mean.device) + o for g, o in zip(groups, offsets)])
    state = {"mean": dense.mean, "std": dense.std}
    for name, m in dense.named_modules():
        if m in wiring:
            reads, writes = wiring[m]
            # kept rows (output channels): those of the group written, or for a pre-activation BatchNorm of
            # the groups read; kept columns (input channels): those of the groups read (the stem: all 3 RGB)
            rows = kept((writes,)) if writes else kept(reads) if isinstance(m, nn.BatchNorm2d) else None
            cols = kept(reads) if reads else None
            for k, v in m.state_dict().items():  # weights, BatchNorm affine and statistics, biases
                v = v[rows] if rows is not None and v.dim() else v
                # W_sparse = W[kept rows][:, kept columns], (r*C_out, r*C_in, k, k)
                state[f"{name}.{k}"] = v[:, cols] if cols is not None and v.dim() > 1 else v
    return {k: v.detach().clone() for k, v in state.items()}
def prune(s: Settings, data, device, log) -> tuple[dict, dict]:
    """AT(Sparse), phase 1: learn the --init Dense network's channel scores; (pruned state dict, entry)."""
    dense = MoECNN(s.arch, data.num_classes, data.image_size, mean_std=MEAN_STD[s.dataset], width=s.width)
    if s.init:
        want = {"dataset": s.dataset, "arch": s.arch, "method": "dense", "width": s.width}
        load_weights(dense.to(device), read_checkpoint(s.init), s.init, want)
    else:
        log("warning: --method sparse without --init prunes random weights (HYDRA prunes a trained model: "
            "give --init <AT(Dense) run>/checkpoint.pt)")
    # the scores alone are trained (the Dense weights frozen), on the cosine schedule of the pruning epochs
    pruner, history = ChannelScores(dense.to(device).requires_grad_(False), s.ratio), []
    phase = dataclasses.replace(s, epochs=s.prune_epochs)
    opt = torch.optim.SGD([{"params": list(pruner.scores.values()), "base_lr": s.lr, "name": "scores"}],
                          lr=s.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for epoch in range(s.prune_epochs):
        t0, stats = time.perf_counter(), train_epoch(pruner, {"all": opt}, data, phase, epoch, device, log)
        history.append({"epoch": epoch + 1, **stats, "seconds": round(time.perf_counter() - t0, 2)})
        log(f"pruning epoch {epoch + 1}/{s.prune_epochs}: loss {stats['loss']:.4f}")
    keep = pruner.keep()
    kept = {g: len(v) for g, v in keep.items()}
    log(f"pruned to {sum(kept.values())} of {sum(channel_groups(dense).values())} channels")
    return extract_sparse(dense, keep), {"sparse": {"init": s.init or None, "kept": kept,
                                                    "prune_history": history}}

# ==================================================================================================
# 11. Files: result.json, checkpoints (data, not code), --resume and --eval-only
# ==================================================================================================
def finish(model, data, s: Settings, out: Path, history: list, seconds: float, device, log, extra=None):
    """The final evaluation (and on the validation split every attack but AutoAttack), then result.json."""
    log(f"evaluating: SA and RA under PGD-{s.test_steps} on {s.eval_n or 'all'} test images")
    t0, ev = time.perf_counter(), evaluate(model, data, s, limit=s.eval_n, attacks=s.attacks, log=log)
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
              "device": device_name(device), "torch": torch.__version__, "commit": COMMIT, **(extra or {}),
              "settings": dataclasses.asdict(s), "history": history}
    write_json(out / "result.json", result)
    others = "".join(f"  {k} {v:.2f}" for k, v in result["attacks"].items() if not k.startswith("pgd"))
    log(f"SA {result['sa']:.2f}  RA {result['ra']:.2f}{others}  RA-worst {result['ra_worst']:.2f}  GFLOPs "
        f"{result['gflops']:.3f}  -> {out / 'result.json'}")
    return result
def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, check=True).stdout.strip()
COMMIT = git_commit()  # read at import: the code that runs, even if the checkout moves on during a long run
def atomic_write(path: Path, write: Callable[[str], None]):
    """Write a temporary file in the same folder, then rename it: a file is there whole, or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
def write_json(path: Path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))
def check_out(out: Path, s: Settings):
    """The run's folder (made with the run's first file): one that holds a run is never replaced silently."""
    found = [f for f in ("result.json", "checkpoint.pt", "log.jsonl") if (out / f).exists()]
    if found and (s.eval_only or not s.resume):
        raise ConfigError(f"--out {out} already holds {'an evaluation' if s.eval_only else 'a run'} "
                          f"({', '.join(found)}): remove that folder or choose another --out"
                          f"{'' if s.eval_only else ', or continue the run with --resume'}")
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:  # a probe, removed: the folder is made again with the run's first file
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {out} ({e.strerror}): choose another --out") from None
    for p in created:
        p.rmdir()

# what a checkpoint's weights fit, and the flags that build its model
MODEL_FIELDS = ("arch", "method", "ratio", "n_experts", "router", "width", "shared_bn", "router_standardize",
                "shared_core")
IDENTITY = ("method", "dataset", "arch", "model_ratio", "model_experts") + MODEL_FIELDS[4:]
# what a checkpoint that does not record a setting was trained with
LEGACY = {"shared_bn": False, "router_standardize": True, "shared_core": False, "tie_epochs": 0}
# switches results/ still holds runs of, removed from this file, and their defaults (report: recipe)
REMOVED = {"layout": "position", "soft_epochs": 0}
# flags of the run and of its evaluation: --resume and --eval-only may change them, not the recipe
RUN_FIELDS = ("out", "resume", "eval_only", "device", "data_dir", "compile", "aa_n")
EVAL_FIELDS = ("eval_n", "eval_attacks", "quick_eval_n", "square_queries", "test_steps")
def save_checkpoint(path: Path, model, opts: dict, s: Settings, epoch: int, history: list, seconds, extra):
    """All that --resume needs; extra: AT(Sparse)'s mask, the routing of epoch 0."""
    atomic_write(path, lambda tmp: torch.save({
        "settings": dataclasses.asdict(s), "identity": {k: getattr(s, k) for k in IDENTITY}, "epoch": epoch,
        "history": history, "train_seconds": seconds, "extra": extra, "model": model.state_dict(),
        "opts": {k: o.state_dict() for k, o in opts.items()}, "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}, tmp))
def read_checkpoint(path: Path | str) -> dict:
    """A checkpoint of save_checkpoint loaded as data (weights_only), anything else a one-line ConfigError;
    settings this file does not know set aside, those it does not record what it was trained with (LEGACY)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert all(k in ckpt for k in ("settings", "identity", "epoch", "history", "train_seconds", "model"))
    except Exception as e:  # missing, a folder, truncated, garbage, a pickle needing code, a bare state_dict
        raise ConfigError(f"checkpoint {path} cannot be read as one of advmoe.py ({type(e).__name__}): give "
                          f"the checkpoint.pt of a run of advmoe.py") from None
    known = Settings.__dataclass_fields__
    return {**ckpt, "settings": {**LEGACY, **{k: v for k, v in ckpt["settings"].items() if k in known}},
            "identity": {**LEGACY, **ckpt["identity"]}}
def load_weights(model: nn.Module, ckpt: dict, path, want: dict | None = None):
    """model.load_state_dict of a read checkpoint; one of another model, or not `want`: a one-line error."""
    diff = [f"{k} {ckpt['identity'].get(k)!r} != {v!r}" for k, v in (want or {}).items()
            if ckpt["identity"].get(k) != v]
    try:
        assert not diff
        model.load_state_dict(ckpt["model"])
    except (AssertionError, RuntimeError) as e:
        first = "; ".join(diff) or (str(e).strip().splitlines()[1:] or [str(e)])[0].strip()[:160]
        raise ConfigError(f"checkpoint {path} is from another model ({first}): give one of this model, or "
                          f"the same settings") from None
def starting_point(out: Path, model, opts: dict, s: Settings, data, rank: int, log):
    """(first epoch, history, training seconds, extra): --resume from <out>/checkpoint.pt, or a fresh start
    (--init weights, or AT(Sparse)'s pruning) with the routing before training as extra's routing_epoch0."""
    path, t0, extra = out / "checkpoint.pt", time.perf_counter(), {}
    if not (s.resume and path.exists()):
        if s.method == "sparse":  # AT(Sparse): prune the --init Dense network, then fine-tune
            state, extra = prune(s, data, next(model.parameters()).device, log)
            model.load_state_dict(state)
        elif s.init:  # --init: another run's weights of the same model, of any method (IDENTITY[0])
            load_weights(model, read_checkpoint(s.init), s.init, {k: getattr(s, k) for k in IDENTITY[1:]})
        if rank == 0 and (routing := routing_snapshot(model, data, fresh=True)):
            extra["routing_epoch0"] = routing
            log(f"epoch 0 (before training): routing collapsed in {routing['collapsed']} of "
                f"{len(routing['top_share'])} MoE layers")
        if dist.is_initialized():
            torch.manual_seed(s.seed + rank)  # attack starts differ between processes
        return 0, [], time.perf_counter() - t0 if s.method == "sparse" else 0.0, extra
    ckpt = read_checkpoint(path)
    changed = [f"{flag(k)} {v} -> {getattr(s, k)}" for k, v in ckpt["settings"].items()
               if k not in RUN_FIELDS + EVAL_FIELDS + ("epochs", "tie_epochs") and v != getattr(s, k)]
    if changed or s.epochs < ckpt["epoch"]:
        raise ConfigError(f"--resume continues the run in {path} ({ckpt['epoch']} epochs): only --epochs "
                          f"(not fewer), --tie-epochs and evaluation or run flags may change "
                          f"({'; '.join(changed) or 'fewer epochs'}): give its values, or start a new --out")
    load_weights(model, ckpt, path)
    for k, o in opts.items():
        o.load_state_dict(ckpt["opts"][k])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    if rank == 0 and (out / "result.json").exists():  # a finished run evaluated again: keep its result
        os.replace(out / "result.json", out / f"result_epoch{ckpt['epoch']}_{time.strftime('%m%d%H%M')}.json")
    log(f"resumed {path} after epoch {ckpt['epoch']}")
    return ckpt["epoch"], ckpt["history"], ckpt["train_seconds"], ckpt.get("extra") or {}
def eval_only(s: Settings, given: set[str] = frozenset(), log=print) -> dict:
    """Evaluate s.eval_only at its settings but the run's flags and those `given`; to --out (<dir>/eval)."""
    ckpt = read_checkpoint(s.eval_only)
    if clash := [flag(k) for k in MODEL_FIELDS if k in given and getattr(s, k) != ckpt["settings"].get(k)]:
        raise ConfigError(f"--eval-only rebuilds the checkpoint's model: drop {', '.join(clash)}")
    s = Settings(**{**ckpt["settings"], **{k: getattr(s, k) for k in set(given) | set(RUN_FIELDS)}})
    out, device = Path(s.out or Path(s.eval_only).parent / "eval"), resolve_device(s.device)
    check_out(out, s)
    data = load_data(s, device)
    model = build_model(s, data.num_classes, data.image_size).to(device)
    load_weights(model, ckpt, s.eval_only)
    return finish(model, data, s, out, ckpt["history"], ckpt["train_seconds"], device, log)

# ==================================================================================================
# 12. Report: Tables 1-2, Figs. 7-8 and the Sec. 4 study from result.json files (not Fig. 6, Table 3)
# ==================================================================================================
TABLE1 = ("sdense", "sparse", "moe", "advmoe", "dense")  # Table 1's rows; AT(Dense) is the reference
# Insight 2's split of PGD examples, in % of the split n test images classified correctly when clean
SPLIT = {"router robustness": "routing.router_robustness", "(uncollapsed layers)":
         "routing.router_robustness_uncollapsed", "MoE robustness": "routing.moe_robustness", "split n":
         "routing.split_n", **{f"({i})": f"routing.split_4way.{k}" for i, k in enumerate(SPLIT_4WAY, 1)}}
def key(path: str) -> Callable[[dict], object]:
    """A getter of a result.json entry: key("routing.split_n")(r) = r["routing"]["split_n"], or None."""
    return lambda r: functools.reduce(lambda d, k: (d or {}).get(k), path.split("."), r)
def read_results(root: Path) -> list[dict]:
    """Every result.json below root, with its folder as "path"; one unreadable is skipped with a warning."""
    results = []
    for p in sorted(root.rglob("result.json")):
        try:
            r = json.loads(p.read_text())
            assert all(k in r for k in ("dataset", "arch", "method", "sa", "ra", "settings", "routing"))
            results.append({**r, "path": str(p.parent.relative_to(root))})
        except (OSError, ValueError, AssertionError, TypeError) as e:
            print(f"advmoe: warning: skipping {p}, not a complete result.json ({e!r:.60})", file=sys.stderr)
    return results
def recipe(r: dict) -> tuple:
    """What a run trained and how: its settings (LEGACY where unrecorded) but the seed and the run flags; a
    switch since removed (REMOVED: its default then) still tells its runs apart where not at its default."""
    run = RUN_FIELDS + ("seed", "quick_eval_n")
    return tuple(sorted((k, str(v)) for k, v in {**LEGACY, **r["settings"]}.items()
                        if k in Settings.__dataclass_fields__ and k not in run or REMOVED.get(k, v) != v))
def cell(runs: list[dict], get: Callable, digits: int = 2) -> str | None:
    """The mean over runs (the seeds of one recipe) of get(run), ± half the range (the number of runs)."""
    v = [x for x in map(get, runs) if x is not None]
    spread = f" ± {(max(v) - min(v)) / 2:.{digits}f} ({len(v)})" if len(v) > 1 else ""
    return f"{sum(v) / len(v):.{digits}f}{spread}" if v else None
def table(title: str, runs: list[dict], columns: dict, note: str = "", per_run: bool = False) -> list[str]:
    """A markdown table, a cell per column (a result.json key path or a getter): a row per run (its folder),
    or per recipe (the settings telling rows apart, its seeds, then cells over its seeds). Blank: not run."""
    getters, groups = [key(c) if isinstance(c, str) else c for c in columns.values()], {}
    for r in runs:
        groups.setdefault(recipe(r), []).append(r)
    if per_run:
        rows = [[r["path"], *(get(r) for get in getters)] for r in runs]
    else:
        varying = [k for k in sorted({k for g in groups for k, _ in g}) if k != "init" and
                   len({dict(g).get(k) for g in groups}) > 1]
        rows = [[", ".join(f"{k} {dict(g).get(k)}" for k in varying) or "-",
                 ", ".join(str(r["seed"]) for r in rs),
                 *(cell(rs, get, 4 if name == "GFLOPs" else 2) for name, get in zip(columns, getters))]
                for g, rs in groups.items()]
    head = ["run"] if per_run else ["recipe", "seeds"]
    return [f"## {title}", "", *([note, ""] if note else []), "| " + " | ".join(head + [*columns]) + " |",
            "|---|" + "---:|" * (len(head) + len(columns) - 1),
            *("| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows), ""]
def trained(r: dict) -> bool:  # an adversarial training run of every parameter (not --eval-only, Sec. 4)
    st = r["settings"]
    return not st["eval_only"] and st["train_params"] == "all" and r["loss"] != "natural"
def collapsed(r: dict) -> int | None:  # layers where one expert takes >= 95% of the clean test images
    return sum(max(u) >= 0.95 for u in r["routing"]["usage_clean"]) if r["routing"] else None

# the columns of the per-run and per-recipe tables: a result.json key path, or a getter
ROUTING = {"method": "method", "SA": "sa", "RA": "ra", "collapsed at epoch 0": "routing_epoch0.collapsed",
           "collapsed": collapsed, "pathway entropy (bits)":
           "routing.pathways.clean.entropy_bits", "flip rate": "routing.flip_rate_any_layer", **SPLIT}
RECIPES = {"train acc": lambda r: 100 * r["history"][-1]["acc"], "val SA": "val.sa", "SA": "sa",
           "SA, random routing": "sa_random_routing", "RA (PGD)": "ra", "soft": "attacks.soft",
           "Square": "attacks.square", "RA-worst (no AA)": "ra_worst_without_aa", "RA-AA": "ra_aa",
           "collapsed": collapsed, "majority changes": lambda r: sum(
               key("routing.majority_changed")(h) or 0 for h in r["history"]) if r["routing"] else None,
           "GFLOPs": "gflops"}
RUNS = {**{c: c for c in ("method", "loss", "epochs", "sa", "ra", "ra_worst", "gflops", "eval_n", "device")},
        "commit": lambda r: (r["commit"] or "?")[:10]}
ROUTING_NOTE = ("Collapsed: layers sending >= 95% of the inputs to one expert. Split of PGD examples (% of "
                "the split n images correct clean): (1) neither routers nor prediction fooled, (2) routers "
                "only, (3) prediction only, (4) both; router robustness (1)+(3), MoE robustness (1)+(2).")
def report(folder: str) -> str:
    """Markdown of every result.json below `folder`, also in folder/report.md: Table 1 per data set and
    backbone, Table 2, Figs. 7-8, the Sec. 4 study, routing under attack, each recipe over its seeds, runs."""
    if not Path(folder).is_dir() or not (rs := read_results(Path(folder))):
        raise ConfigError(f"no result.json below {folder}: give the folder of the runs (--out inside it)")
    lines, moes = [f"# Results in {folder}", ""], [r for r in rs if r["routing"]]
    for dataset, arch in sorted({(r["dataset"], r["arch"]) for r in rs if trained(r)}):
        runs = [r for r in rs if trained(r) and (r["dataset"], r["arch"]) == (dataset, arch)]
        # Table 1: the paper's protocol (N = 2, r = 0.5, per-layer routers), a row per recipe
        paper = [r for r in runs if r["method"] in TABLE1 and r["n_experts"] <= 2 and r["router"] != "global"
                 and r["ratio"] == (1.0 if r["method"] == "dense" else 0.5)]
        lines += table(f"Table 1: {dataset}, {arch}", sorted(paper, key=lambda r: TABLE1.index(r["method"])),
                       {"SA": "sa", "RA": "ra", "GFLOPs": "gflops"})
        if len({(r["n_experts"], r["ratio"]) for r in runs if r["method"] == "advmoe"}) > 1:
            lines += table(f"Fig. 7: AdvMoE's RA over N and r, {dataset}, {arch}",
                           [r for r in runs if r["method"] == "advmoe"], {"RA": "ra"})
        fig8 = sorted((r for r in runs if r["n_experts"] in (1, 2)), key=lambda r: (r["ratio"], r["method"]))
        if len({r["ratio"] for r in fig8 if r["method"] != "dense"}) > 1:
            lines += table(f"Fig. 8: SA / RA over r (N = 2), {dataset}, {arch}", fig8, dict(SA="sa", RA="ra"))
    if aa := [r for r in rs if r.get("autoattack")]:  # (result.json has the RA after each component)
        lines += table("Table 2: AutoAttack (standard)", aa, {
            "method": "method", "SA": "sa", "RA (PGD, same images)": "autoattack.ra_pgd_same_images",
            "RA-AA": "ra_aa", "images": "autoattack.images"}, per_run=True)
    if study := [r for r in moes if r["loss"] == "natural" or r["settings"]["train_params"] != "all"]:
        stage = {"stage": lambda r: "natural" if r["loss"] == "natural" else r["settings"]["train_params"]}
        lines += table("Sec. 4 study (Insights 1-3)", study, {**stage, "SA": "sa", "RA": "ra", **SPLIT},
                       per_run=True)
    lines += moes and table("Routing before training and under attack", moes, ROUTING, ROUTING_NOTE, True)
    lines += table("Every recipe over its seeds", [r for r in rs if not r["settings"]["eval_only"]], RECIPES,
                   "train acc: the last epoch's; RA-worst: under every attack but AutoAttack; majority "
                   "changes: layers whose majority expert moved, over all epochs.")
    text = "\n".join(lines + table("Runs", rs, RUNS, per_run=True))
    atomic_write(Path(folder) / "report.md", lambda tmp: Path(tmp).write_text(text))
    return text

# ==================================================================================================
# 13. Bench: speed and cost, measured
# ==================================================================================================
def bench(argv: list[str], log=print) -> dict:
    """Per method on random CIFAR-size inputs: the first training step (--compile: compiling), the mean one,
    inference images/s at a large batch, GFLOPs as executed. Flags: training flags; --out FILE.json."""
    base = parse_settings(["--dataset", "synthetic", *argv])
    from torch.utils.benchmark import Timer  # (it synchronizes CUDA around what it times)
    device, rows, b = resolve_device(base.device), [], base.batch_size
    repeats, infer_batch, gpu = (20, 1024, True) if device.type == "cuda" else (3, 64, False)
    amp = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=gpu)
    seconds = lambda fn, n=1: Timer("fn()", globals={"fn": fn}).timeit(n).mean  # noqa: E731
    for method in ("dense", "sdense", "moe", "advmoe"):
        s = dataclasses.replace(base, method=method)
        model = build_model(s, 10, 32).to(device)
        opts, net, xb = make_optimizers(model, s, device), compiled(model, s.compile, device), torch.rand(
            infer_batch, 3, 32, 32, device=device)
        batches = [(torch.rand(b, 3, 32, 32, device=device), torch.randint(10, (b,), device=device))] * 2
        def step():
            with amp():
                STEPS[method][0](net.train(), opts, batches[:STEPS[method][1]], s.objective)
        row = {"method": method, "warmup_s": round(seconds(step), 2),
               "train_step_ms": round(1000 * seconds(step, repeats), 2)}
        with torch.no_grad(), evaluating(model), amp():
            row["infer_img_s"] = round(infer_batch / seconds(lambda: model(xb), repeats), 1)
        rows.append({**row, "gflops": round(gflops_per_input(model, xb[:16]), 4)})
        log(json.dumps(rows[-1]))
    result = {"device": device_name(device), "torch": torch.__version__, "commit": COMMIT, "arch": base.arch,
              "width": base.width, "batch": b, "infer_batch": infer_batch, "compile": base.compile,
              "rows": rows}
    if base.out:
        write_json(Path(base.out), result)
    return result

# ==================================================================================================
# 14. Command line
# ==================================================================================================
def main(argv: list[str] | None = None) -> int:
    """Flags: train and evaluate (or --eval-only); `report DIR`; `bench`. Exit status 0; 2 on bad input (one
    line on stderr, nothing written); 1 when a run diverged, 130 on Ctrl-C (both keep the last checkpoint)."""
    argv = sys.argv[1:] if argv is None else argv  # main() from a notebook reads the command line too
    usage = "usage: python advmoe.py report DIR: the paper's tables from the result.json files below DIR"
    try:
        if argv[:1] == ["report"]:
            if len(argv) != 2:
                raise ConfigError(usage)
            print(usage if argv[1] in ("-h", "--help") else report(argv[1]).rstrip("\n"))
        elif argv[:1] == ["bench"]:
            bench(argv[1:])
        elif (s := parse_settings(argv)).eval_only:
            eval_only(s, set(vars(settings_parser(defaults=False).parse_args(argv))))
        else:
            train(s)
    except (ConfigError, FloatingPointError) as e:  # bad input: 2; a run that diverged: 1
        print(f"advmoe: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        print("advmoe: interrupted: the checkpoint of the last finished epoch is kept (--resume continues)",
              file=sys.stderr)
        return 130
    finally:  # a gloo process group left to the interpreter's exit can abort the process (SIGABRT)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# ==================================================================================================
# Deviations from the paper, each marked NOTE(ours) where it is made
# ==================================================================================================
#  1. A BatchNorm per expert: the BatchNorm after a routed conv normalizes the inputs routed to each expert
#     with that expert's statistics and affine parameters (the authors' code shares one: --shared-bn).
#  2. Routers read their pooled features standardized per input, with no bias and a small init (the paper does
#     not say what a router reads; raw post-ReLU features collapse most layers onto one expert before
#     training). --no-router-standardize reads them raw.
#  3. Expert e of a layer owns filters [e*rC, (e+1)*rC) of one N*rC-filter weight and reads the pathway's r*C
#     channels by position, whichever expert wrote them (as the authors' code); the paper's text describes
#     experts as sub-networks of one backbone.
#  4. The stem is r*C wide and shared by the experts, so a pathway is exactly S-Dense (the authors' stem is 64
#     wide whatever r). ImageNet-size inputs get a 7x7/2 stem and a max-pool.
#  5. Pre-activation BatchNorms (WRN, DenseNet), projection shortcuts and the classifier act on the pathway's
#     r*C channels, shared by all experts (the authors' code routes WRN's projection shortcut).
#  6. Two independent shuffles feed B_phi and B_psi; an epoch is one pass of B_psi. In the lower level the
#     BatchNorm running statistics (buffers of psi) keep updating on B_phi.
#  7. Options the paper does not have, off by default: a router learning-rate multiplier (--router-lr),
#     class-mod-N router supervision (--router-supervision), the global router trained by the task loss
#     (--router global), the authors' routing (--router authors: a 3-layer router with no bias on the
#     normalized image, and no router KL inside the training attack, unlike theirs).
#  8. AT(Sparse) prunes channel groups: layers whose outputs are summed keep the same channels, so the pruned
#     network is really r*C wide. Its scores start from filter norms and are learned for epochs/5 epochs (the
#     paper's 20 of 100) before fine-tuning for --epochs.
#  9. AutoAttack is assembled from torchattacks' components at the reference settings (torchattacks' own
#     "standard" runs 10 iterations). The soft attack and Square are added to PGD (RA-worst).
# 10. The 4-way split of Insight 2 counts only the test images correct when clean (its % are of split_n).
# 11. GFLOPs count what runs on the sparse path (the chosen pathway and the routers), a multiply-add as 2;
#     the masked path, CUDA's default, runs every expert (N times the experts' FLOPs, as the authors' code).
# 12. torchrun averages each level's gradients with one all-reduce (DDP's reducer cannot follow a level's
#     partial backward); CUDA training runs under bf16 autocast; --width, --train-n, --val-n scale a run down.
# 13. The training attack's step is 1.25 eps / K (none in the paper; the authors': 5/255 at eps 8/255, K = 2).
# 14. MoE experts share a core (W_e = W_shared + D_e, D_e = 0 at init: the same FLOPs, 1.5x the weights at
#     N = 2), are tied for the first quarter of the epochs (upcycling) and trained with the Switch balance
#     term 0.1 (results/moe_learnability, round 3: with independent experts the MoE-CNN learned 16 points
#     worse than S-Dense; this recipe trails it by about 5). --no-shared-core (all three off) is the paper's.
#     Under TRADES on it (results/cifar10_laptop, round 2) AT(MoE) and AdvMoE match AT(S-Dense): the paper's
#     ordering AdvMoE > AT(MoE) is not seen at that scale.
