import re

import pytest

from cnnkit.cli import main
from cnnkit.config import Config, apply_overrides, load_recipe, parse_override, recipe_names
from cnnkit.errors import ConfigError


def test_recipes_load_and_validate():
    assert {"seed-fmnist", "fmnist-baseline"} <= set(recipe_names())
    cfg = load_recipe("seed-fmnist")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.augment) == (
        "seed-cnn", "adam", 0.001, 64, 10, "seed")


def test_overrides_are_typed():
    assert parse_override("epochs", "3") == 3
    assert parse_override("lr", "1e-2") == 0.01
    assert parse_override("nesterov", "yes") is True
    assert parse_override("grad_clip", "none") is None
    assert parse_override("augment", "seed") == "seed"
    assert parse_override("augment", '[{"op": "hflip"}]') == [{"op": "hflip"}]
    cfg = apply_overrides(Config(), {"epochs": 3, "lr": 0.01})
    assert cfg.epochs == 3 and cfg.lr == 0.01
    with pytest.raises(ConfigError, match="expected int"):
        parse_override("epochs", "three")


def test_invalid_configs_say_what_is_wrong():
    with pytest.raises(ConfigError, match="did you mean epochs"):
        Config.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        Config.from_dict({"optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="batch_size should be int"):
        Config.from_dict({"batch_size": "64"})
    with pytest.raises(ConfigError, match="probe_screen counts standard deviations"):
        Config.from_dict({"probe_screen": -1.0})


@pytest.mark.parametrize("argv,message", [
    (["train", "--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["train", "--model", "no-such-net", "--epochs", "1"], "unknown model 'no-such-net'"),
    (["train", "--dataset", "mnist-4d"], "unknown dataset 'mnist-4d'"),
    (["train", "--epochs", "zero"], "--epochs: expected int"),
    (["evaluate", "/nonexistent/run"], "not a cnnkit run folder"),
])
def test_cli_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_recipes_and_datasets_commands(capsys, monkeypatch):
    import cnnkit.runtime as ev

    for native in (True, False):
        monkeypatch.setattr(ev, "cpu_has_native_bf16", lambda: native)
        assert main(["recipes"]) == 0
        out = capsys.readouterr().out
        assert "seed-fmnist" in out and "fmnist-quick (default)" in out
        assert ("This CPU has none: the fast recipes train in fp32" in out) is not native  # the times hold there
    assert main(["datasets"]) == 0
    assert "fashion-mnist" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "lr-find", "evaluate", "predict", "export", "serve", "report", "compare"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cnnkit" in out
    if command in ("train", "lr-find"):  # every recipe field, with its help from config.py
        assert "--time-budget" in out and "30%" in out


@pytest.mark.parametrize("recipe, launched", [("cifar10-probe", False), ("fmnist-baseline", True)])
def test_nproc_runs_a_linear_probe_in_one_process(recipe, launched, monkeypatch, capsys):
    from cnnkit import cli, training

    calls = []
    monkeypatch.setattr(cli, "launch_torchrun", lambda args: calls.append("torchrun") or 0)
    monkeypatch.setattr(training, "train", lambda cfg, **kwargs: calls.append(cfg.strategy) or
                        training.TrainResult(None, None, {}, {}))  # a worker's result: no closing table
    assert main(["train", "--recipe", recipe, "--nproc", "2"]) == 0
    assert calls == (["torchrun"] if launched else ["linear-probe"])
    assert ("--nproc 2 ignored: a linear probe fits its head in one process" in capsys.readouterr().err) != launched


def test_nproc_refuses_what_ddp_cannot_train_before_torchrun_starts(monkeypatch, capsys):
    from cnnkit import cli

    monkeypatch.setattr(cli, "launch_torchrun", lambda args: pytest.fail("torchrun started"))
    assert main(["train", "--recipe", "photos", "--strategy", "auto", "--nproc", "2"]) == 2
    assert "--nproc 2: --strategy auto trains its candidates one after another" in capsys.readouterr().err
    assert main(["train", "--recipe", "folder-transfer", "--nproc", "2"]) == 2  # a strategy DDP cannot train
    assert "--nproc 2: --strategy finetune changes which layers train" in capsys.readouterr().err


def test_nproc_gives_the_workers_the_recipe_chosen_for_a_folder(photos, monkeypatch, capsys):
    from cnnkit import cli

    launched = []
    monkeypatch.setattr(cli, "launch_torchrun", lambda args: launched.append(args.argv) or 0)
    assert main(["train", "--dataset", "folder", "--data-dir", str(photos), "--strategy", "frozen",
                 "--probe-candidates", "[]", "--nproc", "2"]) == 0
    assert launched[0][-2:] == ["--recipe", "photos"]  # chosen once here: the workers neither count nor say it again
    err = capsys.readouterr().err
    assert err.count("no --recipe for a folder of 66 images: using photos") == 1 and "--strategy frozen as asked" in err


def _train_without_training(monkeypatch) -> list:
    """`cnnkit train` up to the configuration it would train: each call's Config, nothing trained."""
    from cnnkit import training

    configs: list = []
    monkeypatch.setattr(training, "train", lambda cfg, **kwargs: configs.append(cfg) or training.TrainResult(None, None, {}, {}))
    return configs


def test_a_data_dir_without_dataset_trains_what_it_holds(photos, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from cnnkit.data import cifar10, fashion_mnist

    configs = _train_without_training(monkeypatch)
    # Before, a folder of photos trained Fashion-MNIST (the default dataset, found in the system's copy).
    assert main(["train", "--data-dir", str(photos)]) == 0
    assert (configs[-1].dataset, configs[-1].recipe) == ("folder", "photos")
    err = capsys.readouterr().err
    assert f"--data-dir {photos} holds 66 images in 3 class folders: --dataset folder" in err
    assert "no --recipe for a folder of 66 images: using photos" in err

    fmnist = tmp_path / "fm"
    fmnist.mkdir()
    for name in fashion_mnist.FILES:  # known by their names; the loader checks their contents
        (fmnist / name).write_bytes(b"")
    assert main(["train", "--data-dir", str(fmnist)]) == 0
    assert (configs[-1].dataset, configs[-1].recipe) == ("fashion-mnist", "fmnist-quick")

    tree = tmp_path / "c10"
    for name in cifar10.CLASSES:  # CIFAR-10's ten class folders get CIFAR-10's own recipe, not a photo probe
        (tree / "train" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tree / "train" / name / "0.png")
    assert main(["train", "--data-dir", str(tree)]) == 0
    assert (configs[-1].dataset, configs[-1].recipe) == ("cifar10", "cifar10-quick")

    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tree)]) == 0  # named: not guessed
    assert configs[-1].recipe == "cifar10-quick"
    assert main(["train", "--recipe", "fmnist-quick", "--data-dir", str(fmnist)]) == 0
    assert configs[-1].dataset == "fashion-mnist"

    empty = tmp_path / "nothing"
    (empty / "notes").mkdir(parents=True)
    (empty / "notes" / "a.txt").write_text("no images")
    assert main(["train", "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no images found" in err and "neither Fashion-MNIST's IDX files nor CIFAR-10's archive" in err
    assert main(["train", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    one = tmp_path / "one" / "cats"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    assert main(["train", "--data-dir", str(one.parent)]) == 2  # class folders, found wanting: no hint of other datasets
    err = capsys.readouterr().err
    assert "found only one class folder (cats)" in err and "Fashion-MNIST" not in err
    assert len(configs) == 5


def test_the_recipe_for_a_zip_of_photos_counts_its_images(photos, tmp_path, monkeypatch, capsys):
    import shutil

    configs = _train_without_training(monkeypatch)
    archive = shutil.make_archive(str(tmp_path / "photos"), "zip", photos)
    assert main(["train", "--data-dir", archive]) == 0
    assert (configs[-1].dataset, configs[-1].recipe) == ("folder", "photos")
    assert "no --recipe for a folder of 66 images" in capsys.readouterr().err  # it read 0 for an archive before
    from cnnkit import cli

    monkeypatch.setattr(cli, "PHOTO_PROBE_MAX", 50)  # more images than a probe suits: fine-tuning
    assert main(["train", "--dataset", "folder", "--data-dir", archive]) == 0
    assert configs[-1].recipe == "folder-transfer"


def test_nproc_gives_the_workers_the_dataset_guessed_from_the_data_dir(photos, monkeypatch):
    from cnnkit import cli

    launched = []
    monkeypatch.setattr(cli, "launch_torchrun", lambda args: launched.append(args.argv) or 0)
    assert main(["train", "--data-dir", str(photos), "--strategy", "frozen", "--probe-candidates", "[]",
                 "--nproc", "2"]) == 0
    assert launched[0][-4:] == ["--recipe", "photos", "--dataset", "folder"]


def test_tune_lr_find_and_augment_preview_read_a_data_dir_for_what_it_holds(photos, tmp_path, monkeypatch, capsys):
    """Before, each of them took Fashion-MNIST's recipe for a folder of photos: tune tuned Fashion-MNIST
    (found in the system's copy) and augment preview drew it."""
    from cnnkit import tune

    studied = []
    probe_trial = {"number": 0, "state": "running", "value": None, "epochs": None, "params": {"probe_flip": True}}
    monkeypatch.setattr(tune, "tune", lambda recipe, overrides, **kw: studied.append((recipe, dict(overrides))) or
                        tune.TuneResult(kw["folder"], None, {}, [probe_trial], None))
    assert main(["tune", "--data-dir", str(photos), "--trials", "1", "--output", str(tmp_path)]) == 1  # none finished
    assert studied[0][0] == "photos" and studied[0][1]["dataset"] == "folder"
    out, err = capsys.readouterr()
    assert "no --recipe for a folder of 66 images: using photos" in err
    assert re.search(r"│ 0 +│ running +│ +│ - +│", out), out  # a probe's trial has no epochs: '-', not 0

    assert main(["lr-find", "--data-dir", str(photos)]) == 2  # a linear probe has no learning rate to find
    assert "lr-find is for recipes trained by gradient steps, e.g. --recipe folder-transfer" in capsys.readouterr().err

    out = tmp_path / "preview.png"
    assert main(["augment", "preview", "--data-dir", str(photos), "--rows", "3", "--out", str(out)]) == 0
    assert out.is_file() and "--dataset folder" in capsys.readouterr().err
