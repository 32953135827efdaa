"""Invariants of advmoe.py. CPU only, offline (synthetic data), a few minutes on 2 cores:
    python -m pytest -q test_advmoe.py
"""
import copy
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import advmoe as A

HERE = Path(__file__).resolve().parent
torch.set_num_threads(2)


def tiny(**kw) -> A.Settings:
    """Settings for fast CPU runs on the synthetic set."""
    base = dict(dataset="synthetic", arch="resnet18", method="advmoe", ratio=0.25, epochs=1, batch_size=32,
                synthetic_train=64, synthetic_test=16, test_steps=3, quick_eval_n=0, device="cpu", log_every=1000)
    return A.Settings(**{**base, **kw})


def moe(arch="resnet18", **kw) -> A.MoECNN:
    return A.MoECNN(arch, 10, 32, kw.pop("ratio", 0.5), kw.pop("n_experts", 2), **kw)


# ---------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch,dense_params", [("resnet18", 11_173_962), ("wrn28_10", 36_479_194),
                                               ("vgg16", 14_724_042), ("densenet", 176_122)])
def test_parameter_counts_shapes_and_cost(arch, dense_params):
    x = torch.rand(2, 3, 32, 32)
    dense, sdense, mixture = A.MoECNN(arch, 10, 32), A.MoECNN(arch, 10, 32, 0.5, 1), moe(arch)
    # Dense matches the published size of each backbone (CIFAR versions, 10 classes).
    assert A.count_params(dense)["total"] == dense_params
    # S-Dense keeps r*C channels everywhere: about r^2 of the parameters.
    assert 0.2 < A.count_params(sdense)["total"] / dense_params < 0.3
    # MoE at N=2, r=0.5: two S-Dense-sized experts per routed layer plus routers.
    routers = A.count_params(mixture)["routers"]
    assert routers > 0 and A.count_params(mixture)["total"] > 1.8 * A.count_params(sdense)["total"]
    for model in (dense, sdense, mixture):
        assert model(x).shape == (2, 10)
    g_dense, g_sdense, g_moe = (A.gflops_per_input(m, x) for m in (dense, sdense, mixture))
    # Per input, MoE = S-Dense pathway + routers, under half of Dense (the paper's claim, counted as executed).
    assert g_sdense < g_moe < 1.01 * g_sdense
    assert g_moe < 0.5 * g_dense


@pytest.mark.parametrize("size", [64, 224])
def test_imagenet_size_inputs(size):
    for arch in ("resnet18", "vgg16"):
        model = A.MoECNN(arch, 200, size, 0.5, 2)
        logits, gates = model(torch.rand(2, 3, size, size), return_routing=True)
        assert logits.shape == (2, 200) and len(gates) > 0


def test_return_routing_lists_every_moe_layer():
    model = moe("resnet18")
    logits, gates = model(torch.rand(5, 3, 32, 32), return_routing=True)
    assert len(gates) == 16  # two routed convs in each of 8 blocks
    for g in gates:
        assert g.logits.shape == (5, 2) and g.choice.shape == (5,)
        assert torch.equal(g.scale.detach(), torch.ones(5))  # straight-through: value exactly 1
    assert torch.equal(model(torch.zeros(1, 3, 32, 32)), model(torch.zeros(1, 3, 32, 32)))  # no state kept


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10", "vgg16", "densenet"])
@pytest.mark.parametrize("router", ["layer", "global"])
def test_sparse_path_equals_masked_reference(arch, router):
    """Outputs, gradients (routers included) and BatchNorm running statistics, float64, train and eval."""
    torch.manual_seed(0)
    sparse = moe(arch, ratio=0.25 if arch == "wrn28_10" else 0.5, router=router).double()
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
        if router == "layer" and training:  # meaningful only if inputs really go to different experts
            assert any(len(c.unique()) > 1 for c in cs)
        torch.testing.assert_close(ys, ym, rtol=1e-10, atol=1e-10)
        for a, b in zip(gs, gm):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        for a, b in zip(bs, bm):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_masked_batchnorm_statistics_stay_float32_under_bf16_autocast():
    """The masked (CUDA) path's per-expert statistics are matmuls, which autocast would run in bf16: at a mean
    of 50 std that rounding moves the normalized output by a fifth of a std."""
    torch.manual_seed(0)
    layer = A.MoEConv(4, 8, 3, 1, 2, True, True).train()
    y = 50 + torch.randn(16, 8, 6, 6)
    choice = torch.arange(16) % 2
    exact = layer.expert_affine(y, choice)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = layer.expert_affine(y, choice)
    for a, b in zip(exact, autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10", "vgg16", "densenet"])
@pytest.mark.parametrize("router", ["layer", "global"])
def test_a_fresh_router_routes_by_the_input(arch, router):
    (_, _), (x, _) = A.synthetic_data(8, 256)
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = A.MoECNN(arch, 10, 32, 0.5, 2, router=router, width=0.25).train()
        with torch.no_grad():
            _, gates = model(x.float() / 255, return_routing=True)
        share = A.expert_usage(gates).max(1).values                      # (L,) top expert's share per layer
        assert share.max() < 0.9, (seed, share.tolist())                  # no layer sends 90% to one expert


def test_sparse_path_updates_per_expert_batchnorm_statistics():
    model = moe("resnet18").train()
    layer = model.backbone.blocks[0].conv1
    before = layer.bn.running_mean.clone()
    _, gates = model(torch.rand(16, 3, 32, 32), return_routing=True)
    used = gates[0].choice.unique().tolist()
    for e in range(2):
        changed = not torch.equal(before[layer.expert(e)], layer.bn.running_mean[layer.expert(e)])
        assert changed == (e in used)


def test_gradients_reach_every_router():
    """With --balance 0 only the straight-through estimator can carry a gradient to the routers."""
    for router in ("layer", "global"):
        torch.manual_seed(0)
        model = moe("resnet18", ratio=0.25, router=router)
        s = tiny(router=router, balance=0.0)
        x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
        loss, reg, _ = A.robust_loss(model, x, y, s.objective)
        assert reg == 0
        loss.backward()
        for name, p in model.named_parameters():
            if "router" in name:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_forced_routing_sends_every_input_to_one_expert():
    model = moe("resnet18").eval()
    _, gates = model(torch.rand(6, 3, 32, 32), return_routing=True, force=1)
    assert all(bool((g.choice == 1).all()) for g in gates)


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
    model = calibrated(moe("resnet18", ratio=0.25))
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
    assert A.routing_regularizer([uniform], y, s.balance, s.router_supervision) < A.routing_regularizer([collapsed], y, s.balance, s.router_supervision)
    assert abs(A.routing_regularizer([collapsed], y, s.balance, s.router_supervision).item() - 2 * 0.9933) < 1e-3  # N * 1 * P_0


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
        A.level(model, opts[name], x, y, s.objective)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        own = {n for n, _ in model.named_parameters() if ("router" in n) == is_router}
        assert moved and moved <= own, moved - own   # something moved, and only this level's parameters
        assert len(moved) > 0.9 * len(own)           # and nearly all of them (a few may get no gradient)


def test_advmoe_step_uses_two_batches_and_reports_both_levels():
    s, model, opts = model_and_optimizers()
    batches = [(torch.rand(8, 3, 32, 32), torch.randint(10, (8,))) for _ in range(2)]
    stats = A.train_step(model, opts, batches, s)
    assert {"loss", "router_loss", "acc", "acc_adv", "top_share"} <= set(stats)
    assert set(opts) == {"phi", "psi"}
    assert not set(map(id, opts["phi"].param_groups[0]["params"])) & set(map(id, opts["psi"].param_groups[0]["params"]))


def test_tiny_learnable_run_beats_chance(tmp_path):
    s = tiny(method="moe", epochs=6, synthetic_train=256, synthetic_test=64, lr=0.05, train_steps=1, out=str(tmp_path))
    result = A.train(s, log=lambda _: None)
    assert result["sa"] > 30 and result["ra"] > 15  # chance is 10%
    assert len(result["routing"]["usage_clean"]) == 16


def test_resume_continues_exactly(tmp_path, monkeypatch):
    settings = dict(method="advmoe", epochs=2, synthetic_train=32, test_steps=2, quick_eval_n=16)
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
    # ... and resumed ends where the uninterrupted run ended.
    part = A.train(tiny(out=str(tmp_path / "part"), resume=True, **settings), log=lambda _: None)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full["sa"], full["ra"], full["routing"]) == (part["sa"], part["ra"], part["routing"])
    assert [r["loss"] for r in full["history"]] == [r["loss"] for r in part["history"]]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    A.train(tiny(out=str(tmp_path), synthetic_train=32, test_steps=1), log=lambda _: None)
    s = tiny(method="moe", out=str(tmp_path), resume=True)
    model = A.build_model(s, 10, 32)
    with pytest.raises(A.ConfigError, match="method 'advmoe' != 'moe'"):
        A.load_checkpoint(tmp_path / "checkpoint.pt", model, A.make_optimizers(model, s, torch.device("cpu")), s)


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
    for r in (0.5, 0.3) if arch != "wrn28_10" else (0.3,):
        dense = random_bn(A.MoECNN(arch, 10, 32)).double().eval()
        scores = A.ChannelScores(dense, r).double()
        with torch.no_grad():
            for v in scores.scores.values():
                v.uniform_()  # an arbitrary mask, not the weight-norm one
        pruned = A.MoECNN(arch, 10, 32, r, 1).double().eval()
        pruned.load_state_dict(A.extract_sparse(dense, scores.keep()))  # strict: every tensor has S-Dense's shape
        torch.testing.assert_close(pruned(x), scores(x), rtol=1e-9, atol=1e-9)
        sdense = A.MoECNN(arch, 10, 32, r, 1).double()
        assert A.gflops_per_input(pruned, x) == A.gflops_per_input(sdense, x) < 0.5 * A.gflops_per_input(dense, x)


