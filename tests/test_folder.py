"""The folder source on small trees of real images (Fashion-MNIST pictures) in mixed formats."""

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from cnnkit.data import folder, images, load_dataset, make_splits
from cnnkit.data.images import decode_image, decode_images
from cnnkit.errors import DataError, ImageDecodeError

FORMATS = [("png", "L"), ("jpg", "RGB"), ("bmp", "RGB"), ("webp", "RGB"), ("gif", "P"), ("png", "RGBA"), ("png", "I;16")]


def save_real(img28: np.ndarray, path, fmt: str, mode: str, scale: int) -> None:
    im = Image.fromarray(img28).resize((28 * scale, 20 * scale))  # not square, various sizes
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im).astype(np.uint16) * 256)
    else:
        im = im.convert(mode)
    im.save(path)


@pytest.fixture
def tree(tmp_path, fmnist_images):
    """train/ and val/ with 3 classes, 7 files each in every format; a hidden folder; a notes file."""
    x, y = fmnist_images
    root = tmp_path / "photos"
    for split in ("train", "val"):
        for c, name in enumerate(["bag", "sandal", "trouser"]):
            label = {"bag": 8, "sandal": 5, "trouser": 1}[name]
            picks = np.flatnonzero(y == label)
            d = root / split / name
            d.mkdir(parents=True)
            for i, (fmt, mode) in enumerate(FORMATS):
                save_real(x[picks[i + (10 if split == "val" else 0)]], d / f"img{i}.{fmt}", fmt, mode, scale=1 + i % 3)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(x[0]).save(root / "train" / ".ipynb_checkpoints" / "x.png")
    (root / "train" / "bag" / "notes.txt").write_text("not an image")
    return root


