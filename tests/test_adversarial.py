"""PSNR attacks (attacks.adversarial): bounds, 8-bit replay through ONNX Runtime, twin parity, robust training.

Small on purpose (the whole file runs in well under a minute on one CPU thread): 2 held-out photos cropped
to 64x64, few attack steps, a tiny codec for the training recipes.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attacks.adversarial.models import eval_images, resolve
from attacks.adversarial.pgd import (AttackSpec, OnnxModel, attack, is_8bit, quantize8, replay_metrics,
                                     round_within_linf, round_within_mse)
from attacks.adversarial.twin import ParityError, TwinError, check_parity, load_twin, twin_of_module
from attacks.suite import BUNDLED

torch.set_num_threads(1)
IMAGES = ["astronaut", "coffee"]


@pytest.fixture(scope="module")
def sr2():
    target = resolve("sr2")
    names, x8, y = eval_images("sr2", 64, IMAGES)
    return target, x8, y


@pytest.fixture(scope="module")
def hardened_sr2(tmp_path_factory):
    from hardener.api import HardenConfig, harden
    from hardener.asvp import AsvpParams

    out = tmp_path_factory.mktemp("hard") / "sr2.hardened.onnx"
    harden(BUNDLED["sr2"], out, HardenConfig(layers=["body.*.conv2"], params=AsvpParams(rank=4, gain=1.3),
                                             validate=False))
    return out


@pytest.fixture(scope="module")
def photos():
    from attacks.data import load_photos

    return load_photos("train")[:3]


def test_pgd_lowers_psnr_stays_in_linf_ball_and_replays_8bit(sr2):
    target, x8, y = sr2
    assert is_8bit(x8)
    for eps in (2, 8):
        spec = AttackSpec("pgd", eps / 255, steps=5, seed=0)
        adv = attack(target.twin, x8, y, spec, crop=target.crop)
        assert is_8bit(adv) and adv.dtype == np.float32
        assert np.abs(adv.astype(np.float64) - x8).max() * 255 <= eps + 1e-4
        assert adv.min() >= 0 and adv.max() <= 1
        m = replay_metrics(target.onnx, x8, adv, y, target.crop)  # ONNX Runtime on the deployed file
        for row in m["images"]:
            assert row["psnr_adv"] < row["psnr_clean"] - 0.2, row
            assert row["linf_255"] <= eps + 1e-4
        # the attack beats random noise of the same size (same L_inf, random signs)
        rng = np.random.default_rng(0)
        noise = quantize8(x8 + rng.choice([-1, 1], size=x8.shape) * eps / 255)
        assert replay_metrics(target.onnx, x8, noise, y, target.crop)["mean_psnr_adv"] > m["mean_psnr_adv"] + 0.1


def test_mse_attack_respects_budget_and_lowers_psnr(sr2):
    target, x8, y = sr2
    budget = 1e-3
    adv = attack(target.twin, x8, y, AttackSpec("mse", budget, steps=5, seed=1), crop=target.crop)
    assert is_8bit(adv)
    m = replay_metrics(target.onnx, x8, adv, y, target.crop)
    for row in m["images"]:
        assert row["mse_in"] <= budget
        assert row["mse_in"] > budget / 4  # it used its budget
        assert row["psnr_adv"] < row["psnr_clean"] - 0.5


def test_rounding_keeps_the_bound():
    rng = np.random.default_rng(0)
    x = quantize8(rng.random((2, 3, 8, 8)))
    eps = 3 / 255
    adv = np.clip(x + rng.uniform(-eps, eps, x.shape), 0, 1)
    q = round_within_linf(adv, x, eps)
    assert is_8bit(q) and np.abs(q.astype(np.float64) - x).max() <= eps + 1e-7
    big = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)  # MSE about 2.5e-3, rounded down into 1e-3
    q = round_within_mse(big, x, 1e-3)
    assert is_8bit(q)
    assert all(np.mean((q[i].astype(np.float64) - x[i]) ** 2) <= 1e-3 for i in range(2))
    assert not is_8bit(x + 0.3 / 255)
    with pytest.raises(ValueError, match="8-bit"):
        attack(lambda v: v, x + 0.3 / 255, x, AttackSpec("pgd", eps))


def test_twin_parity_original_and_hardened(sr2, hardened_sr2):
    target, x8, _ = sr2
    assert not target.twin.hardened and target.twin.parity_max_abs < 1e-5
    twin = load_twin(hardened_sr2)
    assert twin.hardened and twin.asvp_layers == [f"body.{i}.conv2" for i in range(4)]
    assert twin.asvp.rank == 4 and twin.asvp.gain == 1.3
    assert twin.parity_max_abs < 1e-4
    # parity on the eval crops too, and the hooks really perturb: hardened != original by far more
    got = check_parity(twin, x8, "eval crops")
    assert got < 1e-4
    with torch.no_grad():
        gap = (twin(torch.from_numpy(x8)) - target.twin(torch.from_numpy(x8))).abs().max().item()
    assert gap > 100 * got
    # a wrong twin is refused with the measured difference
    with torch.no_grad():
        twin.module.tail.bias += 1e-3
    with pytest.raises(ParityError, match="differs from ONNX Runtime by"):
        check_parity(twin)


def test_exact_svd_twin_differs_from_the_deployed_iteration(hardened_sr2):
    # On this photo crop one layer's s5/s4 is close to 1: the deployed subspace iteration has not
    # converged there, so the exact-SVD twin is refused while the replica passes.
    with pytest.raises(ParityError):
        load_twin(hardened_sr2, how="svd")


def test_hardened_attack_replays_through_the_hardened_file(hardened_sr2, sr2):
    _, x8, y = sr2
    target = resolve(str(hardened_sr2))
    assert target.task == "sr2" and "hardened from the bundled sr2" in target.origin
    adv = attack(target.twin, x8, y, AttackSpec("pgd", 4 / 255, steps=3), crop=2)
    m = replay_metrics(target.onnx, x8, adv, y, 2)
    assert m["mean_psnr_adv"] < m["mean_psnr_clean"] - 0.3


def test_no_manifest_is_refused(tmp_path):
    from hardener.api import HardenConfig, harden
    from hardener.asvp import AsvpParams

    out = tmp_path / "anon.hardened.onnx"
    harden(BUNDLED["sr2"], out, HardenConfig(layers=["body.3.conv2"], params=AsvpParams(gain=1.3),
                                             validate=False, manifest=False))
    with pytest.raises(TwinError, match="no hardening manifest"):
        load_twin(out)


@pytest.fixture(scope="module")
def tiny_codec(photos):
    """A tiny codec trained for a few steps (an untrained one outputs a constant: nothing to attack)."""
    from attacks.compression import ScaleHyperprior
    from attacks.compression.train import train_codec

    torch.manual_seed(0)
    model = ScaleHyperprior(N=8, M=8)
    train_codec(model, 0.05, 50, 0, batch=2, photos=photos, lr=3e-3)
    return model.eval()


def test_codec_twin_parity(tmp_path, tiny_codec):
    from attacks.compression.export import export_end_to_end

    model = tiny_codec
    path = export_end_to_end(model, tmp_path / "tiny_codec.onnx")
    x = quantize8(np.random.default_rng(0).random((1, 3, 64, 64)).astype(np.float32))
    twin = twin_of_module(model, path, output_key="x_hat", output="x_hat", x=x, tol=1e-3)
    assert twin.parity_max_abs < 1e-3
    onnx_model = OnnxModel(path, output="x_hat")
    adv = attack(twin, x, x, AttackSpec("pgd", 8 / 255, steps=3))
    m = replay_metrics(onnx_model, x, adv, x, 0, rate_key="bpp")
    assert m["mean_psnr_adv"] < m["mean_psnr_clean"]
    assert "bpp_adv" in m["images"][0]


def test_cli(tmp_path):
    from click.testing import CliRunner

    from attacks.cli import main

    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["adversarial", "sr2", "--images", "astronaut", "--size", "64", "--steps", "2",
                                    "--eps", "4", "--seed", "0,1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "pgd eps=4/255" in res.output and "mse budget=0.001" in res.output
    report = json.loads(out.read_text())
    assert [s["seed"] for s in report["attacks"][0]["seeds"]] == [0, 1]
    assert report["attacks"][0]["summary"]["linf_255"]["max"] <= 4 + 1e-3
    for args, msg in ((["nope.onnx"], "no such file"), (["sr2", "--task", "denoise"], "whose task is sr2"),
                      (["sr2", "--eps", "x"], "--eps"), (["sr2", "--variant", "fgsm"], "--variant"),
                      (["sr2", "--images", "lena"], "unknown photo")):
        res = CliRunner().invoke(main, ["adversarial", *args])
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)


# ---------------------------------------------------------------- robust training (tiny codec, few steps)
def _tiny(seed=0):
    from attacks.compression import ScaleHyperprior

    torch.manual_seed(seed)
    return ScaleHyperprior(N=8, M=8)


def test_adversarial_half_batch(tiny_codec, photos):
    import copy

    from attacks.adversarial.robust import RobustConfig, adversarial_half

    model = copy.deepcopy(tiny_codec)
    crops = [p[1][:64, :64] for p in photos] + [photos[0][1][-64:, -64:]]
    x = torch.from_numpy(np.stack([c.transpose(2, 0, 1) for c in crops])).float()
    before = [p.detach().clone() for p in model.parameters()]
    mixed, n_adv, eps = adversarial_half(model, x, RobustConfig(eps=(4.0,), inner_steps=2),
                                         np.random.default_rng(0))
    assert n_adv == 2 and eps == pytest.approx(4 / 255)
    assert torch.equal(mixed[2:], x[2:])
    d = (mixed[:2] - x[:2]).abs()
    assert d.max() <= eps + 1e-6 and d.mean() > eps / 4
    with torch.no_grad():  # the adversarial half is worse for the model than the clean one
        err = lambda v: (model(v)["x_hat"] - x[:2]).pow(2).mean()  # noqa: E731
        assert err(mixed[:2]) > err(x[:2])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # attack left weights alone
    assert all(p.requires_grad for p in model.parameters())


def test_adversarial_finetune_steps(photos):
    from attacks.adversarial.robust import RobustConfig, adversarial_finetune

    model = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    log = adversarial_finetune(model, 0.01, RobustConfig(steps=2, batch=2, inner_steps=1, log_every=1), seed=0,
                               photos=photos)
    assert not model.training and len(log["log"]) == 2
    assert all(e["adv"] == 1 and e["linf_255"] <= 8 + 1e-3 for e in log["log"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_regulariser_lowers_the_input_gradient(photos):
    from attacks.adversarial.robust import RobustConfig, gradient_regularised_teacher, input_gradient_penalty

    x = torch.from_numpy(np.stack([p[1][:64, :64].transpose(2, 0, 1) for p in photos])).float()
    cfg = lambda: RobustConfig(steps=12, batch=2, lr=3e-3, log_every=12)  # noqa: E731
    plain, reg = _tiny(1), _tiny(1)
    gradient_regularised_teacher(plain, 0.01, beta=0.0, cfg=cfg(), seed=0, photos=photos)
    gradient_regularised_teacher(reg, 0.01, beta=1e3, cfg=cfg(), seed=0, photos=photos)
    for m in (plain, reg):
        m.train()
    torch.manual_seed(0)
    g_plain = input_gradient_penalty(plain, x, create_graph=False)[0].item()
    torch.manual_seed(0)
    g_reg = input_gradient_penalty(reg, x, create_graph=False)[0].item()
    assert g_reg < 0.7 * g_plain, (g_reg, g_plain)


def test_kd_student_moves_towards_the_teacher(photos):
    from attacks.adversarial.robust import RobustConfig, kd_student

    teacher = _tiny(2).eval()
    x = torch.from_numpy(np.stack([p[1][:64, :64].transpose(2, 0, 1) for p in photos])).float()
    cfg = lambda: RobustConfig(steps=10, batch=2, lr=3e-3, inner_steps=1, log_every=10)  # noqa: E731
    free, guided = _tiny(3), _tiny(3)
    kd_student(free, teacher, 0.01, alpha_y=0.0, alpha_x=0.0, cfg=cfg(), seed=0, photos=photos)
    log = kd_student(guided, teacher, 0.01, alpha_y=10.0, alpha_x=10.0, cfg=cfg(), seed=0, photos=photos)
    assert log["config"]["extra"] == {"alpha_y": 10.0, "alpha_x": 10.0}
    with torch.no_grad():
        t = teacher(x)["y"]
        dist = lambda m: (m(x)["y"] - t).pow(2).mean().item()  # noqa: E731
        assert dist(guided) < 0.8 * dist(free)
