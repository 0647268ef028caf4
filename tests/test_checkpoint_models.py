import pytest
import torch

from cnnkit.checkpoint import load_checkpoint, save_checkpoint
from cnnkit.errors import ConfigError, RunError
from cnnkit.models import create_model


@pytest.mark.parametrize("name,channels,size", [("seed-cnn", 1, 28), ("resnet10t", 3, 32)])
def test_checkpoint_round_trip_gives_same_logits(tmp_path, name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, 10, channels, size).eval()
    x = torch.randn(4, channels, size, size)
    optimizer = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "ck", model, {"model": name}, optimizer)
    ckpt = load_checkpoint(tmp_path / "ck")
    state, meta, optim_state = ckpt.model, ckpt.meta, ckpt.optimizer
    fresh = create_model(name, 10, channels, size).eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), model(x))
    assert meta["model"] == name
    new_opt = torch.optim.Adam(fresh.parameters())
    new_opt.load_state_dict(optim_state)
    assert new_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_seed_cnn_is_the_course_network():
    model = create_model("seed-cnn", 10, 1, 28)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (0, 0)), (32, 64, (3, 3), (0, 0)), (64, 64, (3, 3), (0, 0))]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(576, 64), (64, 10)]
    assert sum(p.numel() for p in model.parameters()) == 93322  # Keras model.summary() of the course


def test_corrupted_or_truncated_checkpoint_is_refused(tmp_path):
    model = create_model("seed-cnn", 10, 1, 28)
    save_checkpoint(tmp_path / "ck", model, {})
    good = (tmp_path / "ck.safetensors").read_bytes()
    flipped = bytearray(good)
    flipped[-5] ^= 0xFF
    (tmp_path / "ck.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(RunError, match="checksum"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(RunError, match="truncated"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(RunError, match="missing"):
        load_checkpoint(tmp_path / "ck")


def test_unknown_model_suggests_names():
    with pytest.raises(ConfigError, match="Did you mean.*resnet18"):
        create_model("resnet-18", 10, 3, 32)