def test_mixed_formats_load_with_val_alias_and_hidden_folders(tree):
    ds = load_dataset("folder", tree, image_size=24, channels=3)
    assert ds.classes == ["bag", "sandal", "trouser"]
    assert set(ds.splits) == {"train", "val"}
    assert ds.splits["train"].images.shape == (21, 3, 24, 24)
    assert ds.splits["train"].images.dtype == np.uint8
    assert np.bincount(ds.splits["train"].labels).tolist() == [7, 7, 7]
    # val/ is the only held-out split, so it becomes the test split and validation is carved from train
    splits = make_splits(ds, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert len(splits.test) == 21 and len(splits.val) + len(splits.train) == 21
    assert any("val/ split is held out" in n for n in splits.notes)


def test_grayscale_output_and_images_keep_content(tree, fmnist_images):
    ds = load_dataset("folder", tree, image_size=20, channels=1)
    imgs = ds.splits["train"].images
    assert imgs.shape[1] == 1
    assert imgs.std() > 20  # real pictures, not blank: 16-bit and palette images were scaled properly
    assert all(img.max() > 100 for img in imgs)


def test_corrupt_file_is_listed_then_skippable(tree):
    bad = tree / "train" / "sandal" / "broken.jpg"
    good = (tree / "train" / "sandal" / "img1.jpg").read_bytes()
    bad.write_bytes(good[: len(good) // 3])
    (tree / "train" / "bag" / "text.png").write_text("hello, I am text")
    with pytest.raises(DataError) as e:
        load_dataset("folder", tree, image_size=24)
    assert "broken.jpg" in str(e.value) and "text.png" in str(e.value) and "--skip-bad-images" in str(e.value)
    ds = load_dataset("folder", tree, image_size=24, skip_bad_images=True)
    assert len(ds.splits["train"]) == 21
    assert any("skipped 2" in n for n in ds.notes)


def test_class_mismatch_between_splits_names_the_classes(tree):
    for f in (tree / "val" / "sandal").iterdir():
        f.unlink()
    (tree / "val" / "sandal").rmdir()
    with pytest.raises(DataError, match=r"missing in val: \['sandal'\]"):
        load_dataset("folder", tree, image_size=24)


def test_empty_class_folder_is_an_error(tree):
    (tree / "train" / "shoes").mkdir()
    with pytest.raises(DataError, match="shoes: class folder holds no image files"):
        load_dataset("folder", tree, image_size=24)


def test_single_tree_is_split_by_the_tool(tree):
    ds = load_dataset("folder", tree / "train", image_size=24)
    assert set(ds.splits) == {"train"}
    a = make_splits(ds, val_fraction=0.2, test_fraction=0.3, seed=3)
    b = make_splits(ds, val_fraction=0.2, test_fraction=0.3, seed=3)
    assert (a.test.labels == b.test.labels).all() and (a.test.images == b.test.images).all()
    assert np.bincount(a.test.labels).tolist() == [2, 2, 2]  # stratified
    assert len(a.train) + len(a.val) + len(a.test) == 21


def test_archive_and_cache(tree, tmp_path, monkeypatch):
    with tarfile.open(tmp_path / "photos.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="photos")
    ds = load_dataset("folder", tmp_path / "photos.tar.gz", image_size=24)
    direct = load_dataset("folder", tree, image_size=24)
    assert (ds.splits["train"].images == direct.splits["train"].images).all()
    monkeypatch.setattr(folder, "_decode_tree", lambda *a, **k: pytest.fail("should come from the cache"))
    load_dataset("folder", tmp_path / "photos.tar.gz", image_size=24)


def test_zip_of_a_folder_as_a_photo_service_exports_it(tree, tmp_path):
    """A .zip (with a Mac's __MACOSX/ and ._ files beside the photos) loads as the folder does; a
    truncated one is a clear error."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "photos.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                z.write(path, "photos/" + path.relative_to(tree).as_posix())
        z.writestr("__MACOSX/photos/train/bag/._img0.png", b"resource fork")
        z.writestr("photos/train/bag/._img1.jpg", b"resource fork")
    ds = load_dataset("folder", tmp_path / "photos.zip", image_size=24)
    direct = load_dataset("folder", tree, image_size=24)
    assert ds.classes == direct.classes
    for split in ("train", "val"):
        assert (ds.splits[split].images == direct.splits[split].images).all()
        assert (ds.splits[split].labels == direct.splits[split].labels).all()
    data = (tmp_path / "photos.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.zip: cannot read the archive"):
        load_dataset("folder", tmp_path / "cut.zip", image_size=24)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="counts Linux's memory maps")
@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_members_are_read_at_their_own_size(tmp_path, kind):
    """Each member read sets aside its own size, not the 50 MB limit: reads of the limit, each shrunk to
    its file, left CIFAR-10's 60,000 PNGs in as many memory maps, and then no thread could start."""
    import io
    import zipfile

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    png, path = buf.getvalue(), tmp_path / f"many.{kind}"
    if kind == "tar":
        with tarfile.open(path, "w") as tar:
            for i in range(3000):
                info = tarfile.TarInfo(f"c{i % 2}/{i}.png")
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))
    else:
        with zipfile.ZipFile(path, "w") as z:
            for i in range(3000):
                z.writestr(f"c{i % 2}/{i}.png", png)
    maps = lambda: len(Path("/proc/self/maps").read_text().splitlines())  # noqa: E731
    before = maps()
    files, _ = folder._read_archive(path)
    assert len(files) == 3000 and set(files.values()) == {png}
    assert maps() - before < 1000


def test_corrupt_cache_is_rebuilt(tree, isolated_home):
    load_dataset("folder", tree, image_size=24)
    (cache,) = (isolated_home / "cache").glob("*.safetensors")
    cache.write_bytes(cache.read_bytes()[:200])
    ds = load_dataset("folder", tree, image_size=24)
    assert len(ds.splits["train"]) == 21


def test_decode_limits_and_errors(tmp_path):
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 8, 3)
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"GIF89a but not really", 8, 3)
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(big)
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(big, 8, 1, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="more than the limit"):
        decode_image(big, 8, 1, max_bytes=1000)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert (decode_image(tmp_path / "clear.png", None, 3) == 255).all()  # transparent -> white