def test_top_k_mask_keeps_k_channels_and_passes_the_gradient_straight_through():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1], requires_grad=True)
    mask = A.top_k_mask(scores, 2)
    assert mask.tolist() == [0, 0, 1, 1, 0]
    (mask * torch.arange(5.0)).sum().backward()
    assert scores.grad.tolist() == [0, 1, 2, 3, 4]  # d mask / d scores = identity


def test_pruning_learns_the_scores_only():
    torch.manual_seed(0)
    s = tiny(method="sparse", ratio=0.5, arch="densenet")
    dense = A.MoECNN("densenet", 10, 32).requires_grad_(False)
    scores = A.ChannelScores(dense, 0.5)
    opt = torch.optim.SGD(list(scores.scores.parameters()), lr=0.1)
    before = {n: p.clone() for n, p in dense.named_parameters()}
    keep, mask = scores.keep(), {g: v.clone() for g, v in scores.scores.items()}
    A.level(scores, opt, torch.rand(16, 3, 32, 32), torch.randint(10, (16,)), s.objective)
    assert all(torch.equal(before[n], p) for n, p in dense.named_parameters())
    assert sum(not torch.equal(mask[g], v) for g, v in scores.scores.items()) > 0.9 * len(mask)
    assert {g: len(v) for g, v in keep.items()} == {g: round(0.5 * c) for g, c in A.channel_groups(dense).items()}


def test_the_paper_analyses_end_to_end(tmp_path, monkeypatch):
    """AT(Dense) -> AT(Sparse) from it -> AT(MoE) with router utility (IoU with the Sparse mask) and AutoAttack
    on --aa-n images; the Sec. 4 stages (standard, routers only, backbone only); then the report."""
    runs = tmp_path / "runs"
    calls = []

    def identity_attack(model, x, y, eps, seed, log=None):  # stands in for torchattacks (not a requirement)
        calls.append(len(x))
        return [("autoattack", x)]

    monkeypatch.setattr(A, "import_torchattacks", lambda: None)
    monkeypatch.setattr(A, "autoattack", identity_attack)
    base = dict(arch="densenet", ratio=0.5, n_experts=2, synthetic_train=32, synthetic_test=8, batch_size=16,
                test_steps=1)

    def run(name, **kw):
        return A.train(tiny(out=str(runs / name), **{**base, **kw}), log=lambda _: None)

    dense = run("dense", method="dense")
    sparse = run("sparse", method="sparse", prune_epochs=1, init=str(runs / "dense" / "checkpoint.pt"))
    sdense = A.MoECNN("densenet", 10, 32, 0.5, 1)
    assert sparse["gflops"] == round(A.gflops_per_input(sdense, torch.rand(2, 3, 32, 32)), 4) < dense["gflops"] / 2
    assert sparse["params"]["total"] == A.count_params(sdense)["total"]
    assert sparse["sparse"]["init"].endswith("checkpoint.pt") and len(sparse["sparse"]["prune_history"]) == 1
    moe_run = run("moe", method="moe", iou_with=str(runs / "sparse" / "checkpoint.pt"), eval_aa=True, aa_n=3)
    assert calls == [3] and moe_run["attack_n"] == {"pgd1": 8, "autoattack": 3} and moe_run["ra_worst_n"] == 3
    assert moe_run["ra_aa"] is not None
    utility = moe_run["router_utility"]
    assert sum(utility["clean"]["histogram"]) == sum(utility["adv"]["histogram"]) == 8
    assert 0 <= utility["clean"]["mean"] <= 1
    # Sec. 4 study: each stage changes only the parameters it trains.
    run("s1", method="standard")
    run("s2", method="moe", train_params="routers", init=str(runs / "s1" / "checkpoint.pt"))
    run("s3", method="moe", train_params="backbone", init=str(runs / "s2" / "checkpoint.pt"))
    w = [torch.load(runs / f"s{i}" / "checkpoint.pt", weights_only=True)["model"] for i in (1, 2, 3)]
    params = dict(A.build_model(tiny(method="moe", **base), 10, 32).named_parameters())
    routers = {n for n in params if "router" in n}
    for (a, b), trained in (((0, 1), routers), ((1, 2), set(params) - routers)):
        moved = {n for n in params if not torch.equal(w[a][n], w[b][n])}
        assert moved and moved <= trained
    text = A.report(str(runs))
    for heading in ("## Table 1: synthetic", "## Table 2: AutoAttack", "## Sec. 4 study", "## Fig. 6: router utility",
                    "## Routing under attack", "| AT(Sparse) |", "| 3. + AT of the backbone"):
        assert heading in text, heading
    assert f"--method sparse --init {runs / 'dense' / 'checkpoint.pt'}" in text  # commands are listed
    # The sweeps' tables appear once runs at several N and r exist (copies of one run, relabelled).
    for n, r in ((2, 0.25), (4, 0.25)):
        res = {**moe_run, "method": "advmoe", "n_experts": n, "ratio": r}
        (runs / f"sweep_{n}_{r}").mkdir()
        (runs / f"sweep_{n}_{r}" / "result.json").write_text(json.dumps(res))
    text = A.report(str(runs))
    assert "## Fig. 7" in text and "## Fig. 8" in text


