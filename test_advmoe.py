"""Invariants of advmoe.py. CPU only, offline (synthetic data), a few minutes on 2 cores:
    python -m pytest -q test_advmoe.py
"""
import copy
import importlib.util
import json
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
        loss, reg, _ = A.robust_loss(model, x, y, s)
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
    x_tr = A.training_attack(model, x, y, s)
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
    assert A.routing_regularizer([uniform], y, s) < A.routing_regularizer([collapsed], y, s)
    assert abs(A.routing_regularizer([collapsed], y, s).item() - 2 * 0.9933) < 1e-3  # N * 1 * P_0


# ------------------------------------------------------------------------------------ training
def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_each_advmoe_level_changes_only_its_own_parameters():
    torch.manual_seed(0)
    s = tiny()
    model = A.build_model(s, 10, 32)
    opts = A.make_optimizers(model, s, torch.device("cpu"))
    x, y = torch.rand(16, 3, 32, 32), torch.randint(10, (16,))
    for name, is_router in (("phi", True), ("psi", False)):
        before = snapshot(model)
        A.level(model, opts[name], x, y, s)
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        own = {n for n, _ in model.named_parameters() if ("router" in n) == is_router}
        assert moved and moved <= own, moved - own   # something moved, and only this level's parameters
        assert len(moved) > 0.9 * len(own)           # and nearly all of them (a few may get no gradient)


def test_advmoe_step_uses_two_batches_and_reports_both_levels():
    torch.manual_seed(0)
    s = tiny()
    model = A.build_model(s, 10, 32)
    opts = A.make_optimizers(model, s, torch.device("cpu"))
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
    A.level(scores, opt, torch.rand(16, 3, 32, 32), torch.randint(10, (16,)), s)
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
    assert abs(sum(split.values()) - 100) < 0.05
    assert abs(split["neither"] + split["router_only"] - result["ra"]) < 0.05  # MoE robustness = RA


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