def phone_photo(picture: np.ndarray) -> Image.Image:
    """A real picture as large as a camera's (1600x1200 here), its top-left corner painted red."""
    shown = Image.fromarray(picture).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)
    shown.paste((255, 0, 0), (0, 0, 400, 300))
    return shown


def test_large_jpegs_decode_at_a_reduced_scale_upright_and_as_sharp(tmp_path, fmnist_images, monkeypatch):
    """A camera's JPEG, stored on its side with an EXIF orientation, and one in CMYK: each decoded at
    1/8 of its size (still more than twice the 64 px asked for), turned upright, and within rounding
    of the whole image resampled."""
    shown = phone_photo(fmnist_images[0][0])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn anticlockwise: shown turned a quarter clockwise
    shown.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "side.jpg", quality=92, exif=exif)
    shown.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=92)
    shown.save(tmp_path / "plain.jpg", quality=92)
    drafted = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = draft(self, mode, size)
        drafted.append(self.size)
        return out

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    side, cmyk = decode_image(tmp_path / "side.jpg", 64, 3), decode_image(tmp_path / "cmyk.jpg", 64, 3)
    assert drafted == [(150, 200), (200, 150)]
    whole = ImageOps.fit(Image.open(tmp_path / "plain.jpg"), (64, 64), Image.Resampling.BICUBIC)
    whole = np.asarray(whole).transpose(2, 0, 1).astype(int)
    for got in (side, cmyk):
        assert np.abs(got.astype(int) - whole).mean() < 1.5
        assert (got[0, :12, :4] > 200).all() and (got[1:, :12, :4] < 60).all()  # red where it was: upright
    assert decode_image(tmp_path / "plain.jpg", 1000, 3).shape == (3, 1000, 1000)  # no scale left to drop


@pytest.mark.parametrize("chunk_bytes", [1, 1000, images.CHUNK_BYTES])  # a file a run, a few, all in one
def test_many_images_decode_in_order_on_threads_with_their_errors(tmp_path, fmnist_images, monkeypatch, chunk_bytes):
    monkeypatch.setattr(images, "CHUNK_BYTES", chunk_bytes)
    x, _ = fmnist_images
    for i in range(6):
        Image.fromarray(x[i]).save(tmp_path / f"{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a JPEG")
    sources = [tmp_path / f"{i}.png" for i in range(3)] + [tmp_path / "bad.jpg", b""] + \
              [(tmp_path / f"{i}.png").read_bytes() for i in range(3, 6)]
    got = list(decode_images(sources, 20, 1, names=[f"image {i}" for i in range(len(sources))], workers=2))
    assert [type(g) for g in got] == [np.ndarray] * 3 + [ImageDecodeError] * 2 + [np.ndarray] * 3
    assert str(got[3]).startswith("image 3: not an image") and got[4].kind == "empty"
    for j in (0, 1, 2, 5, 6, 7):
        assert (got[j] == decode_image(sources[j], 20, 1)).all()
    assert images.usable_cores() >= 1


def test_heic_photos_are_read_with_pillow_heif_or_refused_saying_how(tmp_path, fmnist_images, monkeypatch):
    """An iPhone's HEIC photos in a folder: read like JPEGs where pillow-heif is installed; without it,
    each is listed as a HEIC photo with the command that installs it (not "not an image")."""
    pytest.importorskip("pillow_heif").register_heif_opener()  # to write HEIC files here
    x, y = fmnist_images
    root = tmp_path / "iphone"
    for name, label in (("bag", 8), ("sandal", 5)):
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == label)[:3]:
            shown = phone_photo(x[i]).resize((400, 300))
            shown.save(root / name / f"IMG_{i}.HEIC", format="HEIF", quality=90)
            shown.save(root / name / f"IMG_{i}.png")
    heic = sorted(root.rglob("*.HEIC"))
    for path in heic:
        got, png = decode_image(path, 32, 3).astype(int), decode_image(path.with_suffix(".png"), 32, 3).astype(int)
        assert np.abs(got - png).mean() < 6  # lossy, but the same picture
        assert (got[0, :6, :2] > 200).all() and (got[1:, :6, :2] < 60).all()  # upright: the red corner top left
    ds = load_dataset("folder", root, image_size=32)
    assert np.bincount(ds.splits["train"].labels).tolist() == [6, 6]  # the HEIC and PNG files both
    monkeypatch.setattr(images, "heif_support", lambda: False)
    with pytest.raises(ImageDecodeError, match=r"HEIC/HEIF photo .* pip install 'cnnkit\[heif\]'"):
        decode_image(heic[0], 32, 3)
    with pytest.raises(DataError, match=r"6 image file\(s\) could not be decoded:\n.*IMG_.*HEIC: a HEIC/HEIF photo"):
        load_dataset("folder", root, image_size=24)