def test_train_all_dry_run_lists_the_whole_grid():
    done = subprocess.run(["bash", str(HERE / "train_all.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "GPUS": ""}, cwd=HERE)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "# 125 runs"  # Table 1 80, Table 2 20, Sec. 4 study 3, router utility 2, Fig. 7 14, Fig. 8 6
    for needle in ("--method sparse --init runs/table1/cifar10_resnet18_dense/checkpoint.pt", "--eval-aa",
                   "--iou-with", "--train-params routers", "--n-experts 10 --ratio 0.8", "--dataset imagenet"):
        assert any(needle in line for line in lines), needle
    order = [line.split("--out ")[1].split()[0] for line in lines[:-1]]
    assert order.index("runs/table1/cifar10_wrn28_10_dense") < order.index("runs/table1/cifar10_wrn28_10_sparse")


# ----------------------------------------------------------------------------- CLI end to end
def cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, str(HERE / "advmoe.py"), *args], capture_output=True, text=True, cwd=cwd)


def test_cli_trains_evaluates_reports(tmp_path):
    run = tmp_path / "runs" / "a"
    args = ["--dataset", "synthetic", "--arch", "resnet18", "--method", "advmoe", "--epochs", "2", "--ratio", "0.25",
            "--synthetic-train", "32", "--synthetic-test", "16", "--batch-size", "32", "--test-steps", "2",
            "--quick-eval-n", "16", "--device", "cpu", "--out", str(run)]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/2" in done.stdout and "SA" in done.stdout
    result = json.loads((run / "result.json").read_text())
    for key in ("dataset", "arch", "method", "ratio", "n_experts", "router", "epochs", "seed", "sa", "ra", "gflops",
                "params", "routing", "train_seconds", "device", "torch"):
        assert key in result, key
    assert result["epochs"] == 2 and 0 <= result["ra"] <= 100 and result["gflops"] > 0
    assert not list(run.glob(".*"))  # no temporary files left behind
    evaluated = cli("--eval-only", str(run / "checkpoint.pt"), "--out", str(tmp_path / "runs" / "b"),
                    "--test-steps", "2", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "runs" / "b" / "result.json").read_text())
    assert (again["sa"], again["ra"], again["routing"]) == (result["sa"], result["ra"], result["routing"])  # seeded
    reported = cli("report", str(tmp_path / "runs"))
    assert reported.returncode == 0 and "| AdvMoE |" in reported.stdout and (tmp_path / "runs" / "report.md").exists()


