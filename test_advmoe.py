"""Invariants of advmoe.py. CPU only, offline (synthetic data), under two minutes on 2 cores:
    python -m pytest -q -n 2 test_advmoe.py      # pytest-xdist: two workers (without it, drop -n 2)
"""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import advmoe as A

HERE = Path(__file__).resolve().parent
# one thread a worker under pytest-xdist (-n 2: two workers on 2 cores; small convolutions gain nothing from a
# second thread), and for the subprocesses they start
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def tiny(**kw) -> A.Settings:
    """Settings for fast CPU runs on the synthetic set: 64 training images, 16 evaluated, quarter-width ResNet-18."""
    base = dict(dataset="synthetic", arch="resnet18", method="advmoe", ratio=0.25, epochs=1, batch_size=32,
                train_n=64, eval_n=16, test_steps=3, quick_eval_n=0, device="cpu", width=0.25)
    return A.Settings(**{**base, **kw})


def moe(arch="resnet18", **kw) -> A.MoECNN:
    return A.MoECNN(arch, 10, 32, kw.pop("ratio", 0.5), kw.pop("n_experts", 2), **kw)


def n_params(model, routers_only=False) -> int:
    return sum(p.numel() for p in (A.router_params(model) if routers_only else model.parameters()))


def expert(layer: A.MoEConv, e: int) -> slice:
    """Expert e's filters (and BatchNorm channels) in an MoEConv's one weight."""
    return slice(e * layer.cout, (e + 1) * layer.cout)


def expert_usage(gates: list) -> torch.Tensor:
    """(L, N): f_{l,k} = (1/B) sum_b [e_l(x_b) = k], the share of the batch each layer routes to expert k."""
    return torch.stack([F.one_hot(g.choice, g.logits.shape[1]).float().mean(0) for g in gates])


def step_of(s: A.Settings):
    """The method's step function (Algorithm 1 for advmoe, the joint step otherwise)."""
    return A.STEPS[s.method][0]


# One short command-line run: the synthetic set, 16 training images, a quarter-width ResNet-18.
B = ["--dataset", "synthetic", "--epochs", "1", "--train-n", "16", "--eval-n", "4", "--batch-size", "8",
     "--test-steps", "1", "--quick-eval-n", "0", "--ratio", "0.25", "--width", "0.25", "--device", "cpu"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The folder of a finished AdvMoE run of B (shared: tests that change it work on a copy, see copy_of)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert A.main(B + ["--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """The checkpoint of a finished AT(MoE) run of B."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert A.main(B + ["--out", str(out), "--method", "moe"]) == 0
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A finished two-epoch AdvMoE run of B (2 iterations an epoch), routers at half the learning rate: its
    folder, its result and what it logged."""
    out, lines = tmp_path_factory.mktemp("two") / "run", []
    result = A.train(A.parse_settings(B + ["--epochs", "2", "--router-lr", "0.5", "--out", str(out)]), log=lines.append)
    return out, result, lines


def copy_of(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


# ---------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch,dense_params", [("resnet18", 11_173_962), ("wrn28_10", 36_479_194),
                                               ("vgg16", 14_724_042), ("densenet", 176_122)])
def test_parameter_counts_shapes_and_cost(arch, dense_params):
    x = torch.rand(2, 3, 32, 32)
    dense, sdense, mixture = A.MoECNN(arch, 10, 32), A.MoECNN(arch, 10, 32, 0.5, 1), moe(arch)
    # Dense matches the published size of each backbone (CIFAR versions, 10 classes).
    assert n_params(dense) == dense_params
    # S-Dense keeps r*C channels everywhere: about r^2 of the parameters; no routers in Dense or S-Dense.
    assert 0.2 < n_params(sdense) / dense_params < 0.3
    assert n_params(dense, routers_only=True) == n_params(sdense, routers_only=True) == 0
    # MoE at N=2, r=0.5, conv by conv: a routed conv is two S-Dense-sized experts (filters and BatchNorm) and a
    # router reading its S-Dense-wide input; every other parameter is S-Dense's
    sd, routed = dict(sdense.named_parameters()), 0  # (routed: the parameters of routed convs)
    for name, p in mixture.named_parameters():
        if "router" in name:
            assert p.shape == (2, sd[name.replace("router.weight", "weight")].shape[1]), name
            continue
        layer = mixture.get_submodule(name.split(".weight")[0].split(".bias")[0].removesuffix(".bn"))
        if isinstance(layer, A.MoEConv) and layer.n == 2:
            assert p.shape == (2 * sd[name].shape[0], *sd[name].shape[1:]), name
            routed += 1
        else:
            assert p.shape == sd[name].shape, name
    moe_layers = sum(isinstance(m, A.MoEConv) and m.n == 2 for m in mixture.modules())
    assert routed > 0 and moe_layers == {"resnet18": 16, "wrn28_10": 24, "vgg16": 12, "densenet": 38}[arch]
    for model in (dense, sdense, mixture):
        assert model(x).shape == (2, 10)
    g_dense, g_sdense, g_moe = (A.gflops_per_input(m, x) for m in (dense, sdense, mixture))
    # Per input, MoE = S-Dense pathway + routers, under half of Dense (the paper's claim, counted as executed).
    assert g_sdense < g_moe < 1.01 * g_sdense
    assert g_moe < 0.5 * g_dense


@pytest.mark.parametrize("size", [64, 224])
def test_imagenet_size_inputs(size):
    for arch in ("resnet18", "vgg16"):
        model = A.MoECNN(arch, 200, size, 0.5, 2, width=0.5)
        logits, gates = model(torch.rand(2, 3, size, size), return_routing=True)
        assert logits.shape == (2, 200) and len(gates) > 0
        # ImageNet-size inputs get the 7x7/2 stem and a max-pool (a quarter of the pixels); 64 px the 3x3/1 one
        stem = model.backbone.stem
        assert stem.pool == (size >= 128) and stem.conv.weight.shape[-1] == (7 if size >= 128 else 3)
        assert stem.conv.stride == (2 if size >= 128 else 1)


def test_return_routing_lists_every_moe_layer():
    model = moe("resnet18", width=0.5)
    logits, gates = model(torch.rand(5, 3, 32, 32), return_routing=True)
    assert len(gates) == 16  # two routed convs in each of 8 blocks
    for g in gates:
        assert g.logits.shape == (5, 2) and g.choice.shape == (5,)
        assert torch.equal(g.scale.detach(), torch.ones(5))  # straight-through: value exactly 1
    x1, x2 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    first = model(x2)
    model(x1)
    assert torch.equal(first, model(x2))  # no routing kept from one forward to the next
    # the global router: one decision, the same Gate for every MoE layer
    shared = moe("resnet18", width=0.5, router="global")
    _, gates = shared(torch.rand(5, 3, 32, 32), return_routing=True)
    assert len(gates) == 16 and all(g is gates[0] for g in gates)
    assert n_params(shared, routers_only=True) == n_params(shared.global_router)


@pytest.mark.parametrize("arch,router,shared_bn", [
    *[(arch, router, False) for arch in ("resnet18", "wrn28_10", "vgg16", "densenet")
      for router in ("layer", "global")],
    *[(arch, "layer", True) for arch in ("resnet18", "densenet")]])
def test_sparse_path_equals_masked_reference(arch, router, shared_bn):
    """Outputs, gradients (routers included) and BatchNorm running statistics, float64, train and eval; with
    a BatchNorm per expert and with one shared by the experts (--shared-bn)."""
    torch.manual_seed(0)
    sparse = moe(arch, router=router, width=0.25, shared_bn=shared_bn).double()
    masked = copy.deepcopy(sparse)
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        results = []
        for model, dispatch in ((sparse, "sparse"), (masked, "masked")):
            model.train(training).zero_grad()
            logits, gates = model(x, return_routing=True, dispatch=dispatch)
            logits.square().sum().backward()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
            results.append((logits.detach(), grads, torch.stack([g.choice for g in gates]), list(model.buffers())))
        (ys, gs, cs, bs), (ym, gm, cm, bm) = results
        assert torch.equal(cs, cm)
        if training:  # meaningful only if inputs really go to different experts
            assert any(len(c.unique()) > 1 for c in cs)
        torch.testing.assert_close(ys, ym, rtol=1e-10, atol=1e-10)
        assert any(g.abs().sum() > 0 for g in gs[:1]) and len(gs) == len(gm)
        for a, b in zip(gs, gm):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        for a, b in zip(bs, bm):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # the routers got a gradient (the straight-through estimator), the same on both paths
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in A.router_params(sparse))


def test_masked_batchnorm_statistics_stay_float32_under_bf16_autocast():
    """The masked (CUDA) path's per-expert statistics are matmuls, which autocast would run in bf16: at a mean
    of 50 std that rounding moves the normalized output by a fifth of a std."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 8, 3, 1, 2, True, True).train()
    y = 50 + torch.randn(16, 8, 6, 6)
    choice = torch.arange(16) % 2
    exact = A.expert_affine(layer, y, choice)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = A.expert_affine(layer, y, choice)
    for a, b in zip(exact, autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch,router", [(arch, "layer") for arch in ("resnet18", "wrn28_10", "vgg16", "densenet")]
                         + [("resnet18", "global")])  # (the global router reads the image, whatever the backbone)
def test_a_fresh_router_routes_by_the_input(arch, router):
    (_, _), (x, _) = A.synthetic_data(8, 256)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = A.MoECNN(arch, 10, 32, 0.5, 2, router=router, width=0.25).train()
        with torch.no_grad():
            _, gates = model(x.float() / 255, return_routing=True)
        share = expert_usage(gates).max(1).values                      # (L,) top expert's share per layer
        assert share.max() < 0.9, (seed, share.tolist())                  # no layer sends 90% to one expert


@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_an_expert_without_inputs_keeps_its_batchnorm_statistics(dispatch):
    """Every input routed to expert e: e's running statistics move to its batch's, the other's stay put."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 6, 3, 1, 2, bn=True, router=True).train()
    with torch.no_grad():  # each expert its own affine, so that the wrong one's would show
        layer.bn.weight.uniform_(0.5, 2.0)
        layer.bn.bias.normal_()
    x = torch.rand(8, 4, 8, 8)
    for e in (0, 1):
        m = copy.deepcopy(layer)
        logits = torch.zeros(8, 2)
        logits[:, e] = 1.0
        routing = A.Routing(dispatch, shared=A.top1_gate(logits))
        mean, var = m.bn.running_mean.clone(), m.bn.running_var.clone()
        y = m(x, routing)
        assert y.shape == (8, 6, 8, 8) and len(routing.gates) == 1
        own, other = expert(m, e), expert(m, 1 - e)
        assert torch.equal(m.bn.running_mean[other], mean[other]) and torch.equal(m.bn.running_var[other], var[other])
        out = F.conv2d(x, m.weight[own], padding=1)  # expert e's conv output, before its BatchNorm
        torch.testing.assert_close(m.bn.running_mean[own], 0.9 * mean[own] + 0.1 * out.mean((0, 2, 3)))
        torch.testing.assert_close(m.bn.running_var[own], 0.9 * var[own] + 0.1 * out.var((0, 2, 3)))
        # training mode normalizes with the batch's statistics and the expert's own affine parameters
        ref = F.batch_norm(out, None, None, m.bn.weight[own], m.bn.bias[own], True, 0.0, m.bn.eps)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_router():
    """With --balance 0 only the straight-through estimator can carry a gradient to the routers."""
    for router in ("layer", "global"):
        torch.manual_seed(0)
        model = moe("resnet18", ratio=0.25, router=router, width=0.5)
        s = tiny(router=router, balance=0.0)
        x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
        loss, reg, _ = A.robust_loss(model, x, y, s.objective)
        assert reg == 0
        loss.backward()
        for name, p in model.named_parameters():
            if "router" in name:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------- attacks, losses
def calibrated(model, n=64):
    """Set BatchNorm running statistics to one batch's statistics so that eval mode is meaningful at init."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.rand(n, 3, 32, 32))
    return model


def test_pgd_stays_in_ball_and_box_and_raises_the_loss():
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25, width=0.5))
    x, y, eps = torch.rand(16, 3, 32, 32), torch.randint(10, (16,)), 8 / 255
    x[:4] = 0.0  # inputs at the box's edges
    x[4:8] = 1.0
    objective = A.ce_objective(model, y)
    x_adv = A.pgd(model, x, objective, eps, 2 / 255, 10)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training  # the attack restored the mode it found
    noisy = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    with torch.no_grad(), A.evaluating(model):
        clean, random, attacked = objective(x), objective(noisy), objective(x_adv)
    assert attacked > 1.2 * clean and attacked > 1.2 * random
    s = tiny()
    x_tr = A.training_attack(model, x, y, s.objective)
    assert (x_tr - x).abs().max() <= s.eps + 1e-6 and x_tr.min() >= 0 and x_tr.max() <= 1
    assert (x_tr - x).abs().max() > s.eps / 2  # and it did move


def test_kl_is_finite_where_softmax_underflows():
    p = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    q = torch.tensor([[-1e4, 1e4, 0.0]], requires_grad=True)
    kl = A.kl_from_logits(p, q)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(p.grad).all() and torch.isfinite(q.grad).all()
    a = torch.randn(4, 10)
    torch.testing.assert_close(A.kl_from_logits(a, a), torch.tensor(0.0))


def test_trades_loss_matches_its_formula():
    logits, logits_adv, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
    p, q = logits.softmax(1), logits_adv.softmax(1)
    expected = F.cross_entropy(logits, y) + 6.0 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(A.trades_loss(logits, logits_adv, y, 6.0), expected)


def test_balance_term_is_one_when_balanced_and_larger_when_collapsed():
    s = tiny(balance=1.0)
    y = torch.zeros(4, dtype=torch.long)
    uniform = A.top1_gate(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    collapsed = A.top1_gate(torch.tensor([[5.0, 0.0]] * 4))
    reg = lambda gates: A.routing_regularizer(gates, [], y, s.objective)  # noqa: E731
    assert reg([uniform]) < reg([collapsed])
    assert abs(reg([collapsed]).item() - 2 * 0.9933) < 1e-3  # N * 1 * P_0
    torch.testing.assert_close(reg([uniform]), torch.tensor(1.0))  # N * (1/2 * 1/2 + 1/2 * 1/2) = 1


def test_router_supervision_is_the_cross_entropy_to_class_mod_n():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 5])
    gate = A.top1_gate(logits)
    reg = A.routing_regularizer([gate], [gate], y, tiny(router_supervision=2.0, balance=0).objective)  # mean
    torch.testing.assert_close(reg, 2.0 * F.cross_entropy(logits, y % 3))                            # over gates
    assert A.routing_regularizer([gate], [], y, tiny(shared_core=False).objective) == 0   # the paper's: none