@pytest.mark.slow
def test_evaluate_a_run_on_a_new_folder_of_photos(tmp_path, fmnist_images, capsys):
    """`cnnkit evaluate RUN --data-dir FOLDER`: the run's own test folder gives the run's own
    accuracy; a folder with a class the run does not know is refused, naming it, unless its images
    are skipped; results go to RUN/evaluations/, never over evaluation.json."""
    import json

    from cnnkit.cli import main

    x, y = fmnist_images
    root = tmp_path / "photos"
    names = {"bag": 8, "sandal": 5, "trouser": 1, "hat": 0}
    for split, start, count in (("train", 0, 30), ("test", 30, 10)):
        for name, label in names.items():
            if name == "hat":
                continue
            d = root / split / name
            d.mkdir(parents=True)
            for i in np.flatnonzero(y == label)[start:start + count]:
                Image.fromarray(x[i]).save(d / f"{i}.png")
    assert main(["--quiet", "train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "28",
                 "--channels", "1", "--recipe", "fmnist-baseline", "--epochs", "1", "--report", "false",
                 "--output", str(tmp_path), "--name", "r"]) == 0
    run = tmp_path / "r"
    own = json.loads((run / "evaluation.json").read_text())
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(root / "test"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == own["accuracy"] and again["samples"] == own["samples"] >= 29  # (files alike: one)
    assert (run / "evaluations" / "photos-test.json").is_file()
    shutil.make_archive(str(tmp_path / "test-photos"), "zip", root / "test")  # its class folders at the top
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(tmp_path / "test-photos.zip"), "--json"]) == 0
    zipped = json.loads(capsys.readouterr().out)  # evaluated whole, as the folder is: not a split carved from it
    assert zipped["accuracy"] == own["accuracy"] and zipped["samples"] == own["samples"]
    new = tmp_path / "new"
    for name, label in names.items():  # new photos, and a class the run never saw
        (new / name).mkdir(parents=True)
        for i in np.flatnonzero(y == label)[:5]:
            Image.fromarray(x[i]).save(new / name / f"{i}.png")
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(new)]) == 2
    err = capsys.readouterr().err
    assert "does not know: hat" in err and "--skip-unknown-classes" in err
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(new), "--skip-unknown-classes", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 14 <= out["samples"] <= 15 and out["split"] == str(new)
    assert "images of classes the run does not know: hat" in out["notes"][0]
    # Another dataset with train/ and test/ inside: its test split, classes matched by name, saved beside
    other = tmp_path / "other"
    for split in ("train", "test"):
        shutil.copytree(new, other / split)
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(other)]) == 2
    assert "does not know: hat" in capsys.readouterr().err
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(other), "--skip-unknown-classes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == out["samples"]
    assert len(list((run / "evaluations").glob("*-other.json"))) == 1
    assert json.loads((run / "evaluation.json").read_text()) == own  # the run's own evaluation, untouched
    # The run's own dataset where it trained: its own evaluation, written again
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == own["accuracy"]
    # Its training folder: evaluated whole, with a note that the accuracy overstates new photos'
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(root / "train"), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("holds the images this run trained on" in n for n in notes), notes
    assert again["notes"] == []  # its test folder: no such note
    # New photos, three of them training photos saved again as JPEG: said, with the accuracy without them
    mixed = tmp_path / "mixed"
    for name in ("bag", "sandal", "trouser"):
        (mixed / name).mkdir(parents=True)
        for f in sorted((root / "test" / name).iterdir())[:4]:
            shutil.copy(f, mixed / name / f.name)
    for f in sorted((root / "train" / "bag").iterdir())[:3]:
        Image.open(f).save(mixed / "bag" / f"{f.stem}-again.jpg", quality=70)
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(mixed), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["samples"] == 15 and got["copies_of_training_images"] == 3
    assert any(n.startswith("3 of the 15 images are copies") for n in got["notes"]), got["notes"]
    assert round(15 * got["accuracy"] - 12 * got["accuracy_without_copies"], 6) in (0, 1, 2, 3)
    # A folder holding test/ alone (refused before: "no train/ folder"): that folder, evaluated whole
    shutil.copytree(root / "test", tmp_path / "only-test" / "test")
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(tmp_path / "only-test"), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert (alone["accuracy"], alone["samples"]) == (own["accuracy"], own["samples"])
    # The dataset inside a wrapping folder: its test split, not its training images taken for new photos
    shutil.copytree(root, tmp_path / "download" / "photos")
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(tmp_path / "download"), "--json"]) == 0
    wrapped = json.loads(capsys.readouterr().out)
    assert (wrapped["accuracy"], wrapped["samples"]) == (own["accuracy"], own["samples"])
    shutil.make_archive(str(tmp_path / "only-test"), "zip", tmp_path / "only-test")
    assert main(["--quiet", "evaluate", str(run), "--data-dir", str(tmp_path / "only-test.zip")]) == 2
    assert "holds test/ and no train/: unpack it" in capsys.readouterr().err