@pytest.mark.parametrize("args,needle", [
    (["--arch", "resnet50"], "unknown --arch"),
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--method", "magic"], "unknown --method"),
    (["--ratio", "0"], "outside (0, 1]"),
    (["--ratio", "1.5"], "outside (0, 1]"),
    (["--n-experts", "0"], "at least 1"),
    (["--method", "advmoe", "--n-experts", "1"], "needs --n-experts >= 2"),
    (["--eps", "-0.5"], "negative"),
    (["--eval-attacks", "pgd,magic"], "unknown --eval-attacks"),
    (["--dataset", "cifar10", "--no-download", "--data-dir", "/nonexistent"], "could not be downloaded"),
    (["--dataset", "tinyimagenet", "--data-dir", "/nonexistent"], "ImageFolder"),
    (["--dataset", "synthetic", "--out", "/proc/advmoe_cannot_write"], "cannot write"),
    (["--eval-only", "/nonexistent/checkpoint.pt"], "does not exist"),
    (["--dataset", "synthetic", "--batch-size", "100000"], "larger than the training set"),
    (["--method", "sparse", "--ratio", "1"], "give --ratio below 1"),
    (["--method", "moe", "--train-params", "routers"], "use it with --init CKPT"),
    (["--method", "sdense", "--train-params", "routers", "--init", "x.pt"], "needs an MoE-CNN"),
    (["--train-params", "experts"], "unknown --train-params"),
    (["--dataset", "synthetic", "--method", "moe", "--iou-with", "/nonexistent/checkpoint.pt"], "does not exist"),
    (["--dataset", "synthetic", "--method", "moe", "--init", "/nonexistent/checkpoint.pt"], "does not exist"),
])
def test_bad_input_gives_one_line_error(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert A.main(args + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and err.startswith("advmoe: error:"), err


def test_bad_input_exit_status_from_the_shell(tmp_path):
    done = cli("--ratio", "2", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith("advmoe: error: --ratio 2.0 is outside (0, 1]")
    assert not list(tmp_path.iterdir())  # nothing written


def test_report_of_missing_folder_fails_cleanly(tmp_path):
    done = cli("report", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "does not exist" in done.stderr


# ------------------------------------------------------------------------------------- bench
def test_bench_runs_and_is_sane(tmp_path):
    out = tmp_path / "bench.json"
    result = A.bench(["--arch", "resnet18", "--device", "cpu", "--batch", "4", "--infer-batch", "4", "--repeats", "1",
                      "--out", str(out)], log=lambda _: None)
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "sdense", "moe", "advmoe"}
    assert all(r["train_img_s"] > 0 for r in rows.values())
    assert all(rows[m]["infer_img_s"] > 0 and rows[m]["latency_ms_b1"] > 0 for m in ("dense", "sdense", "moe"))
    assert rows["moe"]["gflops"] < 0.5 * rows["dense"]["gflops"]
    assert json.loads(out.read_text())["rows"] and out.with_suffix(".md").read_text().startswith("bench on")
    # operator calls: AdvMoE's iteration (two levels) makes more than AT(MoE)'s step, S-Dense's forward as many as Dense's
    assert rows["advmoe"]["ops_train_step"] > rows["moe"]["ops_train_step"] > 0
    assert rows["sdense"]["ops_infer_forward"] == rows["dense"]["ops_infer_forward"] > 0


# ------------------------------------------------------------------- adaptive evaluation (issue 4)
def test_soft_surrogate_keeps_the_hard_forward_and_changes_the_gradient():
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25)).eval()
    x = torch.rand(8, 3, 32, 32, requires_grad=True)
    hard = model(x)
    soft = model(x, dispatch="soft")
    torch.testing.assert_close(hard, soft)
    g_hard, = torch.autograd.grad(hard.sum(), x)
    g_soft, = torch.autograd.grad(model(x, dispatch="soft").sum(), x)
    assert not torch.allclose(g_hard, g_soft)


@pytest.mark.parametrize("router", ["layer", "global"])
def test_adaptive_attacks_and_ra_worst(router):
    torch.manual_seed(0)
    s = tiny(router=router, synthetic_test=24, test_steps=3, eval_batch_size=12)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    result = A.evaluate(model, data, s, attacks=("pgd", "router", "soft", "fixed"))
    fixed = ["fixed0", "fixed1"] if router == "global" else ["fixed"]
    assert set(result["attacks"]) == {"pgd3", "router", "soft", *fixed}
    assert result["ra"] == result["attacks"]["pgd3"]
    assert all(0 <= v <= result["sa"] + 1e-9 for v in [result["ra_worst"]])
    assert result["ra_worst"] <= min(result["attacks"].values())
    split = result["routing"]["split_4way"]
    n_ok = result["routing"]["split_n"]  # the split counts the inputs classified correctly when clean
    assert abs(sum(split.values()) - (100 if n_ok else 0)) < 0.05
    assert n_ok == round(result["sa"] * result["n"] / 100)
    # MoE robustness (1)+(2) of them: correct clean and under PGD, at most RA's count
    assert (split["neither"] + split["router_only"]) * n_ok / 100 <= result["ra"] * result["n"] / 100 + 0.05


def test_square_and_autoattack_need_torchattacks(tmp_path):
    if importlib.util.find_spec("torchattacks") is None:
        with pytest.raises(A.ConfigError, match="pip install torchattacks"):
            tiny(eval_attacks="pgd,square")
    else:
        s = tiny(eval_attacks="pgd,square", synthetic_test=8, test_steps=2, square_queries=20)
        model = calibrated(A.build_model(s, 10, 32))
        result = A.evaluate(model, A.load_data(s, torch.device("cpu")), s, attacks=("pgd", "square"))
        assert "square" in result["attacks"] and result["ra_worst"] <= result["attacks"]["square"]


# ------------------------------------------------------------------------------- reliability
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    s = tiny(method="sdense", epochs=3, lr=1e30, momentum=0.0, out=str(tmp_path))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch \d+, iteration \d+"):
        A.train(s, log=lambda _: None)
    assert not (tmp_path / "result.json").exists()


def test_sigterm_saves_a_resumable_run(tmp_path):
    args = [sys.executable, str(HERE / "advmoe.py"), "--dataset", "synthetic", "--ratio", "0.25", "--epochs", "100",
            "--synthetic-train", "32", "--batch-size", "16", "--quick-eval-n", "0", "--device", "cpu",
            "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    epoch = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and not (tmp_path / "result.json").exists()
    resumed = cli(*args[2:-4], "--epochs", str(epoch + 1), "--device", "cpu", "--test-steps", "1", "--resume",
                  "--out", str(tmp_path))
    assert resumed.returncode == 0 and f"resumed {tmp_path / 'checkpoint.pt'} after epoch {epoch}" in resumed.stdout


def test_two_process_training_with_gloo(tmp_path):
    port = 29500 + os.getpid() % 1000
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(HERE / "advmoe.py"), "--dataset", "synthetic", "--method", "advmoe", "--ratio", "0.25",
                           "--synthetic-train", "32", "--synthetic-test", "8", "--batch-size", "8", "--epochs", "1",
                           "--test-steps", "1", "--quick-eval-n", "0", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"] is True
    assert done.stdout.count("RA-worst") == 1  # rank 0 alone reports


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    text = (HERE / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})


# ------------------------------------------------------ numbers a reviewer would accept (issue 9)
class FakeAttack:
    """Stands in for a torchattacks attack: records how it was built and what it was given; returns x."""
    built: list = []

    def __init__(self, model, **kw):
        self.kw, self.sizes = kw, []
        FakeAttack.built.append(self)

    def __call__(self, x, y):
        self.sizes.append(len(x))
        return x


@pytest.mark.parametrize("n_classes", [10, 100])
def test_autoattack_is_built_with_the_reference_settings(n_classes, monkeypatch):
    fake = type("ta", (), {k: type(k, (FakeAttack,), {}) for k in ("APGD", "APGDT", "FAB", "Square")})
    monkeypatch.setattr(A, "import_torchattacks", lambda: fake)
    FakeAttack.built = []
    model = calibrated(A.MoECNN("resnet18", n_classes, 32, 0.25, 2)).eval()
    x, y = torch.rand(12, 3, 32, 32), torch.randint(n_classes, (12,))
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
    # each component attacks only the inputs still classified correctly
    with torch.no_grad():
        correct = int((model(x).argmax(1) == y).sum())
    assert [a.sizes for a in FakeAttack.built] == [[correct]] * 4 if correct else [[]] * 4
    if importlib.util.find_spec("torchattacks") is not None:  # the real classes take these arguments as meant
        monkeypatch.undo()
        real = dict(A.autoattack_components(model, 8 / 255, seed=0))
        assert real["apgd-ce"].steps == real["apgd-t"].steps == real["fab-t"].steps == 100
        assert real["apgd-t"].n_target_classes == real["fab-t"].n_target_classes == 9
        assert real["square"].n_queries == 5000 and real["fab-t"].multi_targeted


def test_evaluation_runs_in_float32_whatever_autocast_is_active():
    torch.manual_seed(0)
    s = tiny(synthetic_test=8, test_steps=2)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    dtypes = []
    model.register_forward_hook(lambda m, i, o: dtypes.append((o[0] if isinstance(o, tuple) else o).dtype))
    plain = A.evaluate(model, data, s, attacks=("pgd", "router"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training on CUDA runs
        under_bf16 = A.evaluate(model, data, s, attacks=("pgd", "router"))
    assert set(dtypes) == {torch.float32}
    assert plain == under_bf16


def test_each_attack_has_its_own_random_stream(tmp_path):
    torch.manual_seed(0)
    s = tiny(synthetic_test=16, test_steps=2, eval_batch_size=8)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    alone = A.evaluate(model, data, s, attacks=("pgd",))
    torch.manual_seed(123)  # the global stream plays no part
    more = A.evaluate(model, data, s, attacks=("router", "pgd", "soft"))
    assert alone["attacks"]["pgd2"] == more["attacks"]["pgd2"] and alone["routing"] == more["routing"]
    # a training run does not change with the per-epoch check
    weights = []
    for quick in (0, 16):
        A.train(tiny(epochs=2, synthetic_train=32, test_steps=1, quick_eval_n=quick, out=str(tmp_path / str(quick))),
                log=lambda _: None)
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
    s = tiny(synthetic_test=16, test_steps=2, aa_n=6, eval_batch_size=4)
    data = A.load_data(s, torch.device("cpu"))
    model = calibrated(A.build_model(s, 10, 32))
    full = A.evaluate(model, data, s, attacks=("pgd", "autoattack"))
    first = A.evaluate(model, data, s, limit=6, attacks=("pgd",))
    assert full["autoattack"]["images"] == 6 and full["attack_n"]["pgd2"] == 16
    assert full["autoattack"]["ra_pgd_same_images"] == first["ra"]
    assert full["ra_worst_n"] == 6 and full["ra_worst_without_aa"] == full["ra"]  # PGD alone, over all 16 images


def test_eval_only_uses_the_checkpoints_settings_unless_given(tmp_path):
    A.train(tiny(out=str(tmp_path / "run"), synthetic_train=32, eps=4 / 255, test_steps=2), log=lambda _: None)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    own = A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e1"), "--device", "cpu"])
    mine = A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e2"), "--device", "cpu", "--test-steps", "3"])
    assert own == mine == 0
    r1, r2 = (json.loads((tmp_path / e / "result.json").read_text()) for e in ("e1", "e2"))
    assert r1["eps"] == 4 / 255 and r1["attack"].startswith("PGD-2 ") and r1["settings"]["synthetic_train"] == 32
    assert r2["eps"] == 4 / 255 and r2["attack"].startswith("PGD-3 ")
    assert A.main(["--eval-only", ckpt, "--out", str(tmp_path / "e3"), "--device", "cpu", "--arch", "vgg16"]) == 2


def test_soft_attack_backward_is_the_probability_weighted_mixture_only():
    torch.manual_seed(0)
    layer = A.MoEConv(4, 3, 3, 1, 2, bn=False, router=True)
    x = torch.rand(5, 4, 8, 8, requires_grad=True)
    logits = torch.randn(5, 2, requires_grad=True)
    w = torch.randn(5, 3, 8, 8)
    gate = A.top1_gate(logits)
    soft = layer.masked_forward(x, gate, soft=True)
    torch.testing.assert_close(soft, layer.masked_forward(x, gate))  # the hard value
    g_soft = torch.autograd.grad((soft * w).sum(), (x, logits))
    p = logits.softmax(-1)
    mix = sum(p[:, e, None, None, None] * F.conv2d(x, layer.weight[layer.expert(e)], padding=1) for e in range(2))
    g_mix = torch.autograd.grad((mix * w).sum(), (x, logits))
    for a, b in zip(g_soft, g_mix):
        torch.testing.assert_close(a, b)


def test_pathway_diversity_and_the_random_pathway_iou():
    choices = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1]])
    d = A.pathway_diversity(choices, 2)
    assert d["distinct"] == 3 and abs(d["entropy_bits"] - 1.5) < 1e-9 and d["max_entropy_bits"] == 2.0
    assert A.pathway_diversity(torch.zeros(8, 5, dtype=torch.long), 2)["entropy_bits"] == 0