# ------------------------------------------------------------------------------------ training
def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def model_and_optimizers(**overrides):
    """Seed 0, tiny(**overrides) settings, their model and its optimizers (on the CPU)."""
    torch.manual_seed(0)
    s = tiny(**overrides)
    model = A.build_model(s, 10, 32)
    return s, model, A.make_optimizers(model, s, torch.device("cpu"))


def test_each_advmoe_level_changes_only_its_own_parameters():
    s, model, opts = model_and_optimizers()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
    for name, is_router in (("phi", True), ("psi", False)):
        before = snapshot(model)
        A.level(model, opts[name], x, y, s.objective, regularize=is_router)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        own = {n for n, _ in model.named_parameters() if ("router" in n) == is_router}
        assert moved and moved <= own, moved - own   # something moved, and only this level's parameters
        assert len(moved) > 0.9 * len(own)           # and nearly all of them (a few may get no gradient)


def test_advmoe_step_uses_two_batches_and_reports_both_levels():
    s, model, opts = model_and_optimizers()
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(10, (8,))) for _ in range(2)]
    assert A.STEPS["advmoe"] == (A.advmoe_step, 2) and all(A.STEPS[m][1] == 1 for m in A.METHODS if m != "advmoe")
    stats = A.advmoe_step(model, opts, batches, s.objective)
    assert {"loss", "router_loss", "acc", "acc_adv"} <= set(stats)
    assert set(opts) == {"phi", "psi"}
    phi, psi = ({id(p) for g in opts[k].param_groups for p in g["params"]} for k in ("phi", "psi"))
    assert phi and psi and not phi & psi and phi | psi == set(map(id, model.parameters()))
    # the joint methods: one optimizer over everything
    s, model, opts = model_and_optimizers(method="moe")
    assert set(opts) == {"all"} and sum(len(g["params"]) for g in opts["all"].param_groups) == len(
        list(model.parameters()))


def test_resume_continues_exactly(tmp_path, monkeypatch):
    settings = dict(method="advmoe", epochs=2, train_n=32, test_steps=2, quick_eval_n=16)
    full = A.train(tiny(out=str(tmp_path / "full"), **settings), log=lambda _: None)
    # A run killed right after its first checkpoint was written ...
    save = A.save_checkpoint

    def save_then_die(path, *args):
        save(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        A.train(tiny(out=str(tmp_path / "part"), **settings), log=lambda _: None)
    monkeypatch.setattr(A, "save_checkpoint", save)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # ... and resumed ends where the uninterrupted run ended.
    part = A.train(tiny(out=str(tmp_path / "part"), resume=True, **settings), log=lambda _: None)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full["sa"], full["ra"], full["routing"]) == (part["sa"], part["ra"], part["routing"])
    assert [r["loss"] for r in full["history"]] == [r["loss"] for r in part["history"]]
    assert part["routing_epoch0"] == full["routing_epoch0"]


def test_checkpoint_from_another_model_is_refused(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path / "r")
    kept = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(A.ConfigError, match="method"):
        A.train(A.parse_settings(B + ["--method", "moe", "--resume", "--out", str(out)]), log=lambda _: None)
    assert (out / "checkpoint.pt").read_bytes() == kept and not list(out.glob("result_epoch*"))


# ---------------------------------------------------------------------------------- data
def test_augment_crops_and_flips():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    centre = A.augment(x, torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool), 4)
    torch.testing.assert_close(centre, x.float() / 255)
    flipped = A.augment(x, torch.full((3, 2), 4), torch.ones(3, dtype=torch.bool), 4)
    torch.testing.assert_close(flipped, x.flip(-1).float() / 255)
    shifted = A.augment(x, torch.tensor([[0, 4]] * 3), torch.zeros(3, dtype=torch.bool), 4)
    assert (shifted[:, :, :4] == 0).all()  # 4 rows of zero padding on top
    torch.testing.assert_close(shifted[:, :, 4:], x[:, :, :28].float() / 255)


def test_the_synthetic_set_is_fixed_and_sized():
    (x, y), (xt, yt) = A.synthetic_data(40, 8)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.uint8 and xt.shape == (8, 3, 32, 32)
    assert y.shape == (40,) and 0 <= int(y.min()) and int(y.max()) < 10 and len(y.unique()) > 5
    (x2, y2), _ = A.synthetic_data.__wrapped__(40, 8)  # drawn again, not the cached tensors
    assert torch.equal(x, x2) and torch.equal(y, y2)  # seeded: the same set every time
    data = A.load_data(tiny(train_n=0), torch.device("cpu"))
    assert len(data.splits["train"][1]) == A.SYNTHETIC[0] and data.eval_len() == A.SYNTHETIC[1]


# ------------------------------------------------------------------ AT(Sparse) and the analyses
def random_bn(model):
    """BatchNorm statistics and affine parameters that differ per channel, so a wrong channel shows."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10", "vgg16", "densenet"])
def test_pruned_network_equals_the_masked_dense_one_and_costs_what_sdense_costs(arch):
    """Removing the pruned channels (extract_sparse) computes what masking them computes, in S-Dense's shape,
    at r = 0.5 and at an r where rounding differs between layers (DenseNet's concatenations)."""
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    width = 1.0 if arch == "densenet" else 0.5
    for r in (0.5, 0.3) if arch != "wrn28_10" else (0.3,):
        dense = random_bn(A.MoECNN(arch, 10, 32, width=width)).double().eval()
        scores = A.ChannelScores(dense, r).double()
        with torch.no_grad():
            for v in scores.scores.values():
                v.uniform_()  # an arbitrary mask, not the weight-norm one
        pruned = A.MoECNN(arch, 10, 32, r, 1, width=width).double().eval()
        pruned.load_state_dict(A.extract_sparse(dense, scores.keep()))  # strict: every tensor has S-Dense's shape
        torch.testing.assert_close(pruned(x), scores(x), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(scores(x), dense(x))  # the mask does change the Dense network
        sdense = A.MoECNN(arch, 10, 32, r, 1, width=width).double()
        assert A.gflops_per_input(pruned, x) == A.gflops_per_input(sdense, x) < 0.5 * A.gflops_per_input(dense, x)


def test_top_k_mask_keeps_k_channels_and_passes_the_gradient_straight_through():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1], requires_grad=True)
    mask = A.top_k_mask(scores, 2)
    assert mask.tolist() == [0, 0, 1, 1, 0]
    (mask * torch.arange(5.0)).sum().backward()
    assert scores.grad.tolist() == [0, 1, 2, 3, 4]  # d mask / d scores = identity


def test_pruning_learns_the_scores_only(tmp_path, monkeypatch):
    """prune: the Dense weights it starts from stay as they are while it learns the channel scores (which
    move), and it keeps round(r * C) channels of each group."""
    torch.manual_seed(0)
    A.main(B + ["--method", "dense", "--arch", "densenet", "--out", str(tmp_path / "dense")])
    s = tiny(method="sparse", ratio=0.5, arch="densenet", init=str(tmp_path / "dense" / "checkpoint.pt"))
    dense = torch.load(s.init, weights_only=True)["model"]
    seen, level = [], A.level

    def spy(model, opt, *a, **k):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = level(model, opt, *a, **k)
        seen.append({n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())})
        return stats

    monkeypatch.setattr(A, "level", spy)
    state, extra = A.prune(s, A.load_data(s, "cpu"), torch.device("cpu"), lambda _: None)
    assert seen and all(moved and all("scores" in n for n in moved) for moved in seen)
    A.MoECNN("densenet", 10, 32, 0.5, 1, width=0.25).load_state_dict(state)  # S-Dense's shapes
    groups = A.channel_groups(A.MoECNN("densenet", 10, 32, width=0.25))
    assert extra["sparse"]["kept"] == {g: round(0.5 * c) for g, c in groups.items()}
    # the fine-tuning starts from the Dense weights of the channels kept: a kept slice of a Dense conv
    assert all(k in dense for k in state if "mean" not in k and "std" not in k)


def test_the_paper_analyses_end_to_end(tmp_path, monkeypatch):
    """AT(Dense) -> AT(Sparse) from it -> AT(MoE) with AutoAttack on --aa-n images; the Sec. 4 stages (natural,
    routers only, backbone only); then the report."""
    runs = tmp_path / "runs"
    calls = []

    def identity_attack(model, x, y, eps, seed, log=None):  # stands in for torchattacks (not a requirement)
        calls.append(len(x))
        return [("autoattack", x)]

    monkeypatch.setattr(A, "import_torchattacks", lambda: None)
    monkeypatch.setattr(A, "autoattack", identity_attack)
    base = dict(arch="resnet18", ratio=0.5, n_experts=2, train_n=16, eval_n=4, batch_size=16, test_steps=1,
                width=0.25)

    def run(name, **kw):
        return A.train(tiny(out=str(runs / name), **{**base, **kw}), log=lambda _: None)

    dense = run("dense", method="dense")
    sparse = run("sparse", method="sparse", init=str(runs / "dense" / "checkpoint.pt"))
    sdense = A.MoECNN("resnet18", 10, 32, 0.5, 1, width=0.25)
    assert sparse["gflops"] == round(A.gflops_per_input(sdense, torch.rand(2, 3, 32, 32)), 4) < dense["gflops"] / 2
    assert sparse["params"]["total"] == n_params(sdense) and sparse["params"]["routers"] == 0
    assert sparse["sparse"]["init"].endswith("checkpoint.pt") and len(sparse["sparse"]["prune_history"]) == 1
    assert sparse["sparse"]["kept"] == {g: round(0.5 * c) for g, c in A.channel_groups(
        A.MoECNN("resnet18", 10, 32, width=0.25)).items()}
    moe_run = run("moe", method="moe", eval_attacks="pgd,autoattack", aa_n=3)
    assert calls == [3] and moe_run["attack_n"] == {"pgd1": 4, "autoattack": 3} and moe_run["ra_worst_n"] == 3
    assert moe_run["ra_aa"] is not None
    # Sec. 4 study: each stage changes only the parameters it trains.
    run("s1", method="moe", loss="natural")
    run("s2", method="moe", train_params="routers", init=str(runs / "s1" / "checkpoint.pt"))
    run("s3", method="moe", train_params="backbone", init=str(runs / "s2" / "checkpoint.pt"))
    w = [torch.load(runs / f"s{i}" / "checkpoint.pt", weights_only=True)["model"] for i in (1, 2, 3)]
    params = dict(A.build_model(tiny(method="moe", **base), 10, 32).named_parameters())
    routers = {n for n in params if "router" in n}
    for (a, b), trained in (((0, 1), routers), ((1, 2), set(params) - routers)):
        moved = {n for n in params if not torch.equal(w[a][n], w[b][n])}
        assert moved and moved <= trained
    text = A.report(str(runs))
    assert (runs / "report.md").read_text() == text
    for heading in ("## Table 1: synthetic, resnet18", "## Table 2: AutoAttack", "## Sec. 4 study", "## Routing",
                    "## Every recipe over its seeds", "## Runs", "method sparse", "method dense",
                    "| s1 | natural |", "| s2 | routers |", "| s3 | backbone |"):
        assert heading in text, heading
    assert "## Fig. 7" not in text and "## Fig. 8" not in text  # one N, one r
    # The sweeps' tables appear once runs at several N and r exist (copies of one run, relabelled).
    for n, r in ((2, 0.25), (4, 0.25)):
        res = {**moe_run, "method": "advmoe", "n_experts": n, "ratio": r,
               "settings": {**moe_run["settings"], "method": "advmoe", "n_experts": n, "ratio": r}}
        (runs / f"sweep_{n}_{r}").mkdir()
        (runs / f"sweep_{n}_{r}" / "result.json").write_text(json.dumps(res))
    text = A.report(str(runs))
    assert "## Fig. 7" in text and "## Fig. 8" in text