def test_copies_across_splits_and_classes_are_counted():
    from cnnkit.data import Split, Splits
    from cnnkit.data.copies import copies_warnings

    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8)  # all different

    def split(indices, labels):
        return Split(pictures[indices], np.asarray(labels))

    clean = Splits(split([0, 1, 2, 3], [0, 0, 1, 1]), split([4, 5], [0, 1]), split([6, 7], [0, 1]), [])
    assert copies_warnings(clean, ["a", "b"]) == []
    # test 0 and 1 copy training 0 and validation 4; validation 5 copies training 3; picture 2 is under both classes
    copied = Splits(split([0, 1, 2, 2, 3], [0, 0, 1, 0, 1]), split([4, 3], [0, 1]), split([0, 4, 7], [0, 0, 1]), [])
    warnings = copies_warnings(copied, ["a", "b"])
    assert len(warnings) == 3
    assert warnings[0].startswith("2 of the 3 test images are copies of training or validation images")
    assert warnings[1].startswith("1 of the 2 validation images is a copy of training images")
    assert warnings[2].startswith("1 picture appears under more than one class (a and b)")
    # cross-validated, the validation images train too: their copies of training images are no warning
    assert [w[:6] for w in copies_warnings(copied, ["a", "b"], validation=False)] == ["2 of t", "1 pict"]