def backbone_moves(**overrides) -> dict:
    """How far one train_step of tiny(**overrides), from seed 0 on seeded random batches, moves every parameter
    that is not a router's."""
    s, model, opts = model_and_optimizers(**overrides)
    A.set_lr(opts, 0.0)
    before = snapshot(model)
    batches = [(torch.rand(16, 3, 32, 32), torch.randint(10, (16,))) for _ in range(A.STEPS[s.method][1])]
    A.train_step(model, opts, batches, s)
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if "router" not in n}


def test_the_balance_term_stays_out_of_the_upper_level():
    moved = [backbone_moves(balance=balance, router_lr=0.0) for balance in (0.0, 1.0)]  # routers fixed: same routing
    assert all(torch.equal(moved[0][n], moved[1][n]) for n in moved[0])


def test_routing_regularizers_stay_out_of_a_frozen_router():
    """--train-params backbone (Sec. 4, stage 3): the routers are frozen, so the routing regularizers, which
    exist to shape the routers, must not train the backbone either."""
    moved = [backbone_moves(method="moe", train_params="backbone", init="x.pt", balance=weight,
                            router_supervision=weight) for weight in (0.0, 1.0)]
    assert all(torch.equal(moved[0][n], moved[1][n]) for n in moved[0])


def test_each_expert_is_initialized_like_a_standalone_conv():
    torch.manual_seed(0)
    for n in (2, 10):
        layer = A.MoEConv(64, 32, 3, 1, n, bn=True, router=True)
        single = A.MoEConv(64, 32, 3, 1, 1, bn=True, router=False)
        for e in range(n):
            assert abs(layer.weight[layer.expert(e)].std() / single.weight.std() - 1) < 0.05


def test_the_router_level_is_guarded_against_non_finite_losses(monkeypatch, tmp_path):
    level = A.level

    def nan_router_level(model, opt, x, y, s, regularize=True):
        stats = level(model, opt, x, y, s, regularize)
        return {**stats, "loss": torch.tensor(float("nan"))} if regularize else stats

    monkeypatch.setattr(A, "level", nan_router_level)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 1, iteration 1"):
        A.train(tiny(synthetic_train=32, out=str(tmp_path)), log=lambda _: None)


def test_history_logs_the_learning_rate_of_each_level(tmp_path):
    result = A.train(tiny(epochs=2, synthetic_train=64, test_steps=1, lr=0.1, router_lr=0.5, out=str(tmp_path)),
                     log=lambda _: None)
    row = result["history"][0]  # the last of epoch 1's 2 iterations ran at t/T = 1/4 of the cosine schedule
    backbone = 0.1 * 0.5 * (1 + math.cos(math.pi / 4))
    assert row["lr_backbone"] == pytest.approx(backbone, abs=1e-6) and row["lr_routers"] == pytest.approx(backbone / 2, abs=1e-6)


# --------------------------------------------------------------- tests that must be able to fail
def test_advmoe_levels_get_their_own_batches(monkeypatch):
    seen = []
    monkeypatch.setattr(A, "level", lambda model, opt, x, y, s, regularize=True: seen.append((opt, x)) or
                        {"loss": torch.tensor(1.0)})
    s, model, opts = model_and_optimizers()
    b_phi, b_psi = [(torch.rand(4, 3, 32, 32), torch.randint(10, (4,))) for _ in range(2)]
    A.train_step(model, opts, [b_phi, b_psi], s)
    assert [o for o, _ in seen] == [opts["phi"], opts["psi"]]  # routers first (line 4), then backbone (line 5)
    assert seen[0][1] is b_phi[0] and seen[1][1] is b_psi[0]
    # and the epoch loop draws the two batches from different shuffles
    pairs = []
    monkeypatch.setattr(A, "train_step", lambda net, opts, batches, s: pairs.append(batches) or
                        {"loss": torch.tensor(1.0)})
    data = A.load_data(tiny(synthetic_train=64), torch.device("cpu"))
    A.train_epoch(model, opts, data, tiny(batch_size=16), 0, torch.device("cpu"), [], lambda _: None)
    assert len(pairs) == 4 and all(not torch.equal(a[1], b[1]) for a, b in pairs)