def test_report_averages_the_seeds_of_a_recipe(good_checkpoint, tmp_path):
    """Runs that differ by seed only make one row of the recipes table, beside runs without routers."""
    assert A.main(B + ["--method", "sdense", "--out", str(tmp_path / "sdense")]) == 0
    copy_of(good_checkpoint.parent, tmp_path / "moe")

    def rows(method, seeds):  # the recipes table's rows of `method` over `seeds`
        recipes = A.report(str(tmp_path)).split("## Every recipe over its seeds")[1].splitlines()
        return [r for r in recipes if r.startswith("| ") and f"method {method}" in r.split(" | ")[0]
                and r.split(" | ")[1] == seeds]
    assert len(rows("moe", "1")) == len(rows("sdense", "1")) == 1  # a recipe a row, one seed each
    moe_run = json.loads((tmp_path / "moe" / "result.json").read_text())
    again = {**moe_run, "seed": 2, "sa": moe_run["sa"] + 10, "settings": {**moe_run["settings"], "seed": 2}}
    (tmp_path / "moe_seed2").mkdir()
    (tmp_path / "moe_seed2" / "result.json").write_text(json.dumps(again))
    (row,) = rows("moe", "1, 2")
    assert f"| {moe_run['sa'] + 5:.2f} ± 5.00 (2) |" in row  # the mean over both seeds, ± half the range
    # a run of a switch since removed (here --layout pathway) is another recipe, not a third seed of this one;
    # at the removed switch's default it is the same recipe
    for name, layout in (("moe_pathway", "pathway"), ("moe_position", "position")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(
            {**again, "settings": {**again["settings"], "layout": layout}}))
    assert len(rows("moe", "1, 2, 2")) == 1 and len(rows("moe", "2")) == 1