def test_near_copies_of_a_photo_are_found_and_others_are_not(smooth_pictures):
    """A photo saved again (JPEG quality 30), at half size, or darker is a near copy of its original; its
    mirror image, a 20% crop, a 3% shift (6 bits and 0.96 apart) and other pictures are not; an exact copy
    is counted as one, not as near; a near copy under another class is warned of too."""
    import io

    from cnnkit.data import Split, Splits
    from cnnkit.data.copies import Fingerprints, copies_warnings, near_copies

    train = smooth_pictures(40)

    def redo(picture, change):
        image = change(Image.fromarray(picture.transpose(1, 2, 0)))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return np.asarray(Image.open(buf).convert("RGB").resize((96, 96))).transpose(2, 0, 1)

    def jpeg(image):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=30)
        return Image.open(buf)

    near = [redo(train[0], jpeg), redo(train[1], lambda im: im.resize((48, 48))),
            redo(train[2], lambda im: im.point(lambda v: int(v * 0.9)))]
    unlike = [redo(train[3], lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
              redo(train[4], lambda im: im.crop((10, 10, 86, 86))), redo(train[6], lambda im: im.crop((3, 0, 96, 96))),
              *smooth_pictures(4, seed=1)]
    test = np.stack([*near, *unlike, train[5]])  # and one exact copy
    assert near_copies(Fingerprints.of(test), Fingerprints.of(train)) == [(0, 0), (1, 1), (2, 2)]
    assert near_copies(Fingerprints.of(test[3:]), Fingerprints.of(train)) == []
    # the pool joined from parts (the splits a run learns from) finds the same copies, none of its images copied
    parts = Fingerprints.joined([Fingerprints.of(train[:1]), Fingerprints.of(train[:0]), Fingerprints.of(train[1:])])
    assert len(parts.images) == 40 and all(np.shares_memory(parts.images[i], train) for i in (0, 1, 39))
    assert all(np.array_equal(parts.images[i], train[i]) for i in range(40))
    assert near_copies(Fingerprints.of(test), parts) == [(0, 0), (1, 1), (2, 2)]

    labels = np.zeros(len(test), dtype=np.int64)
    splits = Splits(Split(train, np.zeros(40, dtype=np.int64)), Split(train[:0], labels[:0]), Split(test, labels), [])
    warnings = copies_warnings(splits, ["a", "b"])
    assert warnings[0].startswith("1 of the 11 test images is a copy of training or validation images")
    assert warnings[1].startswith("3 of the 11 test images are near copies of training or validation images")
    assert len(copies_warnings(splits, ["a", "b"], near=False)) == 1
    from cnnkit.data.copies import check_copies

    assert check_copies(splits, ["a", "b"]).copied_test.tolist() == [0, 1, 2, 10]  # the near ones and the exact one
    assert check_copies(splits, ["a", "b"], near=False).copied_test.tolist() == [10]
    named = Splits(Split(train, splits.train.labels, np.array([f"train/a/{i}.jpg" for i in range(40)])), splits.val,
                   Split(test, labels, np.array([f"test/a/{i}.jpg" for i in range(11)])), [])
    exact, near_ones = copies_warnings(named, ["a", "b"])  # the files to move, where the splits know them
    assert "(the same pixels; for example test/a/10.jpg and train/a/5.jpg)" in exact
    assert ("brighter or darker; for example test/a/0.jpg and train/a/0.jpg; test/a/1.jpg and train/a/1.jpg; "
            "test/a/2.jpg and train/a/2.jpg)") in near_ones
    # A photo saved again under another class, in the same split: no model gets both right
    resaved = redo(train[7], jpeg)
    two = Splits(Split(np.concatenate([train, resaved[None]]), np.array([0] * 40 + [1]),
                       np.array([f"train/a/{i}.jpg" for i in range(40)] + ["train/b/7-again.jpg"])),
                 splits.val, Split(test[3:10], labels[3:10], np.array([f"test/a/{i}.jpg" for i in range(7)])), [])
    assert copies_warnings(two, ["a", "b"]) == [
        "1 photo appears under more than one class as near copies (a and b; for example train/a/7.jpg and "
        "train/b/7-again.jpg): no model can get every copy right; keep each photo and its versions in one class folder"]
    few = Splits(splits.train, splits.val, Split(np.concatenate([test[:1], smooth_pictures(120, seed=2)]),
                                                 np.zeros(121, dtype=np.int64)), [])
    assert copies_warnings(few, ["a", "b"]) == []  # one near copy in 121: under 1% of the test split


@pytest.mark.slow
def test_a_run_warns_of_a_test_photo_it_learnt_from(tmp_path, fmnist_images, capsys):
    """The same photo in train/ and test/, and one under two classes: the log, summary.json and the
    report's page say so."""
    import json

    from cnnkit.cli import main

    x, y = fmnist_images
    root = tmp_path / "photos"
    for split, start, count in (("train", 0, 12), ("test", 12, 4)):
        for name, label in (("bag", 8), ("sandal", 5)):
            (root / split / name).mkdir(parents=True)
            for i in np.flatnonzero(y == label)[start:start + count]:
                Image.fromarray(x[i]).save(root / split / name / f"{i}.png")
    bag = sorted((root / "train" / "bag").iterdir())
    shutil.copy(bag[0], root / "test" / "bag" / "copy.png")
    shutil.copy(bag[1], root / "train" / "sandal" / "also-a-sandal.png")
    assert main(["--quiet", "train", "--dataset", "folder", "--data-dir", str(root), "--image-size", "28",
                 "--channels", "1", "--recipe", "fmnist-baseline", "--epochs", "1", "--output", str(tmp_path),
                 "--name", "r"]) == 0
    warnings = json.loads((tmp_path / "r" / "summary.json").read_text())["warnings"]
    assert any(w.startswith("1 of the 9 test images is a copy of training") and
               f"for example test/bag/copy.png and train/bag/{bag[0].name}" in w for w in warnings), warnings
    assert any(w.startswith("1 picture appears under more than one class (bag and sandal; for example train/")
               and "also-a-sandal.png" in w for w in warnings), warnings
    assert "is a copy of training or validation images" in (tmp_path / "r" / "report.html").read_text()
    assert capsys.readouterr().err.count("1 of the 9 test images is a copy") == 1  # said once, as the data was split
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["test_copies_left_out"] == 1  # and the accuracy on the other 8, the copy right or wrong
    assert round(9 * summary["test_accuracy"] - 8 * summary["test_accuracy_without_copies"], 6) in (0, 1)
    assert "test accuracy without copies" in (tmp_path / "r" / "report.html").read_text()


def test_cnnkit_datasets_dir_shows_a_folders_classes_and_its_copies(tmp_path, smooth_pictures, capsys):
    """`cnnkit datasets DIR` before training: images by class and split, and each group of copies with its
    files: a photo in train/ and test/, one saved again as JPEG under another class, and none made up."""
    import json

    from cnnkit.cli import main

    pictures = smooth_pictures(14)
    root = tmp_path / "mine"
    for n, picture in enumerate(pictures):
        split, cls = ("test" if n >= 10 else "train"), ("cats" if n % 2 else "dogs")
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture.transpose(1, 2, 0)).save(root / split / cls / f"{n}.png")
    shutil.copy(root / "train" / "dogs" / "0.png", root / "test" / "dogs" / "again.png")
    Image.fromarray(pictures[3].transpose(1, 2, 0)).save(root / "train" / "dogs" / "3-resaved.jpg", quality=60)
    assert main(["--quiet", "datasets", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}: 16 images in 2 classes" in out
    assert "2 groups of copies of one picture (4 images): 1 under more than one class, 1 across splits" in out
    assert "train/cats/3.png [cats] = train/dogs/3-resaved.jpg [dogs]  (classes differ)" in out
    assert "test/dogs/again.png = train/dogs/0.png  (splits differ)" in out or \
        "train/dogs/0.png = test/dogs/again.png  (splits differ)" in out
    assert main(["--quiet", "datasets", str(root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["images"] == {"train": [5, 6], "test": [2, 3]} and shown["classes"] == ["cats", "dogs"]
    assert sorted(g["across"] for g in shown["copies"]) == ["classes", "splits"]
    assert main(["--quiet", "datasets"]) == 0 and "fashion-mnist" in capsys.readouterr().out  # without DIR: as ever


def test_accuracy_without_copies_counts_one_copy_and_many():
    from cnnkit.evaluate import without_copies

    one = {"test_accuracy_without_copies": 1.0, "test_copies_left_out": 1, "test_samples": 13}
    assert without_copies(one) == "100.00% (12 test images: 1 copy of training images left out)"
    many = {"test_accuracy_without_copies": 213 / 217, "test_copies_left_out": 23, "test_samples": 240}
    assert without_copies(many) == "98.16% (217 test images: 23 copies of training images left out)"