def test_trades_attack_maximizes_kl_from_the_eval_mode_clean_output(monkeypatch):
    torch.manual_seed(0)
    model = calibrated(moe("resnet18", ratio=0.25)).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(10, (8,))
    captured = {}

    def spy(model_, x_, loss_fn, eps, step, steps, start, generator=None):
        captured.update(loss_fn=loss_fn, start=start, training=model_.training)
        return x_

    monkeypatch.setattr(A, "pgd", spy)
    A.training_attack(model, x, y, tiny().objective)
    assert captured["start"] == "normal" and captured["training"]  # pgd itself switches to eval mode
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
    assert summary["flip_rate_any_layer"] == 4 / 6  # inputs 1, 2, 4, 5 of all six


def test_routing_is_logged_every_epoch_and_recorded_before_training(tmp_path):
    lines = []
    result = A.train(tiny(epochs=2, out=str(tmp_path)), log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
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
    assert any("epoch 1/2" in line and "collapsed" in line for line in lines)


def test_the_training_step_is_the_authors_five_over_255_scaled_with_eps():
    assert tiny().train_step_size == pytest.approx(5 / 255)                      # eps 8/255, K = 2
    assert tiny(dataset="tinyimagenet").train_step_size == pytest.approx(1.25 / 255)  # eps 2/255
    assert tiny(train_step_size=0.01).train_step_size == 0.01


def test_pgdat_trains(tmp_path):
    s = tiny(method="sdense", loss="pgdat", epochs=6, synthetic_train=256, synthetic_test=64, lr=0.05, train_steps=1,
             out=str(tmp_path))
    result = A.train(s, log=lambda _: None)
    assert result["loss"] == "pgdat" and result["sa"] > 30 and result["ra"] > 15  # chance is 10%


# ------------------------------------------------------------- the run folder as a record (issue 10)
B = ["--dataset", "synthetic", "--epochs", "1", "--synthetic-train", "16", "--synthetic-test", "4", "--batch-size", "8",
     "--test-steps", "1", "--quick-eval-n", "0", "--ratio", "0.25", "--device", "cpu"]


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert err.startswith("advmoe: error:") and len(err.strip().splitlines()) == 1 and needle in err, err
    return err


def test_a_finished_run_is_never_replaced_silently(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert A.main(B + ["--out", out]) == 0
    first = (tmp_path / "r" / "result.json").read_text()
    assert A.main(B + ["--seed", "3", "--out", out]) == 2
    one_line_error(capsys, "already holds a run (result.json, checkpoint.pt, log.jsonl)")
    assert (tmp_path / "r" / "result.json").read_text() == first
    assert A.main(B + ["--seed", "3", "--out", out, "--overwrite"]) == 0
    rows = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads((tmp_path / "r" / "result.json").read_text())["seed"] == 3
    # continuing a finished run keeps its result under its own name
    assert A.main(B + ["--seed", "3", "--out", out, "--epochs", "2", "--resume"]) == 0
    assert json.loads((tmp_path / "r" / "result_epoch1.json").read_text())["epochs"] == 1
    assert json.loads((tmp_path / "r" / "result.json").read_text())["epochs"] == 2


def test_one_writer_per_folder(tmp_path, capsys):
    import fcntl
    out = tmp_path / "r"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242 on somewhere, started today\n")
        held.flush()
        assert A.main(B + ["--out", str(out)]) == 2
        one_line_error(capsys, "is in use by another run (pid 4242 on somewhere")
    assert not (out / "result.json").exists()
    # a lock file left by a run that died (no process holds it) is stale: the next run takes the folder
    (out / ".lock").write_text("pid 1 on somewhere\n")
    assert A.main(B + ["--out", str(out)]) == 0 and not (out / ".lock").exists()


def test_resume_keeps_the_recipe(tmp_path, capsys):
    out = str(tmp_path / "q")
    assert A.main(B + ["--out", out]) == 0
    assert A.main(B + ["--epochs", "2", "--resume", "--seed", "7", "--loss", "pgdat", "--lr", "0.5", "--batch-size",
                       "4", "--out", out]) == 2
    err = one_line_error(capsys, "--resume would change the recipe")
    for change in ("--seed 1 -> 7", "--loss trades -> pgdat", "--lr 0.1 -> 0.5", "--batch-size 8 -> 4"):
        assert change in err
    assert A.main(B + ["--epochs", "2", "--resume", "--test-steps", "2", "--out", out]) == 0  # evaluation may change
    assert A.main(B + ["--resume", "--out", str(tmp_path / "new")]) == 0
    assert "no checkpoint in" in capsys.readouterr().out


def test_eval_only_into_a_training_folder_keeps_its_result(tmp_path):
    out = tmp_path / "r"
    assert A.main(B + ["--out", str(out)]) == 0
    trained_result = (out / "result.json").read_text()
    assert A.main(["--eval-only", str(out / "checkpoint.pt"), "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "result.json").read_text() == trained_result and (out / "eval" / "result.json").exists()
    assert A.main(["--eval-only", str(out / "checkpoint.pt"), "--out", str(out), "--device", "cpu"]) == 2  # again


def test_train_all_stops_its_jobs_on_sigterm(tmp_path):
    env = {**os.environ, "DATASETS": "synthetic", "ARCHS": "resnet18", "EPOCHS": "500", "GPUS": "", "OUT": str(tmp_path),
           "EXTRA": "--synthetic-train 16 --batch-size 8 --quick-eval-n 0 --ratio 0.25"}
    proc = subprocess.Popen(["bash", str(HERE / "train_all.sh")], cwd=HERE, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list(tmp_path.rglob("checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopping the running jobs" in err
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"--out {tmp_path}"], capture_output=True, text=True).stdout.split()
    assert not left  # no orphaned job goes on writing
    ckpt = next(tmp_path.rglob("checkpoint.pt"))
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1 and not (ckpt.parent / ".lock").exists()


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
    elif kind == "other_arch_sparse":
        ckpt = torch.load(good, weights_only=True)
        ckpt["extra"] = {"keep": {"conv2": [0]}, "sizes": {"conv2": 2}}
        ckpt["identity"]["arch"] = "vgg16"
        torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert A.main(B + ["--out", str(out), "--method", "moe"]) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("kind,needle", [
    ("truncated", "cannot be read"), ("garbage", "cannot be read"), ("empty", "cannot be read"),
    ("directory", "is a folder"), ("state_dict", "is not a checkpoint of advmoe.py"),
    ("unknown_keys", "does not fit the model")])
@pytest.mark.parametrize("flag", ["--eval-only", "--resume", "--init", "--iou-with"])
def test_bad_checkpoints_give_one_line_errors(kind, needle, flag, good_checkpoint, tmp_path, capsys):
    path = bad_checkpoint(kind, tmp_path / "bad", good_checkpoint)
    if flag == "--resume":
        args = B + ["--method", "moe", "--resume", "--out", str(tmp_path / "bad")]
    elif flag == "--eval-only":
        args = ["--eval-only", str(path), "--device", "cpu", "--out", str(tmp_path / "e")]
    else:
        args = B + ["--method", "moe", flag, str(path), "--out", str(tmp_path / "e")]
    if flag == "--iou-with" and kind == "unknown_keys":  # --iou-with reads the mask, not the weights
        needle = "is not an AT(Sparse) checkpoint"
    assert A.main(args) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "e").exists()  # nothing written, no empty folder


def test_iou_with_a_sparse_run_of_another_backbone(good_checkpoint, tmp_path, capsys):
    path = bad_checkpoint("other_arch_sparse", tmp_path / "bad", good_checkpoint)
    assert A.main(B + ["--method", "moe", "--ratio", "0.5", "--iou-with", str(path), "--out", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "is an AT(Sparse) run of another backbone (vgg16")


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
    for split in ("train", "test"):
        arrays = {"x": x[split], "y": y[split]}
        if case == "missing_array" and split == "train":
            arrays = {"images": x[split], "y": y[split]}
        if not (case == "missing_file" and split == "test"):
            np.savez(root / f"cifar10_{split}.npz", **arrays)


@pytest.mark.parametrize("case,needle", [
    ("float_images", "x is float64, not uint8"), ("nchw", "not (N, H, W, 3)"), ("float_labels", "not N integers"),
    ("label_range", "outside [0, 10)"), ("lengths", "40 images but y 39 labels"), ("sizes", "same image size"),
    ("empty", "is empty"), ("missing_array", "has no array 'x'"), ("missing_file", "cifar10_test.npz is missing")])
def test_bad_npz_data_gives_one_line_errors(case, needle, tmp_path, capsys):
    npz_case(case, tmp_path)
    assert A.main(B[2:] + ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = one_line_error(capsys, needle)
    assert "it must hold x: uint8 images (N, H, W, 3)" in err or case == "sizes"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,needle", [
    (["--lr", "-0.1"], "--lr -0.1 must be a finite number >= 0"), (["--momentum", "-1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--beta", "-6"], "--beta"), (["--eps", "nan"], "--eps nan"),
    (["--eps", "8"], "not a radius in pixel units"), (["--test-steps", "0"], "--test-steps 0 must be at least 1"),
    (["--eval-n", "-1"], "--eval-n -1 must be 0"), (["--quick-eval-n", "-5"], "--quick-eval-n"),
    (["--square-queries", "0"], "--square-queries 0"), (["--device", "foo"], "unknown --device 'foo'"),
    (["--device", "mps"], "runs on cpu or cuda"), (["--width", "0"], "--width 0.0 must be in (0, 64]"),
    (["--train-n", "100000"], "exceed the 16 training images"),
    (["--n-experts", "100000", "--ratio", "1", "--width", "4"], "more than the"),
])
def test_bad_flags_give_one_line_errors(args, needle, tmp_path, capsys):
    device = [] if "--device" in args else ["--device", "cpu"]
    assert A.main([a for a in B if a not in ("--device", "cpu")] + device + args + ["--out", str(tmp_path / "r")]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "r").exists()


def test_report_skips_a_corrupt_result(tmp_path, capsys):
    assert A.main(B + ["--out", str(tmp_path / "good")]) == 0
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "result.json").write_text('{"sa": 1')
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "result.json").write_text('{"sa": 1}')
    capsys.readouterr()
    assert A.main(["report", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| AdvMoE |" in out and err.count("advmoe: warning: skipping") == 2 and "cut" in err and "partial" in err


def test_out_of_disk_and_interrupted_evaluation(tmp_path, capsys, monkeypatch):
    save, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(f)
        if len(calls) > 1:
            Path(f).write_bytes(b"half")
            raise OSError(28, "No space left on device")
        save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    assert A.main(B + ["--epochs", "2", "--out", str(tmp_path / "r")]) == 1
    one_line_error(capsys, "No space left on device): the previous checkpoint.pt is intact")
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(torch, "save", save)

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "finish", ctrl_c)
    assert A.main(B + ["--out", str(tmp_path / "s")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("advmoe: interrupted") and len(err.strip().splitlines()) == 1


def test_help_permissions_and_no_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        A.main(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.1)" in text and "report" in text and "bench" in text
    assert A.main(["report", "--help"]) == 0 and "usage: python advmoe.py report DIR" in capsys.readouterr().out
    assert A.main(B + ["--out", str(tmp_path / "r")]) == 0
    modes = {f: (tmp_path / "r" / f).stat().st_mode & 0o777 for f in ("result.json", "checkpoint.pt", "log.jsonl")}
    assert len(set(modes.values())) == 1, modes
    assert A.main(B + ["--batch-size", "100000", "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------- laptop scale (issue 11)
def test_train_subset_and_validation_split_are_fixed_and_disjoint():
    s = tiny(synthetic_train=100, train_n=40, val_n=30)
    a, b = (A.load_data(A.Settings(**{**vars(s), "seed": seed}), torch.device("cpu")) for seed in (1, 2))
    assert len(a.y_train) == 40 and a.eval_len(split="val") == 30 and a.eval_len() == s.synthetic_test
    full = A.synthetic_data(100, s.synthetic_test)[0][0]                       # the 100 training images
    rows = {bytes(img.numpy().tobytes()): i for i, img in enumerate(full)}
    train_idx = {rows[bytes(img.numpy().tobytes())] for img in a.x_train}
    val_idx = {rows[bytes(img.numpy().tobytes())] for img in a.x_val}
    assert len(train_idx) == 40 and len(val_idx) == 30 and not train_idx & val_idx  # disjoint
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)      # the same for every --seed
    keep, held = A.split_train(100, 0, 30)
    assert len(keep) == 70 and not set(keep.tolist()) & set(held.tolist())          # --val-n alone: the rest trains
    x_val, _ = next(a.test_batches(64, split="val"))
    assert len(x_val) == 30 and x_val.dtype == torch.float32


def test_image_folder_subset_and_validation_split(tmp_path):
    """TinyImageNet / ImageNet trees: --train-n / --val-n split train/ into disjoint parts; the validation
    part is read with the test transform (no random crop or flip: the same tensor every time)."""
    from PIL import Image
    gen = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):
                pixels = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    data = A.FolderData(tmp_path, 8, torch.device("cpu"), train_n=6, val_n=4, workers=0)
    assert data.num_classes == 3 and data.train_len(2) == 3
    assert data.eval_len(split="val") == 4 and data.eval_len() == 15
    train_files = {data.train.dataset.samples[i][0] for i in data.train.indices}
    val_files = {data.val.dataset.samples[i][0] for i in data.val.indices}
    assert len(train_files) == 6 and len(val_files) == 4 and not train_files & val_files
    assert data.val.dataset.transform is not data.train.dataset.transform
    first, again = (next(data.test_batches(4, split="val"))[0] for _ in range(2))
    assert torch.equal(first, again)


def test_validation_results_and_data_are_recorded(tmp_path):
    result = A.train(tiny(synthetic_train=48, train_n=32, val_n=16, test_steps=1, quick_eval_n=8, epochs=2,
                          out=str(tmp_path)), log=lambda _: None)
    assert result["data"] == {"train_images": 32, "val_images": 16, "test_images": 16, "train_n": 32, "val_n": 16,
                              "split_seed": 0}
    assert result["val"]["n"] == 16 and {"sa", "ra", "ra_worst"} <= set(result["val"])
    assert result["history"][0]["quick_split"] == "val"


@pytest.mark.parametrize("arch", ["resnet18", "wrn28_10", "vgg16", "densenet"])
def test_width_scales_parameters_and_gflops(arch):
    x = torch.rand(2, 3, 32, 32)
    full = [A.MoECNN(arch, 10, 32, r, n) for r, n in ((1.0, 1), (0.5, 1), (0.5, 2))]
    half = [A.MoECNN(arch, 10, 32, r, n, width=0.5) for r, n in ((1.0, 1), (0.5, 1), (0.5, 2))]
    for f, h in zip(full, half):
        ratio = A.count_params(h)["total"] / A.count_params(f)["total"]
        assert 0.2 < ratio < 0.3, ratio  # channels x 1/2 in and out: about 1/4 of the weights
        assert 0.2 < A.gflops_per_input(h, x) / A.gflops_per_input(f, x) < 0.3
    # r keeps its meaning at any width: S-Dense and the MoE pathway cost r^2 of Dense, at width 1/2 too
    g_dense, g_sdense, g_moe = (A.gflops_per_input(m, x) for m in half)
    assert g_sdense < g_moe < 1.01 * g_sdense and 0.2 < g_sdense / g_dense < 0.3


def test_progress_lines_while_training(tmp_path):
    lines = []
    A.train(tiny(synthetic_train=64, batch_size=16, log_every=0, test_steps=1, out=str(tmp_path)), log=lines.append)
    progress = [l for l in lines if "images," in l and "img/s, ETA" in l]
    assert any(l.strip().startswith("epoch 1/1: 32/128 images") for l in progress), lines  # two streams of 64
    assert any(l.strip().startswith("evaluating on test:") for l in progress), lines


# -------------------------------------------------------------------- fast on a GPU by design (issue 12)
def test_training_forward_and_trades_loss_compile_without_graph_break():
    """The dispatch used on CUDA must compile as one graph, in training (forward and TRADES loss) and in
    inference: a graph break is where a host sync (.item(), .tolist()) or a data-dependent shape would stall a
    GPU. fullgraph=True fails on any."""
    torch.manual_seed(0)
    cuda = A.resolve_dispatch("auto", torch.device("cuda"))
    assert cuda == "masked" and A.resolve_dispatch("auto", torch.device("cpu")) == "sparse"
    model = A.MoECNN("resnet18", 10, 32, 0.25, 2).train()
    s = tiny(balance=0.1)
    x, x_adv, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.randint(10, (4,))

    def training_loss(x, x_adv, y, dispatch):
        logits, gates = model(x, return_routing=True, dispatch=dispatch)
        logits_adv, gates_adv = model(x_adv, return_routing=True, dispatch=dispatch)
        return A.trades_loss(logits, logits_adv, y, s.beta) + A.routing_regularizer(gates + gates_adv, y, s.balance, s.router_supervision)

    torch._dynamo.reset()
    loss = torch.compile(training_loss, fullgraph=True, backend="aot_eager")(x, x_adv, y, cuda)
    loss.backward()
    eager = training_loss(x, x_adv, y, cuda)
    torch.testing.assert_close(loss, eager)
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)
    model.eval()  # inference (evaluation, attacks): no host sync per layer, nor per forward
    with torch.no_grad():
        logits = torch.compile(model, fullgraph=True, backend="aot_eager")(x, dispatch=cuda)
        torch.testing.assert_close(logits, model(x, dispatch="sparse"))


# ------------------------------------------------------- review of the operations (issue 13's session)
def test_frozen_batchnorm_stays_frozen_through_the_training_attack():
    """--train-params: the frozen part's BatchNorms are in eval mode; the attacks inside a training step switch the
    model to eval mode and back, and must give every module its own mode back."""
    s, model, opts = model_and_optimizers(method="moe", train_params="routers", init="x.pt")
    model.train()
    A.freeze_batchnorm(model, "routers")  # the backbone frozen: its BatchNorms in eval mode
    frozen = {n for n, m in model.named_modules() if not m.training}
    A.train_step(model, opts, [(torch.rand(8, 3, 32, 32), torch.randint(10, (8,)))], s)
    assert frozen and frozen == {n for n, m in model.named_modules() if not m.training}


def test_every_process_draws_as_many_batches_as_the_others():
    """Under torchrun a process with one batch more would wait forever in its extra all-reduce."""
    train, test = A.synthetic_data(958, 4)
    counts = []
    for rank in range(3):
        data = A.TensorData(train, test, 10, torch.device("cpu"))
        data.shard = (rank, 3)
        counts.append(sum(1 for _ in data.train_batches(32, torch.Generator().manual_seed(0))))
    assert counts == [data.train_len(32)] * 3


def test_a_refused_run_leaves_the_holders_lock(tmp_path, capsys):
    import fcntl
    out = tmp_path / "r"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for _ in range(2):  # refused, and refused again: the holder's lock is still in place
            assert A.main(B + ["--out", str(out)]) == 2
            one_line_error(capsys, "is in use by another run")
    assert not (out / "result.json").exists()


def test_the_recorded_command_reproduces_the_run():
    for s in (A.Settings(dataset="synthetic", eps=0.02, train_steps=3, seed=5),
              A.Settings(dataset="cifar10", train_step_size=0.01, amp=False)):
        command = A.command_line(s)
        assert A.parse_settings(command.split()[2:]) == s, command
    assert A.command_line(A.Settings(dataset="synthetic", eps=0.02)) == "python advmoe.py --dataset synthetic --eps 0.02"
    assert "step-size" not in A.command_line(A.Settings(dataset="synthetic", eps=0.02, train_steps=3))


def test_an_attack_named_twice_runs_once():
    assert tiny(eval_attacks="pgd,router,router").attacks == ("pgd", "router")


def test_resume_cannot_shorten_a_run_nor_overwrite_it(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert A.main(B + ["--epochs", "2", "--out", out]) == 0
    assert A.main(B + ["--epochs", "1", "--resume", "--out", out]) == 2
    one_line_error(capsys, "--epochs 1 is below the 2 epochs")
    assert A.main(B + ["--epochs", "3", "--resume", "--overwrite", "--out", out]) == 2
    one_line_error(capsys, "--resume and --overwrite")
    assert json.loads((tmp_path / "r" / "result.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("argv,needle", [
    (B + ["--epochs", "abc"], "--epochs: invalid int value: 'abc'"),
    (B + ["--method", "sdense", "--train-params", "backbone", "--init", "x.pt"], "needs an MoE-CNN"),
    (["bench", "--repeats", "-1", "--skip-train", "--device", "cpu"], "--repeats -1"),
])
def test_more_bad_flags_give_one_line_errors(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (nothing may be written; if it were, it would land here)
    assert A.main(argv) == 2
    one_line_error(capsys, needle)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    def fails(obj, f):  # what torch.save raises when its zip writer hits a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", fails)
    assert A.main(B + ["--out", str(tmp_path / "r")]) == 1
    one_line_error(capsys, "cannot write")