def test_train_all_dry_run_lists_the_whole_grid():
    done = subprocess.run(["bash", str(HERE / "train_all.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "GPUS": ""}, cwd=HERE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "# 123 runs"  # Table 1 80, Table 2 20, Sec. 4 study 3, Fig. 7 14, Fig. 8 6
    for needle in ("--method sparse --init runs/table1/cifar10_resnet18_dense/checkpoint.pt", "autoattack",
                   "--loss natural", "--train-params routers", "--n-experts 10 --ratio 0.8", "--dataset imagenet"):
        assert any(needle in line for line in lines), needle
    order = [line.split("--out ")[1].split()[0] for line in lines[:-1]]
    assert order.index("runs/table1/cifar10_wrn28_10_dense") < order.index("runs/table1/cifar10_wrn28_10_sparse")
    for i, line in enumerate(lines[:-1]):  # a checkpoint a run starts from is written by an earlier run
        for flag in ("--init", "--eval-only"):
            if flag in line:
                assert line.split(flag + " ")[1].split()[0].removesuffix("/checkpoint.pt") in order[:i], line
    # every command is one advmoe.py accepts
    parser = A.settings_parser()
    for line in lines[:-1]:
        A.Settings(**vars(parser.parse_args(line.split()[2:])))


# ----------------------------------------------------------------------------- CLI end to end
def cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "advmoe.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_cli_trains_evaluates_reports(tmp_path, capsys):
    run = tmp_path / "runs" / "a"
    args = ["--dataset", "synthetic", "--arch", "resnet18", "--method", "advmoe", "--epochs", "2", "--ratio", "0.25",
            "--train-n", "16", "--eval-n", "8", "--batch-size", "16", "--test-steps", "2", "--width", "0.25",
            "--quick-eval-n", "8", "--device", "cpu", "--out", str(run)]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/2" in done.stdout and "SA" in done.stdout
    result = json.loads((run / "result.json").read_text())
    for key in ("dataset", "arch", "method", "ratio", "n_experts", "router", "epochs", "seed", "sa", "ra", "gflops",
                "params", "routing", "train_seconds", "device", "torch"):
        assert key in result, key
    assert result["epochs"] == 2 and 0 <= result["ra"] <= 100 and result["gflops"] > 0
    assert A.Settings(**result["settings"]) == A.parse_settings(args)  # the settings reproduce the run
    assert not list(run.glob(".*"))  # no temporary files left behind
    evaluated = A.main(["--eval-only", str(run / "checkpoint.pt"), "--out", str(tmp_path / "runs" / "b"),
                        "--test-steps", "2", "--device", "cpu"])
    assert evaluated == 0
    again = json.loads((tmp_path / "runs" / "b" / "result.json").read_text())
    assert (again["sa"], again["ra"], again["routing"]) == (result["sa"], result["ra"], result["routing"])  # seeded
    assert again["settings"]["eval_only"] == str(run / "checkpoint.pt") and again["epochs"] == 2
    capsys.readouterr()
    assert A.main(["report", str(tmp_path / "runs")]) == 0
    assert "| a | advmoe |" in capsys.readouterr().out and (tmp_path / "runs" / "report.md").exists()


def one_line_error(err: str, *names: str) -> str:
    """The error contract: one line on stderr, starting 'advmoe: error:', naming the offending flags / files."""
    assert err.startswith("advmoe: error:") and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.mark.parametrize("args,named", [
    (["--arch", "resnet50"], "--arch"),
    (["--dataset", "mnist"], "--dataset"),
    (["--method", "magic"], "--method"),
    (["--ratio", "0"], "--ratio"),
    (["--ratio", "1.5"], "--ratio"),
    (["--n-experts", "0"], "--n-experts"),
    (["--method", "advmoe", "--n-experts", "1"], "--n-experts"),
    (["--eps", "-0.5"], "--eps"),
    (["--eval-attacks", "pgd,magic"], "--eval-attacks"),
    (["--dataset", "cifar10", "--data-dir", "DATA"], "DATA"),  # offline: no network in the test
    (["--dataset", "tinyimagenet", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--dataset", "synthetic", "--out", "/proc/advmoe_cannot_write"], "/proc/advmoe_cannot_write"),
    (["--eval-only", "/nonexistent/checkpoint.pt"], "/nonexistent/checkpoint.pt"),
    (["--dataset", "synthetic", "--batch-size", "100000"], "--batch-size"),
    (["--method", "sparse", "--ratio", "1"], "--ratio"),
    (["--method", "moe", "--train-params", "routers"], "--train-params"),
    (["--method", "sdense", "--train-params", "routers", "--init", "x.pt"], "--train-params"),
    (["--train-params", "experts"], "--train-params"),
    (["--dataset", "synthetic", "--method", "moe", "--init", "/nonexistent/checkpoint.pt"],
     "/nonexistent/checkpoint.pt"),
])
def test_bad_input_gives_one_line_error(args, named, tmp_path, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)  # a CIFAR download fails fast, never downloads
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default --out (runs/<name>) would land here
    args, named = [a.replace("DATA", str(tmp_path / "data")) for a in args], named.replace("DATA", str(tmp_path / "data"))
    assert A.main(["--device", "cpu", "--width", "0.25", "--train-n", "64", "--batch-size", "32"] + args) == 2
    one_line_error(capsys.readouterr().err, named)
    # nothing written: no run folder (the default --out is runs/<name>)
    assert not [p for p in work.rglob("*") if p.is_file() or p.parent != work]


def test_bad_input_exit_status_from_the_shell(tmp_path):
    done = cli("--ratio", "2", cwd=tmp_path)
    assert done.returncode == 2
    one_line_error(done.stderr, "--ratio")
    assert not list(tmp_path.iterdir())  # nothing written


def test_report_of_missing_folder_fails_cleanly(tmp_path, capsys):
    assert A.main(["report", str(tmp_path / "nothing")]) == 2
    one_line_error(capsys.readouterr().err, str(tmp_path / "nothing"))
    for argv in (["report"], ["report", "a", "b"]):  # a usage error
        assert A.main(argv) == 2
        one_line_error(capsys.readouterr().err, "report DIR")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- bench
def test_bench_runs_and_is_sane(tmp_path):
    out = tmp_path / "bench.json"
    result = A.bench(["--arch", "resnet18", "--device", "cpu", "--batch-size", "4", "--width", "0.125", "--out",
                      str(out)], log=lambda _: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "sdense", "moe", "advmoe"} and result["batch"] == 4
    # GFLOPs as executed: the MoE pathway costs S-Dense's plus the routers, under half of Dense's
    assert rows["sdense"]["gflops"] <= rows["moe"]["gflops"] < 1.01 * rows["sdense"]["gflops"]  # (4 decimals)
    assert rows["moe"]["gflops"] < 0.5 * rows["dense"]["gflops"] and rows["moe"]["gflops"] == rows["advmoe"]["gflops"]
    assert json.loads(out.read_text()) == result


# ------------------------------------------------------------------- adaptive evaluation
def test_soft_surrogate_keeps_the_hard_forward_and_changes_the_gradient():
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25, width=0.5)).eval()
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    hard = model(x)
    soft = model(x, dispatch="soft")
    torch.testing.assert_close(hard, soft)
    g_hard, = torch.autograd.grad(hard.sum(), x)
    g_soft, = torch.autograd.grad(model(x, dispatch="soft").sum(), x)
    assert not torch.allclose(g_hard, g_soft)


@pytest.mark.parametrize("router", ["layer", "global"])
def test_adaptive_attacks_and_ra_worst(router, monkeypatch):
    monkeypatch.setattr(A, "EVAL_BATCH", 12)
    torch.manual_seed(0)
    s = tiny(router=router, test_steps=3)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    result = A.evaluate(model, data, s, limit=24, attacks=("pgd", "soft"))
    assert set(result["attacks"]) == {"pgd3", "soft"} and result["n"] == 24
    assert 0 < result["sa"] and result["ra"] < result["sa"]  # the attack fools some images
    assert 0 <= result["ra_worst"] <= min(result["attacks"].values()) <= result["sa"]
    split = result["routing"]["split_4way"]
    n_ok = result["routing"]["split_n"]  # the split counts the inputs classified correctly when clean
    assert abs(sum(split.values()) - (100 if n_ok else 0)) < 0.05
    assert n_ok == round(result["sa"] * result["n"] / 100)
    # MoE robustness (1)+(2) of them: correct clean and under PGD, at most RA's count
    assert (split["neither"] + split["router_only"]) * n_ok / 100 <= result["ra"] * result["n"] / 100 + 0.05
    assert sum(result["routing"]["usage_clean"][0]) == pytest.approx(1.0, abs=1e-3)
    assert result["routing"]["pathways"]["clean"]["inputs"] == 24


def test_square_and_autoattack_need_torchattacks(monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torchattacks", None)  # as if it were not installed: refused before any training
        for attacks in (dict(eval_attacks="pgd,square"), dict(eval_attacks="autoattack")):
            with pytest.raises(A.ConfigError, match="torchattacks"):
                tiny(**attacks)


def test_square_runs_with_torchattacks():
    """(Skipped, and shown as skipped, without the optional torchattacks: pip install --no-deps torchattacks
    scipy.)"""
    pytest.importorskip("torchattacks")
    s = tiny(eval_attacks="pgd,square", test_steps=2, square_queries=20)
    model = calibrated(A.build_model(s, 10, 32))
    result = A.evaluate(model, A.load_data(s, torch.device("cpu")), s, limit=8, attacks=("pgd", "square"))
    assert "square" in result["attacks"] and result["ra_worst"] <= result["attacks"]["square"] <= result["sa"]


# ------------------------------------------------------------------------------- reliability
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Epoch 1 finishes finite; a NaN in epoch 2's first step stops the run there: no result, epoch 1's
    checkpoint kept."""
    s = tiny(method="sdense", epochs=3, out=str(tmp_path))
    step, calls = A.joint_step, []

    def poisoned(*a, **k):
        stats = step(*a, **k)
        calls.append(1)
        return {**stats, "loss": stats["loss"] * (float("nan") if len(calls) == 3 else 1.0)}

    monkeypatch.setitem(A.STEPS, "sdense", (poisoned, 1))
    with pytest.raises(FloatingPointError, match="epoch 2, iteration 1"):
        A.train(s, log=lambda _: None)
    assert not (tmp_path / "result.json").exists()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(math.isfinite(r["loss"]) for r in ckpt["history"])


def test_ctrl_c_keeps_the_last_finished_epoch_and_resume_continues(tmp_path):
    args = [sys.executable, str(HERE / "advmoe.py"), "--dataset", "synthetic", "--ratio", "0.25", "--epochs", "100",
            "--train-n", "32", "--eval-n", "8", "--batch-size", "16", "--quick-eval-n", "0", "--width", "0.25",
            "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.startswith("advmoe:") and len(err.strip().splitlines()) == 1 and "--resume" in err, err
    epoch = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and not (tmp_path / "result.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(epoch + 1))  # epoch 0's routing, then each saved epoch
    resumed = A.main(args[2:-4] + ["--epochs", str(epoch + 1), "--device", "cpu", "--test-steps", "1", "--resume",
                                   "--out", str(tmp_path)])
    assert resumed == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == epoch + 1 and [r["epoch"] for r in result["history"]] == list(range(1, epoch + 2))


def test_two_process_training_with_gloo(tmp_path):
    port = 29500 + os.getpid() % 1000
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(HERE / "advmoe.py"), "--dataset", "synthetic", "--method", "advmoe", "--ratio", "0.25",
                           "--train-n", "32", "--eval-n", "8", "--batch-size", "8", "--epochs", "1", "--width", "0.25",
                           "--test-steps", "1", "--quick-eval-n", "0", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["data"]["train_images"] == 32
    assert done.stdout.count("RA-worst") == 1  # rank 0 alone reports
    rows = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1]  # one writer


def test_every_process_draws_as_many_batches_as_the_others():
    """Under torchrun a process with one batch more would wait forever in its extra all-reduce."""
    train, test = A.synthetic_data(958, 4)
    counts, seen = [], []
    for rank in range(3):
        data = A.TensorData(train, test, (train[0][:0], train[1][:0]), 10, torch.device("cpu"), shard=(rank, 3))
        batches = list(data.train_batches(32, torch.Generator().manual_seed(0)))
        counts.append(len(batches))
        seen.append(torch.cat([y for _, y in batches]))
    assert counts == [data.train_len(32)] * 3 == [958 // 3 // 32] * 3
    # every process takes its own images of the one shuffle: the parts are disjoint
    perm = torch.randperm(958, generator=torch.Generator().manual_seed(0))
    parts = [A.own_part(perm, (rank, 3)) for rank in range(3)]
    assert sum(map(len, parts)) == 957 and len(set(torch.cat(parts).tolist())) == 957


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = (HERE / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    env = {}
    exec(compile(code, "README.md", "exec"), env)
    s, x, x_adv, result = env["s"], env["x"], env["x_adv"], env["result"]
    assert env["logits"].shape == (8, 10) and len(env["gates"]) == 16       # what its comments say
    assert (x_adv - x).abs().max() <= s.eps + 1e-6 and not torch.equal(x_adv, x)
    assert {"loss", "router_loss"} <= set(env["stats"]) and set(env["opts"]) == {"phi", "psi"}
    assert result == json.loads((tmp_path / "runs" / "notebook" / "result.json").read_text())
    assert result["method"] == "advmoe" and result["eval_n"] == 16 and 0 <= result["ra"] <= result["sa"] <= 100


# ------------------------------------------------------ numbers a reviewer would accept
class FakeAttack:
    """Stands in for a torchattacks attack: records how it was built and what it was given; fools the first
    input it is given (its logits, see Linear01, point to another class) and returns the others as they were."""
    built: list = []

    def __init__(self, model, **kw):
        self.kw, self.sizes, self.n = kw, [], model.backbone.fc.out_features
        FakeAttack.built.append(self)

    def __call__(self, x, y):
        self.sizes.append(len(x))
        x = x.clone()
        x[0].view(-1)[:self.n] = 0
        x[0].view(-1)[(y[0] + 1) % self.n] = 1
        return x


class Linear01(torch.nn.Module):
    """A model whose logits are the input's first n_classes values (so an attack's effect is known)."""

    def __init__(self, n_classes):
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.fc = torch.nn.Linear(1, n_classes)

    def forward(self, x, return_routing=False, **_):
        logits = x.flatten(1)[:, :self.backbone.fc.out_features]
        return (logits, []) if return_routing else logits  # no routers: no gates


@pytest.mark.parametrize("n_classes", [10, 100])
def test_autoattack_is_built_with_the_reference_settings(n_classes, monkeypatch):
    fake = type("ta", (), {k: type(k, (FakeAttack,), {}) for k in ("APGD", "APGDT", "FAB", "Square")})
    monkeypatch.setattr(A, "import_torchattacks", lambda: fake)
    FakeAttack.built = []
    model = Linear01(n_classes)
    x = torch.rand(12, 3, 32, 32)
    y = model(x).argmax(1)
    y[8:] = (y[8:] + 1) % n_classes  # 8 inputs correct when clean, 4 wrong
    found = A.autoattack(model, x, y, 8 / 255, seed=3)
    assert [label for label, _ in found] == ["autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/fab-t",
                                             "autoattack/square", "autoattack"]
    apgd, apgdt, fab, square = FakeAttack.built
    assert [type(a).__name__ for a in FakeAttack.built] == ["APGD", "APGDT", "FAB", "Square"]
    assert all(a.kw["norm"] == "Linf" and a.kw["eps"] == 8 / 255 and a.kw["seed"] == 3 and a.kw["n_restarts"] == 1
               for a in FakeAttack.built)
    assert apgd.kw["steps"] == 100 and apgd.kw["loss"] == "ce"
    # torchattacks tries n_classes - 1 targets: 9, as the reference does, also with 100 classes
    assert apgdt.kw["steps"] == 100 and apgdt.kw["n_classes"] - 1 == 9
    assert fab.kw["steps"] == 100 and fab.kw["multi_targeted"] and fab.kw["n_classes"] - 1 == 9
    assert square.kw["n_queries"] == 5000
    # each component attacks only the inputs still classified correctly; one fooled stays fooled
    assert [a.sizes for a in FakeAttack.built] == [[8], [7], [6], [5]]
    robust = [int((model(x_adv).argmax(1) == y).sum()) for _, x_adv in found]
    assert robust == [7, 6, 5, 4, 4]
    assert torch.equal(found[-1][1][4:], x[4:])  # the inputs never fooled (and the wrong ones) are left clean


@pytest.mark.parametrize("n_classes", [10, 100])
def test_the_real_torchattacks_classes_take_the_reference_settings(n_classes):
    """(Skipped, and shown as skipped, without the optional torchattacks.)"""
    torchattacks = pytest.importorskip("torchattacks")
    net = A.MoECNN("resnet18", n_classes, 32, 0.25, 2, width=0.25).eval()
    real = {name: getattr(torchattacks, cls)(net, seed=0, **kw)
            for name, (cls, kw) in A.autoattack_settings(8 / 255, n_classes).items()}
    assert real["apgd-ce"].steps == real["apgd-t"].steps == real["fab-t"].steps == 100
    assert real["apgd-t"].n_target_classes == real["fab-t"].n_target_classes == 9
    assert real["square"].n_queries == 5000 and real["fab-t"].multi_targeted


def test_evaluation_runs_in_float32_whatever_autocast_is_active():
    torch.manual_seed(0)
    s = tiny(test_steps=2)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    dtypes = []
    model.register_forward_hook(lambda m, i, o: dtypes.append((o[0] if isinstance(o, tuple) else o).dtype))
    plain = A.evaluate(model, data, s, limit=8, attacks=("pgd", "soft"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training on CUDA runs
        under_bf16 = A.evaluate(model, data, s, limit=8, attacks=("pgd", "soft"))
    assert dtypes and set(dtypes) == {torch.float32}
    assert plain == under_bf16


def test_each_attack_has_its_own_random_stream(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "EVAL_BATCH", 8)
    torch.manual_seed(0)
    s = tiny(test_steps=2)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    alone = A.evaluate(model, data, s, limit=16, attacks=("pgd",))
    torch.manual_seed(123)  # the global stream plays no part
    more = A.evaluate(model, data, s, limit=16, attacks=("soft", "pgd"))
    assert alone["attacks"]["pgd2"] == more["attacks"]["pgd2"] and alone["routing"] == more["routing"]
    # a training run does not change with the per-epoch check
    weights = []
    for quick in (0, 8):
        A.train(tiny(epochs=2, train_n=16, batch_size=16, eval_n=4, test_steps=1, quick_eval_n=quick,
                     out=str(tmp_path / str(quick))), log=lambda _: None)
        weights.append(torch.load(tmp_path / str(quick) / "checkpoint.pt", weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_autoattack_and_pgd_are_reported_over_the_same_images(monkeypatch):
    def first_half_fooled(model, x, y, eps, seed, log=None):  # stands in for torchattacks
        x_adv = x.clone()
        x_adv[: len(x) // 2] = 1 - x[: len(x) // 2]
        return [("autoattack", x_adv)]

    monkeypatch.setattr(A, "import_torchattacks", lambda: None)
    monkeypatch.setattr(A, "autoattack", first_half_fooled)
    torch.manual_seed(0)
    monkeypatch.setattr(A, "EVAL_BATCH", 4)
    s = tiny(test_steps=2, aa_n=6)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    full = A.evaluate(model, data, s, limit=16, attacks=("pgd", "autoattack"))
    first = A.evaluate(model, data, s, limit=6, attacks=("pgd",))
    assert full["autoattack"]["images"] == 6 and full["attack_n"]["pgd2"] == 16
    assert full["autoattack"]["ra_pgd_same_images"] == first["ra"]
    pgd_alone = A.evaluate(model, data, s, limit=16, attacks=("pgd",))
    assert pgd_alone["ra_worst_n"] == 16 and pgd_alone["ra"] == full["ra"]
    # RA-worst counts only the 6 images AutoAttack saw; without AutoAttack it is PGD's, over all 16 images
    assert full["ra_worst_n"] == 6 and full["ra_worst_without_aa"] == pgd_alone["ra_worst"]


def test_eval_only_uses_the_checkpoints_settings_unless_given(tmp_path, capsys):
    A.train(tiny(out=str(tmp_path / "run"), train_n=32, eps=4 / 255, test_steps=2), log=lambda _: None)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    own = A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e1"), "--device", "cpu"])
    mine = A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e2"), "--device", "cpu", "--test-steps", "3"])
    assert own == mine == 0
    r1, r2 = (json.loads((tmp_path / e / "result.json").read_text()) for e in ("e1", "e2"))
    assert r1["eps"] == 4 / 255 and r1["attack"].startswith("PGD-2 ") and r1["settings"]["train_n"] == 32
    assert r2["eps"] == 4 / 255 and r2["attack"].startswith("PGD-3 ") and r1["eval_n"] == r2["eval_n"] == 16
    capsys.readouterr()
    assert A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e3"), "--device", "cpu", "--arch", "vgg16"]) == 2
    one_line_error(capsys.readouterr().err, "--arch")
    assert not (tmp_path / "e3").exists()


def test_a_checkpoint_with_settings_this_version_does_not_know_is_read(good_checkpoint, tmp_path):
    """Unknown settings keys (flags an older version had) are set aside, not refused."""
    ckpt = torch.load(good_checkpoint, weights_only=True)
    ckpt["settings"].update(log_every=1000, synthetic_train=32, channels_last=True)
    torch.save(ckpt, tmp_path / "old.pt")
    read = A.read_checkpoint(tmp_path / "old.pt")
    assert set(read["settings"]) == {f.name for f in A.dataclasses.fields(A.Settings)}
    assert A.main(["--eval-only", str(tmp_path / "old.pt"), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "e" / "result.json").read_text())["settings"]["train_n"] == 16


def test_soft_attack_backward_is_the_probability_weighted_mixture_only():
    torch.manual_seed(0)
    layer = A.MoEConv(4, 3, 3, 1, 2, bn=False, router=True)
    x = torch.rand(5, 4, 8, 8, requires_grad=True)
    logits = torch.randn(5, 2, requires_grad=True)
    w = torch.randn(5, 3, 8, 8)
    gate = A.top1_gate(logits)
    soft = A.masked_forward(layer, x, gate, soft=True)
    torch.testing.assert_close(soft, A.masked_forward(layer, x, gate))  # the hard value
    g_soft = torch.autograd.grad((soft * w).sum(), (x, logits))
    p = logits.softmax(-1)
    mix = sum(p[:, e, None, None, None] * F.conv2d(x, layer.weight[expert(layer, e)], padding=1) for e in range(2))
    g_mix = torch.autograd.grad((mix * w).sum(), (x, logits))
    for a, b in zip(g_soft, g_mix):
        torch.testing.assert_close(a, b)


def test_pathway_diversity_and_the_random_pathway_iou():
    choices = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]])
    d = A.pathway_diversity(choices)
    assert d["distinct"] == 3 and abs(d["entropy_bits"] - 1.5) < 1e-9 and d["inputs"] == 4
    assert str(A.pathway_diversity(torch.zeros(8, 5, dtype=torch.long))["entropy_bits"]) == "0.0"  # not -0.0
    assert A.pathway_diversity(torch.arange(8)[:, None])["entropy_bits"] == 3.0  # 8 inputs, 8 pathways


def backbone_moves(**overrides) -> dict:
    """How far one step of tiny(**overrides)'s method, from seed 0 on seeded random batches, moves every
    parameter that is not a router's."""
    s, model, opts = model_and_optimizers(**overrides)
    A.set_lr(opts, 0.0)
    before = snapshot(model)
    batches = [(torch.rand(16, 3, 32, 32), torch.randint(10, (16,))) for _ in range(A.STEPS[s.method][1])]
    step_of(s)(model, opts, batches, s.objective)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if "router" not in n}


def test_the_balance_term_stays_out_of_the_upper_level():
    moved = [backbone_moves(balance=balance, router_lr=0.0) for balance in (0.0, 1.0)]  # routers fixed: same routing
    assert all(torch.equal(moved[0][n], moved[1][n]) for n in moved[0])
    assert any(v.abs().sum() > 0 for v in moved[0].values())


def test_routing_regularizers_stay_out_of_a_frozen_router():
    """--train-params backbone (Sec. 4, stage 3): the routers are frozen, so the routing regularizers, which
    exist to shape the routers, must not train the backbone either."""
    moved = [backbone_moves(method="moe", train_params="backbone", init="x.pt", balance=weight,
                            router_supervision=weight) for weight in (0.0, 1.0)]
    assert all(torch.equal(moved[0][n], moved[1][n]) for n in moved[0])
    assert any(v.abs().sum() > 0 for v in moved[0].values())


def test_the_regularizers_train_the_routers_of_a_joint_method():
    """The counterpart of the two tests above: where the routers are trained, the terms do reach them."""
    def routers_after(weight):
        s, model, opts = model_and_optimizers(method="moe", balance=weight, router_supervision=weight)
        A.set_lr(opts, 0.0)
        torch.manual_seed(1)
        A.joint_step(model, opts, [(torch.rand(16, 3, 32, 32), torch.randint(10, (16,)))], s.objective)
        return [p.detach().clone() for p in A.router_params(model)]

    assert any(not torch.equal(a, b) for a, b in zip(routers_after(0.0), routers_after(1.0)))


def test_each_expert_is_initialized_like_a_standalone_conv():
    torch.manual_seed(0)
    for n in (2, 10):
        layer = A.MoEConv(64, 32, 3, 1, n, bn=True, router=True)
        single = A.MoEConv(64, 32, 3, 1, 1, bn=True, router=False)
        for e in range(n):
            assert abs(layer.weight[expert(layer, e)].std() / single.weight.std() - 1) < 0.05


def test_the_router_level_is_guarded_against_non_finite_losses(monkeypatch, tmp_path):
    level = A.level

    def nan_router_level(model, opt, x, y, obj, regularize, reduce=None):
        stats = level(model, opt, x, y, obj, regularize, reduce)
        return {**stats, "loss": torch.tensor(float("nan"))} if regularize else stats

    monkeypatch.setattr(A, "level", nan_router_level)
    with pytest.raises(FloatingPointError):
        A.train(tiny(train_n=32, out=str(tmp_path)), log=lambda _: None)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "result.json").exists()


def test_history_logs_the_learning_rate_of_each_level(two_epochs):
    _, result, _ = two_epochs
    row = result["history"][0]  # the last of epoch 1's 2 iterations ran at t/T = 1/4 of the cosine schedule
    backbone = 0.1 * 0.5 * (1 + math.cos(math.pi / 4))
    assert row["lr_backbone"] == pytest.approx(backbone, abs=1e-6)
    assert row["lr_routers"] == pytest.approx(backbone / 2, abs=1e-6)


# --------------------------------------------------------------- tests that must be able to fail
def test_advmoe_levels_get_their_own_batches(monkeypatch):
    seen = []
    monkeypatch.setattr(A, "level", lambda model, opt, x, y, obj, regularize, reduce: seen.append(
        (opt, x, regularize)) or {"loss": torch.tensor(1.0)})
    s, model, opts = model_and_optimizers()
    b_phi, b_psi = [(torch.rand(4, 3, 32, 32), torch.randint(10, (4,))) for _ in range(2)]
    A.advmoe_step(model, opts, [b_phi, b_psi], s.objective)
    assert [o for o, _, _ in seen] == [opts["phi"], opts["psi"]]  # routers first (line 4), then backbone (line 5)
    assert seen[0][1] is b_phi[0] and seen[1][1] is b_psi[0]
    assert [r for _, _, r in seen] == [True, False]  # the routing regularizers belong to the routers' level
    # and the epoch loop draws the two batches from different shuffles
    pairs = []
    monkeypatch.setitem(A.STEPS, "advmoe", (lambda net, opts, batches, obj, reduce: pairs.append(batches) or
                                            {"loss": torch.tensor(1.0)}, 2))
    data = A.load_data(tiny(train_n=64), torch.device("cpu"))
    A.train_epoch(model, opts, data, tiny(batch_size=16), 0, torch.device("cpu"), lambda _: None)
    assert len(pairs) == 4 and all(len(b) == 2 for b in pairs)
    assert all(not torch.equal(a[0], b[0]) for a, b in pairs)
    # each stream is one pass over the training set
    for k in range(2):
        assert sorted(torch.cat([b[k][1] for b in pairs]).tolist()) == sorted(data.splits["train"][1].tolist())


def test_trades_attack_maximizes_kl_from_the_eval_mode_clean_output(monkeypatch):
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25, width=0.5)).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    captured = {}

    def spy(model_, x_, loss_fn, eps, step, steps, start="uniform", generator=None):
        captured.update(loss_fn=loss_fn, start=start, training=model_.training, eps=eps, step=step, steps=steps)
        return x_

    monkeypatch.setattr(A, "pgd", spy)
    obj = tiny().objective
    A.training_attack(model, x, y, obj)
    assert captured["start"] == "normal" and captured["training"]  # pgd itself switches to eval mode
    assert (captured["eps"], captured["step"], captured["steps"]) == (obj.eps, obj.step_size, obj.steps)
    x2 = (x + 0.03 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    with A.evaluating(model):
        value = captured["loss_fn"](x2)
        target, other = model(x).detach(), model(x2)
    torch.testing.assert_close(value, A.kl_from_logits(target, other, "sum"))          # KL(f(x) || f(x'))
    assert not torch.allclose(value, A.kl_from_logits(other, target, "sum"))
    grads = torch.autograd.grad(value, [x2] + list(model.parameters()), allow_unused=True)
    assert grads[0] is not None  # the objective moves with x' only; the clean target is a constant
    with A.evaluating(model):
        assert captured["loss_fn"](x).abs() < 1e-5  # KL(f(x) || f(x)) = 0: the target is the eval-mode output


def test_four_way_split_on_a_constructed_case():
    def gates(*choices):
        return [A.Gate(torch.zeros(len(c), 2), torch.tensor(c), torch.ones(len(c))) for c in choices]

    def pathway(gates):  # (B, L): each input's expert at every layer
        return torch.stack([g.choice for g in gates], 1)

    clean = gates([0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1])
    adv = gates([0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0])  # the router flips for inputs 1, 2, 4 (layer 0), 5 (layer 1)
    ok_adv = torch.tensor([True, True, True, False, False, False])
    ok_clean = torch.tensor([True, True, False, True, False, True])  # inputs 2 and 4 are wrong before any attack
    usage, usage_adv, flips, split = A.routing_counts(pathway(clean), pathway(adv), ok_adv, ok_clean, 2)
    # over the clean-correct inputs 0, 1, 3, 5: (1) neither: 0; (2) router only: 1; (3) prediction only: 3;
    # (4) both: 5 (over all six inputs it would be 1, 2, 1, 2)
    assert split.tolist() == [1, 1, 1, 1] and flips.tolist() == [3, 1]
    assert usage.tolist() == [[6, 0], [0, 6]] and usage_adv.tolist() == [[3, 3], [1, 5]]
    summary = A.routing_summary(pathway(clean), pathway(adv), ok_adv, ok_clean, 2)
    assert summary["split_n"] == 4 and summary["split_4way"]["router_only"] == 25.0
    assert summary["router_robustness"] == 50.0 and summary["moe_robustness"] == 50.0  # (1)+(3), (1)+(2)
    assert summary["flip_rate_any_layer"] == pytest.approx(4 / 6, abs=1e-4)  # inputs 1, 2, 4, 5 of all six
    assert summary["flip_rate_per_layer"] == [0.5, pytest.approx(1 / 6, abs=1e-4)]
    assert summary["usage_adv"] == [[0.5, 0.5], [pytest.approx(1 / 6, abs=1e-4), pytest.approx(5 / 6, abs=1e-4)]]
    assert summary["pathways"]["clean"]["distinct"] == 1 and summary["pathways"]["adv"]["distinct"] == 3


def test_routing_is_logged_every_epoch_and_recorded_before_training(two_epochs):
    out, result, lines = two_epochs
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        layers = len(r["routing"]["top_share"])
        assert layers == 16 and 0 <= r["routing"]["collapsed"] <= layers
        assert r["routing"]["collapsed"] == sum(v >= 0.95 for v in r["routing"]["top_share"])
    # majority changes are counted against the epoch before
    for before, now in zip(rows, rows[1:]):
        changed = sum(a != b for a, b in zip(before["routing"]["majority"], now["routing"]["majority"]))
        assert now["routing"]["majority_changed"] == changed
    assert result["routing_epoch0"] == rows[0]["routing"] and "usage_clean" in result["routing"]
    assert [r["routing"] for r in result["history"]] == [r["routing"] for r in rows[1:]]
    assert any("epoch 1/2" in line and "collapsed" in line for line in lines)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2  # a checkpoint each epoch


def test_the_training_step_is_the_authors_five_over_255_scaled_with_eps():
    assert tiny().train_step_size == pytest.approx(5 / 255)                      # eps 8/255, K = 2
    assert tiny(dataset="tinyimagenet").train_step_size == pytest.approx(1.25 / 255)  # eps 2/255
    assert tiny(train_steps=5).train_step_size == pytest.approx(1.25 * 8 / 255 / 5)
    assert tiny().test_step_size == pytest.approx(2 / 255)                        # eps / 4


def test_tiny_learnable_run_beats_chance(tmp_path):
    """The synthetic set is learnable in a few dozen steps: AT(S-Dense) with PGD-AT (--loss pgdat)."""
    s = tiny(method="sdense", loss="pgdat", epochs=6, train_n=256, eval_n=64, lr=0.1, train_steps=1, width=0.5,
             out=str(tmp_path))
    result = A.train(s, log=lambda _: None)
    assert result["loss"] == "pgdat" and result["sa"] > 30 and result["ra"] > 15  # chance is 10%


# ------------------------------------------------------------- the run folder as a record


def test_an_interrupted_run_is_not_restarted_over(finished_run, tmp_path, capsys):
    """A folder with a checkpoint and a log but no result.json (a run stopped mid-way): a fresh run there is
    refused (one line, exit 2, nothing changed); --resume continues it."""
    out = copy_of(finished_run, tmp_path / "r")
    (out / "result.json").unlink()
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert A.main(B + ["--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_a_finished_run_is_never_replaced_silently(finished_run, tmp_path, capsys):
    out = str(copy_of(finished_run, tmp_path / "r"))
    first = (tmp_path / "r" / "result.json").read_text()
    assert A.main(B + ["--seed", "3", "--out", out]) == 2
    one_line_error(capsys.readouterr().err, out)
    assert (tmp_path / "r" / "result.json").read_text() == first
    # continuing a finished run keeps its result under its own name
    assert A.main(B + ["--out", out, "--epochs", "2", "--resume"]) == 0
    kept = list((tmp_path / "r").glob("result_epoch1_*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["epochs"] == 1
    assert json.loads((tmp_path / "r" / "result.json").read_text())["epochs"] == 2


def test_resume_keeps_the_recipe(finished_run, tmp_path, capsys):
    out = str(copy_of(finished_run, tmp_path / "q"))
    assert A.main(B + ["--epochs", "2", "--resume", "--seed", "7", "--loss", "pgdat", "--lr", "0.5", "--batch-size",
                       "4", "--out", out]) == 2
    one_line_error(capsys.readouterr().err, "--seed", "--loss", "--lr", "--batch-size")
    assert json.loads((tmp_path / "q" / "result.json").read_text())["epochs"] == 1  # untouched
    assert A.main(B + ["--epochs", "2", "--resume", "--test-steps", "2", "--out", out]) == 0  # evaluation may change
    assert json.loads((tmp_path / "q" / "result.json").read_text())["attack"].startswith("PGD-2 ")
    assert A.main(B + ["--resume", "--out", str(tmp_path / "new")]) == 0  # nothing to resume: a fresh start
    assert json.loads((tmp_path / "new" / "result.json").read_text())["epochs"] == 1


def test_eval_only_never_replaces_a_result(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path / "r")
    trained_result = (out / "result.json").read_text()
    assert A.main(["--eval-only", str(out / "checkpoint.pt"), "--out", str(out), "--device", "cpu"]) == 2
    one_line_error(capsys.readouterr().err, str(out))
    assert (out / "result.json").read_text() == trained_result
    assert A.main(["--eval-only", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0  # default: <run>/eval
    evaluated = (out / "eval" / "result.json").read_text()
    capsys.readouterr()
    assert A.main(["--eval-only", str(out / "checkpoint.pt"), "--device", "cpu"]) == 2  # again
    one_line_error(capsys.readouterr().err, str(out / "eval"))
    assert (out / "eval" / "result.json").read_text() == evaluated


def bad_checkpoint(kind: str, where: Path, good: Path) -> Path:
    path = where / "checkpoint.pt"
    where.mkdir(parents=True, exist_ok=True)
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[:1000])
    elif kind == "garbage":
        path.write_bytes(os.urandom(3000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "state_dict":
        torch.save(torch.load(good, weights_only=True)["model"], path)
    elif kind == "unknown_keys":
        ckpt = torch.load(good, weights_only=True)
        ckpt["model"]["backbone.extra.weight"] = torch.zeros(1)
        torch.save(ckpt, path)
    elif kind == "needs_code":  # a pickle that would run code (a class of this test module) if loaded fully
        ckpt = torch.load(good, weights_only=True)
        ckpt["extra"] = Linear01(3)
        torch.save(ckpt, path)
    return path




@pytest.mark.parametrize("flag,kind", [
    *[("--eval-only", kind) for kind in ("truncated", "garbage", "empty", "directory", "state_dict", "unknown_keys",
                                         "needs_code")],
    *[(flag, kind) for flag in ("--resume", "--init") for kind in ("garbage", "state_dict", "unknown_keys")]])
def test_bad_checkpoints_give_one_line_errors(flag, kind, good_checkpoint, tmp_path, capsys):
    path = bad_checkpoint(kind, tmp_path / "bad", good_checkpoint)
    if flag == "--resume":
        args = B + ["--method", "moe", "--resume", "--out", str(tmp_path / "bad")]
    elif flag == "--eval-only":
        args = ["--eval-only", str(path), "--device", "cpu", "--out", str(tmp_path / "e")]
    else:
        args = B + ["--method", "moe", flag, str(path), "--out", str(tmp_path / "e")]
    assert A.main(args) == 2
    one_line_error(capsys.readouterr().err, str(path))
    assert not (tmp_path / "e").exists()  # nothing written, no empty folder
    assert {p.name for p in (tmp_path / "bad").iterdir()} == {"checkpoint.pt"}


def npz_case(case: str, root: Path):
    import numpy as np
    rng = np.random.default_rng(0)
    x = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 40), ("test", 8))}
    y = {s: rng.integers(0, 10, len(x[s])) for s in x}
    if case == "float_images":
        x["train"] = x["train"] / 255.0
    elif case == "nchw":
        x["train"] = x["train"].transpose(0, 3, 1, 2).copy()
    elif case == "float_labels":
        y["train"] = y["train"].astype(np.float32)
    elif case == "label_range":
        y["train"][0] = 10
    elif case == "lengths":
        y["train"] = y["train"][:-1]
    elif case == "sizes":
        x["test"] = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    elif case == "empty":
        x["test"], y["test"] = x["test"][:0], y["test"][:0]
    elif case == "not_a_zip":
        (root / "cifar10_train.npz").write_bytes(b"not an npz")
    for split in ("train", "test"):
        arrays = {"x": x[split], "y": y[split]}
        if case == "missing_array" and split == "train":
            arrays = {"images": x[split], "y": y[split]}
        if not (case == "missing_file" and split == "test") and not (case == "not_a_zip" and split == "train"):
            np.savez(root / f"cifar10_{split}.npz", **arrays)
    return x, y


@pytest.mark.parametrize("case,named", [
    ("float_images", "cifar10_train.npz"), ("nchw", "cifar10_train.npz"), ("lengths", "cifar10_train.npz"),
    ("missing_array", "cifar10_train.npz"), ("missing_file", "cifar10_test.npz"), ("not_a_zip", "cifar10_train.npz")])
def test_bad_npz_data_gives_one_line_errors(case, named, tmp_path, capsys):
    npz_case(case, tmp_path)
    assert A.main(B[2:] + ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys.readouterr().err, named)
    assert not (tmp_path / "r").exists()


def test_cifar_npz_is_read_as_nchw_uint8(tmp_path):
    x, y = npz_case("good", tmp_path)
    data = A.load_data(A.Settings(dataset="cifar10", data_dir=str(tmp_path), val_n=5), torch.device("cpu"))
    (xt, yt), (xv, yv) = data.splits["train"], data.splits["test"]
    assert xt.shape == (35, 3, 32, 32) and xt.dtype == torch.uint8 and len(data.splits["val"][1]) == 5
    keep, _ = A.split_train(40, 0, 5)
    assert torch.equal(xt, torch.from_numpy(x["train"]).permute(0, 3, 1, 2)[keep])  # NHWC -> NCHW, pixel by pixel
    assert torch.equal(yt, torch.from_numpy(y["train"])[keep]) and yt.dtype == torch.long
    assert torch.equal(xv, torch.from_numpy(x["test"]).permute(0, 3, 1, 2)) and data.num_classes == 10


@pytest.mark.parametrize("args,named", [
    (["--lr", "-0.1"], "--lr"), (["--router-lr", "-1"], "--router-lr"), (["--balance", "inf"], "--balance"),
    (["--router-supervision", "-6"], "--router-supervision"), (["--tie-epochs", "-1"], "--tie-epochs"),
    (["--no-shared-core", "--tie-epochs", "2"], "--shared-core"), (["--eps", "nan"], "--eps"), (["--eps", "8"], "--eps"),
    (["--test-steps", "0"], "--test-steps"), (["--eval-n", "-1"], "--eval-n"), (["--quick-eval-n", "-5"], "--quick-eval-n"),
    (["--square-queries", "0"], "--square-queries"), (["--device", "foo"], "--device"), (["--device", "mps"], "--device"),
    (["--width", "0"], "--width"), (["--width", "65"], "--width"), (["--train-n", "100000"], "--train-n"),
    (["--val-n", "100000"], "--val-n"), (["--epochs", "abc"], "--epochs"), (["--no-such-flag", "1"], "--no-such-flag"),
    (["--method", "sdense", "--train-params", "backbone", "--init", "x.pt"], "--train-params"),
    (["--router", "both"], "--router"), (["--loss", "ce"], "--loss"),
])
def test_bad_flags_give_one_line_errors(args, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (nothing may be written; if it were, it would land here)
    device = [] if "--device" in args else ["--device", "cpu"]
    assert A.main([a for a in B if a not in ("--device", "cpu")] + device + args + ["--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys.readouterr().err, named)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,named", [
    (["bench", "--width", "-1", "--device", "cpu"], "--width"),
    (["bench", "--arch", "resnet50", "--device", "cpu"], "--arch"),
])
def test_bad_bench_flags_give_one_line_errors(argv, named, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert A.main(argv) == 2
    one_line_error(capsys.readouterr().err, named)
    assert not list(tmp_path.iterdir())


def test_report_skips_a_corrupt_result(finished_run, tmp_path, capsys):
    copy_of(finished_run, tmp_path / "good")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "result.json").write_text('{"sa": 1')
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "result.json").write_text('{"sa": 1}')
    capsys.readouterr()
    assert A.main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    warnings = err.strip().splitlines()
    assert "| good | advmoe |" in out and len(warnings) == 2 and all(w.startswith("advmoe: warning:") for w in warnings)
    assert "cut" in warnings[0] and "partial" in warnings[1]


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_ctrl_c_keeps_the_run(tmp_path, capsys, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(f)
        if len(calls) > 1:
            Path(f).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        A.main(B + ["--epochs", "2", "--out", str(tmp_path / "r")])
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the previous one, intact
    rows = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1]  # the log goes no further than the checkpoint
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]
    assert not (tmp_path / "r" / "result.json").exists()
    monkeypatch.setattr(torch, "save", save)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "finish", ctrl_c)
    assert A.main(B + ["--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("advmoe:") and len(err.strip().splitlines()) == 1 and "--resume" in err, err
    assert (tmp_path / "s" / "checkpoint.pt").exists() and not (tmp_path / "s" / "result.json").exists()


def test_atomic_write_leaves_the_previous_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    A.write_json(path, {"a": 1})

    def half_then_fail(tmp):
        Path(tmp).write_text('{"a": ')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        A.atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_help_comes_from_the_settings_comments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        A.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "report" in text and "bench" in text
    parser = A.settings_parser()
    helps = {a.option_strings[0]: a.help for a in parser._actions if a.option_strings}
    assert set(helps) >= {A.flag(f.name) for f in A.dataclasses.fields(A.Settings)}
    assert helps["--lr"].startswith("SGD learning rate") and "(default: 0.1)" in helps["--lr"]
    assert "experts per MoE layer" in helps["--n-experts"] and "(default: 2)" in helps["--n-experts"]
    assert "8/255" in helps["--eps"] and "(default: None)" not in helps["--eps"]
    assert {g.title for g in parser._action_groups} >= {"what to train", "data", "evaluation", "the run"}
    # defaults=False: only the flags given
    assert vars(A.settings_parser(False).parse_args(["--lr", "0.5", "--no-router-standardize"])) == {
        "lr": 0.5, "router_standardize": False}
    assert len(A.dataclasses.fields(A.Settings)) <= 38
    assert A.parse_settings([]) == A.Settings()


def test_report_help_is_not_an_error(capsys):
    assert A.main(["report", "--help"]) == 0
    out, err = capsys.readouterr()
    assert "report DIR" in out and not err


def test_files_share_permissions_and_no_empty_folder(finished_run, tmp_path):
    modes = {f: (finished_run / f).stat().st_mode & 0o777 for f in ("result.json", "checkpoint.pt", "log.jsonl")}
    assert len(set(modes.values())) == 1, modes
    assert A.main(B + ["--batch-size", "100000", "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------- laptop scale
def test_train_subset_and_validation_split_are_fixed_and_disjoint():
    s = tiny(train_n=40, val_n=30)
    a, b = (A.load_data(A.Settings(**{**vars(s), "seed": seed}), torch.device("cpu")) for seed in (1, 2))
    (xa, ya), (xva, _) = a.splits["train"], a.splits["val"]
    assert len(ya) == 40 and a.eval_len(split="val") == 30 and a.eval_len() == A.SYNTHETIC[1]
    full = A.synthetic_data(*A.SYNTHETIC)[0][0]                                   # every training image
    rows = {bytes(img.numpy().tobytes()): i for i, img in enumerate(full)}
    train_idx = {rows[bytes(img.numpy().tobytes())] for img in xa}
    val_idx = {rows[bytes(img.numpy().tobytes())] for img in xva}
    assert len(train_idx) == 40 and len(val_idx) == 30 and not train_idx & val_idx  # disjoint
    assert all(torch.equal(p, q) for k in ("train", "val") for p, q in zip(a.splits[k], b.splits[k]))  # every --seed
    keep, held = A.split_train(100, 0, 30)
    assert len(keep) == 70 and not set(keep.tolist()) & set(held.tolist())          # --val-n alone: the rest trains
    x_val, _ = next(a.test_batches(64, split="val"))
    assert len(x_val) == 30 and x_val.dtype == torch.float32


def test_image_folder_subset_and_validation_split(tmp_path, monkeypatch):
    """TinyImageNet / ImageNet trees: --train-n / --val-n split train/ into disjoint parts; the validation
    part is read with the test transform (no random crop or flip: the same tensor every time)."""
    from PIL import Image
    real_loader = A.DataLoader
    monkeypatch.setattr(A, "DataLoader", lambda *a, **k: real_loader(*a, **{**k, "num_workers": 0}))  # no workers
    gen = torch.Generator().manual_seed(0)
    root = tmp_path / "tiny-imagenet-200"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(5):
                pixels = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    data = A.FolderData(root, 8, torch.device("cpu"), 6, 4, (0, 1))
    assert data.num_classes == 3 and data.train_len(2) == 3
    assert data.eval_len(split="val") == 4 and data.eval_len() == 15
    train, val = data.splits["train"], data.splits["val"]
    train_files = {train.dataset.samples[i][0] for i in train.indices}
    val_files = {val.dataset.samples[i][0] for i in val.indices}
    assert len(train_files) == 6 and len(val_files) == 4 and not train_files & val_files
    assert val.dataset.transform is not train.dataset.transform
    first, again = (next(data.test_batches(4, split="val"))[0] for _ in range(2))
    assert torch.equal(first, again) and first.shape == (4, 3, 8, 8)
    batches = list(data.train_batches(2, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and all(x.shape == (2, 3, 8, 8) for x, _ in batches)
    # --dataset tinyimagenet finds the tree in --data-dir (64 px, 2/255)
    s = A.Settings(dataset="tinyimagenet", data_dir=str(tmp_path), train_n=6, val_n=4)
    data = A.load_data(s, torch.device("cpu"))
    assert isinstance(data, A.FolderData) and data.image_size == 64 and s.eps == 2 / 255
    assert data.num_classes == 3 and data.eval_len(split="val") == 4 and data.eval_len() == 15


def test_validation_results_and_data_are_recorded(tmp_path):
    result = A.train(tiny(train_n=32, val_n=16, test_steps=1, quick_eval_n=8, epochs=2, out=str(tmp_path)),
                     log=lambda _: None)
    assert result["data"] == {"train_images": 32, "val_images": 16, "test_images": A.SYNTHETIC[1], "split_seed": 0}
    assert result["val"]["n"] == 16 and {"sa", "ra", "ra_worst"} <= set(result["val"])
    assert result["history"][0]["quick_split"] == "val" and result["eval_n"] == 16
    assert result["routing_epoch0"]["split"] == "val" and result["routing_epoch0"]["images"] == 16


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10", "vgg16", "densenet"])
def test_width_scales_parameters_and_gflops(arch):
    x = torch.rand(2, 3, 32, 32)
    full = [A.MoECNN(arch, 10, 32, r, n) for r, n in ((1.0, 1), (0.5, 1), (0.5, 2))]
    half = [A.MoECNN(arch, 10, 32, r, n, width=0.5) for r, n in ((1.0, 1), (0.5, 1), (0.5, 2))]
    for f, h in zip(full, half):
        ratio = n_params(h) / n_params(f)
        assert 0.2 < ratio < 0.3, ratio  # channels x 1/2 in and out: about 1/4 of the weights
        assert 0.2 < A.gflops_per_input(h, x) / A.gflops_per_input(f, x) < 0.3
    # r keeps its meaning at any width: S-Dense and the MoE pathway cost r^2 of Dense, at width 1/2 too
    g_dense, g_sdense, g_moe = (A.gflops_per_input(m, x) for m in half)
    assert g_sdense < g_moe < 1.01 * g_sdense and 0.2 < g_sdense / g_dense < 0.3


def test_progress_lines_while_training(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "PROGRESS_SECONDS", 0.0)
    lines = []
    A.train(tiny(train_n=32, batch_size=16, test_steps=1, out=str(tmp_path)), log=lines.append)
    progress = [line for line in lines if "images," in line and "img/s, ETA" in line]
    assert any(line.strip().startswith("epoch 1/1: 32/64 images") for line in progress), lines  # two streams of 32
    assert any(line.strip().startswith("epoch 1/1: 64/64 images") for line in progress), lines
    assert any(line.strip().startswith("evaluated 16/16 images of test") for line in lines), lines
    quiet = []
    monkeypatch.setattr(A, "PROGRESS_SECONDS", 3600.0)  # the default 30 s: none in a short run
    A.train(tiny(train_n=32, batch_size=16, test_steps=1, out=str(tmp_path / "quiet")), log=quiet.append)
    assert not [line for line in quiet if "img/s, ETA" in line]


# -------------------------------------------------------------------- fast on a GPU by design
def test_training_forward_and_trades_loss_compile_without_graph_break():
    """The dispatch used on CUDA (masked) must compile as one graph, in training (forward and TRADES loss) and in
    inference: a graph break is where a host sync (.item(), .tolist()) or a data-dependent shape would stall a
    GPU. fullgraph=True fails on any (dynamo's tracing finds them; the eager backend runs the graph as traced)."""
    torch.manual_seed(0)
    model = A.MoECNN("vgg16", 10, 32, 0.25, 2, width=0.25).train()
    s = tiny(balance=0.1, router_supervision=0.1)
    x, x_adv, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.randint(10, (4,))

    def loss_of(logits, logits_adv, gates, y):
        return A.trades_loss(logits, logits_adv, y, A.BETA) + A.routing_regularizer(gates, [], y, s.objective)

    torch._dynamo.reset()
    state = copy.deepcopy(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    logits, gates = compiled(x, return_routing=True, dispatch="masked")
    logits_adv, gates_adv = compiled(x_adv, return_routing=True, dispatch="masked")
    loss = torch.compile(loss_of, fullgraph=True, backend="eager")(logits, logits_adv, gates + gates_adv, y)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)
    model.load_state_dict(state)  # the same BatchNorm statistics for the eager run
    (e, eg), (ea, eag) = (model(v, return_routing=True, dispatch="masked") for v in (x, x_adv))
    torch.testing.assert_close(loss, loss_of(e, ea, eg + eag, y))
    model.eval()  # inference (evaluation, attacks): no host sync per layer, nor per forward
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, dispatch="masked"), model(x, dispatch="sparse"))
    # what the CPU runs by default is the sparse path, CUDA the masked one
    assert torch.equal(model(x), model(x, dispatch="sparse"))


# ------------------------------------------------------- review of the operations
def test_frozen_batchnorm_stays_frozen_through_the_training_attack():
    """--train-params: the frozen part's BatchNorms are in eval mode; the attacks inside a training step switch the
    model to eval mode and back, and must give every module its own mode back."""
    s, model, opts = model_and_optimizers(method="moe", train_params="routers", init="x.pt")
    model.train()
    A.freeze_batchnorm(model, "routers")  # the backbone frozen: its BatchNorms in eval mode
    frozen = {n for n, m in model.named_modules() if not m.training}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    A.joint_step(model, opts, [(torch.rand(8, 3, 32, 32), torch.randint(10, (8,)))], s.objective)
    assert frozen and frozen == {n for n, m in model.named_modules() if not m.training}
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers() if "router" not in n)  # statistics kept


def test_an_attack_named_twice_runs_once():
    assert tiny(eval_attacks="pgd,soft,soft").attacks == ("pgd", "soft")
    assert tiny(eval_attacks="soft").attacks == ("soft",)
    assert tiny(eval_attacks="pgd,autoattack,pgd").attacks == ("pgd", "autoattack")


def test_the_routing_regularizer_is_logged_when_it_is_on(tmp_path):
    """The authors' configuration (--router-supervision): each epoch's row and progress line carry the
    regularizer's mean value (6 x CE to class mod N); the paper's routing has none."""
    for extra, logged in ((["--router", "global", "--router-supervision", "6"], True), (["--no-shared-core"], False)):
        lines, out = [], tmp_path / str(logged)
        A.train(A.parse_settings(B + ["--method", "moe", "--out", str(out)] + extra), log=lines.append)
        row = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
        assert ("router_reg" in row) == logged == any(" router_reg " in line for line in lines)
        assert not logged or 0 < row["router_reg"] < math.inf


def test_result_records_the_commit_of_the_code_that_ran(tmp_path, monkeypatch):
    """A long run records the commit checked out when it started, not the one checked out when it finished."""
    monkeypatch.setattr(A, "git_commit", lambda: "moved on")
    result = A.train(A.parse_settings(B + ["--out", str(tmp_path / "r")]), log=lambda line: None)
    assert result["commit"] == A.COMMIT != "moved on"


def test_resume_cannot_shorten_a_run(two_epochs, tmp_path, capsys):
    out = str(copy_of(two_epochs[0], tmp_path / "r"))
    assert A.main(B + ["--router-lr", "0.5", "--epochs", "1", "--resume", "--out", out]) == 2
    one_line_error(capsys.readouterr().err, "--epochs")
    assert json.loads((tmp_path / "r" / "result.json").read_text())["epochs"] == 2


# ------------------------------------------------------------- the learnability switches (issue: MoE vs S-Dense)
@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_a_shared_batchnorm_normalizes_the_whole_batch_with_one_set_of_statistics(dispatch):
    """--shared-bn: one BatchNorm of cout channels; in training it normalizes every input's chosen expert output
    with the statistics of the whole batch (a per-expert BatchNorm uses each expert's group's)."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 6, 3, 1, 2, bn=True, router=True, shared_bn=True).train()
    assert layer.bn.weight.shape == (6,)
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 2.0), layer.bn.bias.uniform_(-1, 1)
    x, choice = torch.rand(8, 4, 8, 8), torch.arange(8) % 2
    logits = F.one_hot(choice, 2).float()
    y = layer(x, A.Routing(dispatch, shared=A.top1_gate(logits)))
    out = torch.stack([F.conv2d(x[b:b + 1], layer.weight[expert(layer, int(choice[b]))], padding=1)[0]
                       for b in range(8)])                        # each input's chosen expert, before the BatchNorm
    ref = F.batch_norm(out, None, None, layer.bn.weight, layer.bn.bias, True, 0.0, layer.bn.eps)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_mean, 0.1 * out.mean((0, 2, 3)))
    per_expert = A.MoEConv(4, 6, 3, 1, 2, bn=True, router=True).train()
    per_expert.weight.data.copy_(layer.weight)
    y_own = per_expert(x, A.Routing(dispatch, shared=A.top1_gate(logits)))
    assert per_expert.bn.weight.shape == (12,) and not torch.allclose(y_own, ref, atol=1e-3)


def test_shared_bn_is_a_flag_that_builds_the_model():
    s = A.parse_settings(B + ["--method", "moe", "--shared-bn", "--no-router-standardize"])
    assert s.shared_bn is True and s.router_standardize is False
    convs = [m for m in A.build_model(s, 10, 32).modules() if isinstance(m, A.MoEConv) and m.n > 1]
    assert convs and all(m.bn is None or m.bn.weight.shape == (m.cout,) for m in convs)
    assert not any(m.standardized for m in convs)


@pytest.mark.parametrize("router", ["layer", "global"])
def test_the_router_reads_standardized_or_raw_pooled_features(router):
    """--router-standardize (default) / --no-router-standardize: what the router's linear head reads."""
    x = torch.rand(6, 3, 32, 32)
    for standardized in (True, False):
        torch.manual_seed(0)
        model = moe("resnet18", router=router, width=0.25, router_standardize=standardized).train()
        seen = []
        head = model.global_router.head if router == "global" else model.backbone.blocks[0].conv1.router
        head.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        model(x)
        z = seen[0]                                                               # (B, C) the head's input
        # standardized: mean 0, variance var / (var + 1e-5) per input (raw pooled features: mean ~0.4, var ~1e-4)
        standard = bool(z.mean(1).abs().max() < 1e-4 and z.var(1, unbiased=False).min() > 0.5)
        assert standard == standardized


@pytest.mark.parametrize("method", ["dense", "sdense", "moe", "advmoe"])
def test_loss_natural_is_cross_entropy_with_no_attack_for_every_method(method, monkeypatch):
    s, model, opts = model_and_optimizers(method=method, loss="natural")
    monkeypatch.setattr(A, "pgd", lambda *a, **k: pytest.fail("--loss natural ran an attack"))
    batches = [(torch.rand(16, 3, 32, 32), torch.randint(10, (16,))) for _ in range(A.STEPS[method][1])]
    reference = copy.deepcopy(model).train()
    x, y = batches[-1]   # AdvMoE reports its upper level (B_psi, the last batch)
    expected = F.cross_entropy(reference(x), y)
    before = snapshot(model)
    stats = step_of(s)(model.train(), opts, batches, s.objective)
    torch.testing.assert_close(stats["loss"], expected.detach(), rtol=1e-5, atol=1e-5) if method != "advmoe" \
        else None
    assert stats["acc"] == stats["acc_adv"]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["moe", "advmoe"])
def test_router_lr_zero_freezes_routing(method):
    """--router-lr 0: the routers keep their initial weights (routing fixed, by the input) while the backbone
    learns."""
    s, model, opts = model_and_optimizers(method=method, router_lr=0.0, loss="natural")
    A.set_lr(opts, 0.0)
    before = snapshot(model)
    batches = [(torch.rand(16, 3, 32, 32), torch.randint(10, (16,))) for _ in range(A.STEPS[method][1])]
    for _ in range(2):
        step_of(s)(model.train(), opts, batches, s.objective)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    routers = {n for n, _ in model.named_parameters() if "router" in n}
    assert routers and moved and not moved & routers


def test_a_checkpoint_that_does_not_record_a_setting_loads_as_it_was_trained(good_checkpoint, tmp_path):
    """Checkpoints written before --shared-bn, --router-standardize and --shared-core existed (and with a
    --layout this version no longer has): per-expert BatchNorms, standardized routers, independent experts.
    The shared-core run is rewritten as the same model with independent experts, W_e = W_shared + D_e."""
    ckpt = torch.load(good_checkpoint, weights_only=True)
    for k in [k for k in ckpt["model"] if k.endswith(".core")]:
        core, offsets = ckpt["model"].pop(k), ckpt["model"][k[:-len("core")] + "weight"]
        offsets += core.repeat(len(offsets) // len(core), 1, 1, 1)              # W_e, (N*cout, cin, k, k)
    for part in ("settings", "identity"):
        for k in ("shared_bn", "router_standardize", "shared_core"):
            del ckpt[part][k]
        ckpt[part]["layout"] = "position"
    torch.save(ckpt, tmp_path / "old.pt")
    read = A.read_checkpoint(tmp_path / "old.pt")
    assert (read["settings"]["shared_bn"], read["settings"]["router_standardize"], read["settings"]["shared_core"]
            ) == (False, True, False) and "layout" not in read["settings"]
    assert A.main(["--eval-only", str(tmp_path / "old.pt"), "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "e" / "result.json").read_text())
    assert result["settings"]["shared_core"] is False and result["settings"]["shared_bn"] is False
    trained = json.loads((good_checkpoint.parent / "result.json").read_text())
    assert (result["sa"], result["ra"]) == (trained["sa"], trained["ra"])


@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_an_expert_reads_the_pathway_by_position_with_its_own_filters(dispatch):
    """Expert e computes y_b = conv(x_b, W[e rows]) on the pathway's channels, whoever wrote them."""
    torch.manual_seed(0)
    x = torch.rand(8, 6, 5, 5)
    own = A.top1_gate(F.one_hot(torch.tensor([0, 0, 1, 1, 0, 1, 0, 1]), 2).float())
    layer = A.MoEConv(6, 4, 3, 1, 2, bn=False, router=True)
    assert layer.weight.shape == (8, 6, 3, 3)
    y = layer(x, A.Routing(dispatch, shared=own))
    for b in range(8):
        e = int(own.choice[b])
        torch.testing.assert_close(y[b], F.conv2d(x[b:b + 1], layer.weight[4 * e:4 * e + 4], padding=1)[0],
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ learnability switches (shared core, upcycling, ...)
def test_shared_core_experts_start_as_one_conv_and_every_input_trains_the_core():
    """--shared-core: W_e = W_shared + D_e with D_e = 0 at init, so every expert starts as the same conv; an input
    routed to either expert sends its gradient into W_shared; the sparse path still equals the masked one."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 6, 3, 1, 2, bn=False, router=True, core=True).double()
    assert layer.core.shape == (6, 4, 3, 3) and torch.equal(layer.weight, torch.zeros(12, 4, 3, 3, dtype=torch.float64))
    w = layer.filters()
    assert torch.equal(w[:6], w[6:]) and torch.equal(w[:6], layer.core)
    x = torch.rand(8, 4, 8, 8, dtype=torch.float64)
    for e in (0, 1):  # every input on expert e: the core's gradient is that of the conv every input ran
        layer.zero_grad()
        logits = torch.zeros(8, 2, dtype=torch.float64)
        logits[:, e] = 1.0
        layer(x, A.Routing("sparse", shared=A.top1_gate(logits))).square().sum().backward()
        assert layer.core.grad.abs().sum() > 0
        torch.testing.assert_close(layer.core.grad, layer.weight.grad[expert(layer, e)])
    torch.manual_seed(0)
    sparse = moe("resnet18", width=0.25, shared_core=True).double()
    for n, p in sparse.named_parameters():  # offsets away from 0, so the experts differ
        if n.endswith("weight") and p.dim() == 4 and "core" not in n:
            p.data += 0.01 * torch.randn_like(p)
    masked, xb = copy.deepcopy(sparse), torch.rand(8, 3, 32, 32, dtype=torch.float64)
    ys, gs = sparse(xb, return_routing=True, dispatch="sparse")
    ym, gm = masked(xb, return_routing=True, dispatch="masked")
    torch.testing.assert_close(ys, ym, rtol=1e-10, atol=1e-10)
    ys.square().sum().backward(), ym.square().sum().backward()
    for (n, a), b in zip(sparse.named_parameters(), masked.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=n)
    # the same model and cost: per input the filters of one expert run
    plain = moe("resnet18", width=0.25)
    assert A.gflops_per_input(sparse.float(), torch.rand(2, 3, 32, 32)) == A.gflops_per_input(plain, torch.rand(2, 3, 32, 32))


def test_tie_epochs_hold_the_offsets_at_zero_then_train_them(tmp_path):
    """--tie-epochs K (upcycling): the offsets D_e have learning rate 0 for K epochs (the experts' filters
    tied: their spread is 0), then the schedule's rate; the core trains throughout."""
    out = tmp_path / "run"
    A.main(B + ["--method", "moe", "--epochs", "2", "--shared-core", "--tie-epochs", "1", "--out", str(out)])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
    assert rows[0]["lr_offsets"] == 0 and rows[1]["lr_offsets"] > 0 and rows[0]["lr_backbone"] > 0
    assert max(rows[0]["expert_spread"]) == 0 and min(rows[1]["expert_spread"]) > 0
    assert len(rows[0]["expert_spread"]) == 16
    with pytest.raises(A.ConfigError, match="--shared-core"):
        A.parse_settings(B + ["--no-shared-core", "--tie-epochs", "1"])


def test_the_default_moe_recipe_is_upcycled_shared_core_experts_with_the_balance_term():
    """Deviation 14: an MoE method defaults to experts that share a core, tied for a quarter of the epochs, and
    the balance term 0.1; --router authors keeps the authors' independent experts; a dense model has no core."""
    recipe = lambda *a: (lambda s: (s.shared_core, s.tie_epochs, s.balance))(A.parse_settings(B + [*a]))  # noqa: E731
    assert recipe("--method", "advmoe", "--epochs", "12") == recipe("--method", "moe", "--epochs", "13") \
        == (True, 3, 0.1)
    assert recipe("--method", "advmoe", "--epochs", "12", "--tie-epochs", "0", "--balance", "0.5") == (True, 0, 0.5)
    for off in (["--router", "authors"], ["--no-shared-core"], ["--method", "sdense"], ["--method", "sparse"]):
        assert recipe("--epochs", "12", *off) == (False, 0, 0.0), off
    s = A.parse_settings(B + ["--method", "moe"])
    assert any(n.endswith(".core") for n, _ in A.build_model(s, 10, 32).named_parameters())


def test_the_authors_routing_learns_from_its_own_loss_only():
    """--router authors: one global router, one BatchNorm shared by a layer's experts, unstandardized router
    features; in training the router learns from alpha CE(g(x), y mod N) + beta KL(g(x) || g(x_adv)) alone
    (alpha = beta = 6) and the rest from the task loss alone, while attacks still get the gradient through the
    straight-through gate, as in the authors' code."""
    torch.manual_seed(0)
    s = tiny(method="moe", router="authors")
    assert s.router_supervision == 6.0 and tiny(router="global").router_supervision == 0.0
    model = A.build_model(s, 10, 32)
    layer = model.backbone.blocks[0].conv1
    assert layer.router is None and layer.shared_bn and layer.bn.num_features == layer.cout
    assert not model.global_router.standardized
    x, x_adv, y = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    logits, gates = model(x, return_routing=True)
    assert gates[0].scale.requires_grad  # an attack's gradient passes the gate
    _, gates_adv = model(x_adv, return_routing=True)
    reg = A.routing_regularizer(gates, gates_adv, y, s.objective)
    g, ga = gates[0].logits, gates_adv[0].logits
    p, q = g.softmax(1), ga.softmax(1)
    expected = 6 * F.cross_entropy(g, y % 2) + 6 * (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(reg, expected)
    torch.testing.assert_close(A.routing_regularizer(gates, [], y, s.objective), 6 * F.cross_entropy(g, y % 2))
    # one joint step (natural loss, so no attack): the routers' gradient is R's, the backbone's the task loss's
    s = tiny(method="moe", router="authors", loss="natural")
    model.train()
    opts = A.make_optimizers(model, s, torch.device("cpu"))
    state = copy.deepcopy(model.state_dict())
    A.level(model, opts["all"], x, y, s.objective, regularize=True)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    objective, reg, _ = A.robust_loss(model, x, y, s.objective)
    routers, rest = A.router_params(model), A.backbone_params(model)
    want = dict(zip([n for n, p in model.named_parameters() if "router" in n],
                    torch.autograd.grad(reg, routers, retain_graph=True)))
    want.update(zip([n for n, p in model.named_parameters() if "router" not in n],
                    torch.autograd.grad(objective, rest, allow_unused=True)))
    assert any("router" in n for n in got)
    for n, w in want.items():
        if w is not None:
            torch.testing.assert_close(got[n], w, rtol=1e-4, atol=1e-6, msg=n)


def test_the_soft_mixture_normalizes_an_expert_without_inputs_with_its_running_statistics():
    """Every input on expert 0: the soft mixture still reads expert 1, with its running statistics (batch
    statistics of no input would be mean 0, variance 0, a scale of gamma / sqrt(eps)), so its gradient stays
    of the size of expert 0's."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 6, 3, 1, 2, bn=True, router=True).train()
    x = torch.rand(16, 4, 8, 8)
    logits = torch.zeros(16, 2, requires_grad=True)
    gate = A.top1_gate(logits + torch.tensor([1.0, 0.0]))
    (A.masked_forward(layer, x, gate, soft=True) * torch.randn(16, 6, 8, 8)).sum().backward()
    norms = [layer.weight.grad[expert(layer, e)].norm() for e in (0, 1)]
    assert norms[1] > 0 and norms[1] < 10 * norms[0], norms


def test_sa_with_random_routing_is_reported_and_routes_at_random():
    """Random routing replaces every decision by a uniformly random expert; experts that are all the same
    (shared core at init) give exactly the routed SA, and a model without routers has none."""
    gate = A.top1_gate(torch.tensor([[9.0, 0.0]] * 400), torch.Generator().manual_seed(0))
    assert 150 < int(gate.choice.sum()) < 250
    s = tiny(method="moe", eval_n=64, test_steps=1)
    data = A.load_data(s, "cpu")
    for core, differ in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = A.build_model(A.Settings(**{**vars(s), "shared_core": core}), 10, 32)
        x = next(data.test_batches(64))[0]
        with torch.no_grad():
            routed = model.eval()(x)
            rand = model(x, random_routing=torch.Generator().manual_seed(1))
        assert (not torch.equal(routed, rand)) == differ
        r = A.evaluate(model, data, s, limit=64)
        assert (r["sa_random_routing"] == r["sa"]) if not differ else r["sa_random_routing"] is not None
    sdense = A.build_model(tiny(method="sdense"), 10, 32)
    assert A.evaluate(sdense, data, tiny(method="sdense", test_steps=1), limit=16)["sa_random_routing"] is None


# ------------------------------------------------------------------ the bugs a reviewer fears most (issue 32)
@pytest.mark.parametrize("dispatch", ["sparse", "masked"])
def test_the_router_gradient_is_the_straight_through_closed_form(dispatch):
    """y_b s_b with s_b = 1 + p_e(b) - sg(p_e(b)): with c_b = <y_b, dL/dy_b>, dL/dlogit_k = c_b p_e(b) (1[k = e(b)]
    - p_k). A wrong sign or form of the estimator (e.g. 1 + sg(p) - p) still gives a non-zero gradient."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 6, 3, 1, 3, bn=True, router=True).double().train()
    x, r = torch.rand(10, 4, 8, 8, dtype=torch.float64), torch.randn(10, 6, 8, 8, dtype=torch.float64)
    routing = A.Routing(dispatch)
    y = layer(x, routing)
    logits = routing.gates[0].logits
    logits.retain_grad()
    (y * r).sum().backward()
    p = logits.detach().softmax(1)
    e = routing.gates[0].choice
    assert len(e.unique()) > 1
    c = (y.detach() * r).sum((1, 2, 3))                                            # (B,) <y_b, dL/dy_b>
    pe = p.gather(1, e[:, None])                                                   # (B, 1)
    expected = c[:, None] * pe * (F.one_hot(e, 3).double() - p)                    # (B, N)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-9)  # (the softmax runs in float32)


def spy_modes(model):
    """Record, at every module's forward, whether it was in training mode."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append(m.training)) for m in model.modules()]
    return seen, hooks


def test_attacks_and_evaluation_run_in_eval_mode_and_leave_every_buffer_and_mode_as_found():
    """pgd, the training attack and evaluate see every module in eval mode (BatchNorm running statistics),
    change no buffer, and give back the caller's modes (one module deliberately left in eval mode)."""
    torch.manual_seed(0)
    s = tiny(method="moe", eval_n=8, test_steps=2)
    model = calibrated(A.build_model(s, 10, 32)).train()
    model.backbone.blocks[1].eval()
    modes = [m.training for m in model.modules()]
    buffers = [b.clone() for b in model.buffers()]
    x, y, data = torch.rand(8, 3, 32, 32), torch.randint(10, (8,)), A.load_data(s, "cpu")
    for run in (lambda: A.pgd(model, x, A.ce_objective(model, y), s.eps, s.test_step_size, 3),
                lambda: A.training_attack(model, x, y, s.objective),
                lambda: A.training_attack(model, x, y, s.objective._replace(loss="pgdat")),
                lambda: A.evaluate(model, data, s, limit=8, attacks=("pgd", "soft"))):
        seen, hooks = spy_modes(model)
        run()
        for h in hooks:
            h.remove()
        assert seen and not any(seen)
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_pgd_is_stronger_with_more_steps():
    """The loss PGD reaches rises with its steps: PGD-10 > PGD-2 > PGD-1 > a random point of the ball."""
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25, width=0.5)).eval()
    x, y, eps = torch.rand(32, 3, 32, 32), torch.randint(10, (32,)), 8 / 255
    objective = A.ce_objective(model, y)
    noisy = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    losses = [objective(v).item() for v in [noisy] + [A.pgd(model, x, objective, eps, eps / 4, k) for k in (1, 2, 10)]]
    assert losses == sorted(losses) and len(set(losses)) == 4, losses
    assert losses[3] > 1.3 * losses[0]


def test_ra_worst_is_the_per_image_and_over_clean_and_every_attack(monkeypatch):
    """Four images of label 0: image 3 is wrong when clean, PGD fools image 0, the soft attack image 1. RA_a =
    75 each, but only image 2 survives everything: RA-worst = 25, below the smallest RA (a min over RA_a, or an
    AND without the clean prediction, gives 75 or 50)."""
    def images(*wrong):  # logits (1, 0) classify an image as 0, the label; (0, 1) as 1
        x = torch.zeros(4, 3, 2, 2)
        x.view(4, -1)[:, 0] = 1.0
        for i in wrong:
            x.view(4, -1)[i, :2] = torch.tensor([0.0, 1.0])
        return x

    x, y = images(3), torch.zeros(4, dtype=torch.long)

    class Data:
        def test_batches(self, batch, limit=0, split="test"):
            yield x, y

        def eval_len(self, limit=0, split="test"):
            return 4

    # (image 3 happens to be classified correctly under both attacks)
    adv = {"pgd": [("pgd1", images(0))], "soft": [("soft", images(1))]}
    monkeypatch.setattr(A, "adversaries", lambda name, *a, **k: adv[name])
    r = A.evaluate(Linear01(2), Data(), tiny(test_steps=1), attacks=("pgd", "soft"))
    assert (r["sa"], r["attacks"]["pgd1"], r["attacks"]["soft"]) == (75.0, 75.0, 75.0)
    assert r["ra_worst"] == 25.0 and r["ra_worst_n"] == 4


def _average_on_two_ranks(rank, path, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), 1.0 + rank * 2)       # 1 on rank 0, 3 on rank 1: mean 2
    b.grad = torch.tensor([4.0, 0.0, 2.0]) if rank == 0 else None  # reached on rank 0 only: mean 2, 0, 1
    c.grad = torch.full((3,), float(rank))          # 0, 1: mean 0.5
    A.average_gradients([a, b, c])
    model = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(10 + rank)
        model.running_mean.fill_(5 + rank)
    A.sync_model(model)
    torch.save({"grads": [p.grad for p in (a, b, c)], "weight": model.weight.detach(),
                "mean": model.running_mean}, f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_torchrun_averages_gradients_and_takes_rank_0s_weights(tmp_path):
    """Two gloo ranks with known, different gradients (one None on a rank): average_gradients gives the mean
    (not the sum, not a no-op) on both; sync_model gives both rank 0's parameters and buffers."""
    import torch.multiprocessing as mp
    mp.spawn(_average_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        expected = [torch.full((3,), 2.0), torch.tensor([2.0, 0.0, 1.0]), torch.full((3,), 0.5)]
        for g, e in zip(got["grads"], expected):
            torch.testing.assert_close(g, e)
        assert torch.equal(got["weight"], torch.full((2,), 10.0)) and torch.equal(got["mean"], torch.full((2,), 5.0))


def test_the_backbone_level_attacks_the_model_after_the_router_step(monkeypatch):
    """Algorithm 1, line 5: the upper level's attack is made anew against (psi, phi*), the routers already
    updated by line 4; the lower level's against the routers as they were."""
    s, model, opts = model_and_optimizers()
    before = [p.detach().clone() for p in A.router_params(model)]
    seen, attack = [], A.training_attack

    def spy(model_, *a, **k):
        seen.append([p.detach().clone() for p in A.router_params(model_)])
        return attack(model_, *a, **k)

    monkeypatch.setattr(A, "training_attack", spy)
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(10, (8,))) for _ in range(2)]
    A.advmoe_step(model, opts, batches, s.objective)
    after = [p.detach() for p in A.router_params(model)]
    assert len(seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen[0], before))
    assert all(torch.equal(a, b) for a, b in zip(seen[1], after))
    assert not all(torch.equal(a, b) for a, b in zip(before, after))


def test_robust_loss_is_the_trades_formula_in_value_and_gradient(monkeypatch):
    """At a fixed x_adv: CE(f(x), y) + beta KL(f(x) || f(x_adv)), both sides of the KL differentiated. Swapped
    arguments or a detached clean side change the value or the gradient."""
    torch.manual_seed(0)
    s, model, _ = model_and_optimizers(method="moe")
    model = calibrated(model).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    monkeypatch.setattr(A, "training_attack", lambda *a, **k: x_adv)
    state = copy.deepcopy(model.state_dict())
    loss, _, _ = A.robust_loss(model, x, y, s.objective)
    got = torch.autograd.grad(loss, A.backbone_params(model))
    model.load_state_dict(state)  # the same BatchNorm statistics for the reference
    f_adv, f = model(x_adv), model(x)
    # CE(f(x), y) + beta sum_c p_c (log p_c - log q_c), p = softmax f(x), q = softmax f(x'), both differentiated
    p = f.softmax(1)
    ref = F.cross_entropy(f, y) + A.BETA * (p * (f.log_softmax(1) - f_adv.log_softmax(1))).sum(1).mean()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(got, torch.autograd.grad(ref, A.backbone_params(model))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_training_attack_raises_the_kl_well_above_a_random_start():
    torch.manual_seed(0)
    s, model, _ = model_and_optimizers(method="moe")
    model = calibrated(model).eval()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(10, (32,))
    noisy = (x + s.eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    x_adv = A.training_attack(model, x, y, s.objective)
    with torch.no_grad():
        target = model(x)
        kl_random = A.kl_from_logits(target, model(noisy)).item()
        kl_attack = A.kl_from_logits(target, model(x_adv)).item()
    assert kl_attack > 3 * kl_random, (kl_attack, kl_random)
