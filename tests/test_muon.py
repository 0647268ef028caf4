"""MuonSGD: orthogonalised steps for convolution filters, plain SGD for the rest."""

import pytest
import torch

from cnnkit.config import apply_overrides, load_recipe
from cnnkit.models import create_model
from cnnkit.muon import MuonSGD, orthogonalize
from cnnkit.training import make_optimizer


def test_orthogonalize_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(576, 64))
    g = u @ torch.diag(torch.logspace(0, -1, 64)) @ v.T  # singular values from 1 down to 0.1
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(orthogonalize(g, dtype=dtype).float())
        assert s.min() > 0.5 and s.max() < 1.5  # Newton-Schulz's quintic lands in about [0.5, 1.5]
    tall = orthogonalize(g.T)
    assert tall.shape == (576, 64) and torch.allclose(tall, orthogonalize(g).T, atol=1e-5)


def test_groups_without_orthogonal_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a = MuonSGD(a.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(4):
        x = torch.randn(8, 5)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_muon_step_rescales_the_filters_and_moves_them_by_an_orthogonal_update():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, bias=False)
    opt = MuonSGD([{"params": [conv.weight], "orthogonal": True}], lr=0.1, momentum=0.6)
    before = conv.weight.detach().clone()
    conv(torch.randn(2, 4, 6, 6)).sum().backward()
    grad = conv.weight.grad.clone()
    opt.step()
    nesterov = grad + 0.6 * grad  # the first step: buffer = gradient
    expected = before * (8 ** 0.5 / before.norm()) - 0.1 * orthogonalize(nesterov.reshape(8, -1)).view_as(before)
    assert torch.allclose(conv.weight, expected, atol=1e-6)


def test_muon_recipe_puts_trainable_filters_under_muon_and_the_rest_under_sgd():
    cfg = apply_overrides(load_recipe("cifar10-fast"), {"optimizer": "muon", "muon_lr": 0.2, "muon_momentum": 0.5,
                                                        "precision": "bf16"})
    model = create_model("fastnet", 10, 3, 32, widths=[8, 16, 32])
    opt = make_optimizer(cfg, model)
    assert isinstance(opt, MuonSGD) and opt.defaults["ns_bf16"]  # Newton-Schulz in the run's precision
    assert not make_optimizer(apply_overrides(cfg, {"precision": "fp32"}), model).defaults["ns_bf16"]
    ortho = [g for g in opt.param_groups if g["orthogonal"]]
    assert len(ortho) == 1 and ortho[0]["lr"] == 0.2 and ortho[0]["momentum"] == 0.5 and ortho[0]["weight_decay"] == 0
    filters = {id(p) for p in model.parameters() if p.ndim == 4 and p.requires_grad}
    assert {id(p) for p in ortho[0]["params"]} == filters and id(model.stem.weight) not in filters  # whitening is fixed
    head = next(g for g in opt.param_groups if any(p is model.head.weight for p in g["params"]))
    assert not head["orthogonal"] and head["lr"] == cfg.lr and head["weight_decay"] == cfg.weight_decay
    biases = [g for g in opt.param_groups if g["lr"] == cfg.lr * cfg.bias_lr_scale]
    assert biases and all(p.ndim == 1 for g in biases for p in g["params"])


@pytest.mark.parametrize("overrides", [{"muon_lr": 0.0}, {"muon_momentum": 1.0}])
def test_bad_muon_settings_are_clear_errors(overrides):
    from cnnkit.errors import ConfigError

    with pytest.raises(ConfigError, match="muon_"):
        apply_overrides(load_recipe("cifar10-fast"), {"optimizer": "muon", **overrides})
