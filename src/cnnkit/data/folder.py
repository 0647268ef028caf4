"""Image-folder datasets: class folders, optionally under train/ val/ test/, as a directory, a .zip or a .tar(.gz)."""

from __future__ import annotations

import hashlib
import logging
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import Any
from pathlib import Path, PurePosixPath

import numpy as np

from cnnkit.data.cache import cache_key, cached_arrays
from cnnkit.data.dataset import Dataset, Split
from cnnkit.data.images import MAX_FILE_BYTES, decode_images, is_image_file
from cnnkit.errors import DataError, ImageDecodeError, NoImagesFound
from cnnkit.fileio import file_digest
from cnnkit.progress import track

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SKIPPED_NAMES = {"__MACOSX"}


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def load(
    root: Path,
    size: int,
    channels: int,
    *,
    name: str = "folder",
    skip_bad: bool = False,
    cache_dir: Path | None = None,
) -> Dataset:
    """Load a tree of class folders (or an archive of one) as uint8 arrays of (channels, size, size).

    Decoded arrays are cached, keyed by the source's checksum and the size and channels.
    Files that cannot be decoded are listed in the error, or skipped and counted with `skip_bad`.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such file or directory")
    if not (root.is_dir() or is_archive(root)):
        raise DataError(f"{root}: expected a directory of class folders or a .zip/.tar.gz/.tgz/.tar of one")
    key = cache_key(source=_source_fingerprint(root), size=size, channels=channels, skip_bad=skip_bad,
                    v=3)  # v2: large JPEGs decoded at a reduced scale (data.images.REDUCING_GAP); v3: file names kept
    arrays, meta = cached_arrays(f"{name}-{size}px-{channels}ch", key, lambda: _decode_tree(root, size, channels, skip_bad), cache_dir)
    classes = meta["classes"].split("\n")
    splits = {s: Split(arrays[f"{s}_images"], arrays[f"{s}_labels"], _file_names(meta, s, len(arrays[f"{s}_labels"])))
              for s in ("train", "val", "test") if f"{s}_images" in arrays}
    notes = [n for n in meta.get("notes", "").split("\n") if n]
    return Dataset(name, classes, splits, source=str(root), notes=notes)


def _file_names(meta: dict[str, str], split: str, count: int) -> np.ndarray | None:
    """A split's file names as the cache keeps them (None from a cache written before it kept them)."""
    if f"{split}_files" not in meta:
        return None
    return np.asarray(meta[f"{split}_files"].split("\n") if count else [], dtype=object)


def _source_fingerprint(root: Path) -> str:
    if root.is_file():
        return file_digest(root)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _listing(root: Path, contents: bool) -> tuple[list[str], list[str], Callable[[str], bytes | Path]]:
    """A directory's or an archive's file and directory names (relative, POSIX style), and how to read
    a file by its name: an archive's image bytes are read here (with `contents`), a directory's later."""
    if root.is_file():
        files, dirs = _read_archive(root, contents)
        return list(files), dirs, files.__getitem__
    entries = list(root.rglob("*"))
    paths = [p.relative_to(root).as_posix() for p in entries if p.is_file()]
    dirs = [p.relative_to(root).as_posix() for p in entries if p.is_dir()]
    return paths, dirs, lambda rel: root / rel


def list_layout(root: Path, need_train: bool = True) -> Layout:
    """The splits and classes of a directory or an archive of class folders, from names alone (nothing
    decoded): what a folder holds before a recipe is chosen for it, or before it is evaluated."""
    paths, dirs, _ = _listing(root, contents=False)
    return find_layout(paths, str(root), dirs, need_train)


def _decode_tree(root: Path, size: int, channels: int, skip_bad: bool) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    paths, dirs, read = _listing(root, contents=True)
    layout = find_layout(paths, str(root), dirs)
    classes = layout.classes
    arrays: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}  # each split's decoded files, relative to `root`, for people (copies.py)
    bad: list[ImageDecodeError] = []
    for split, items in layout.splits.items():
        names = [f"{root}/{rel}" if root.is_file() else str(root / rel) for rel, _ in items]
        decoded = decode_images([read(rel) for rel, _ in items], size, channels, names=names)
        images, labels, kept = [], [], []
        for (rel, label), result in zip(items, track(decoded, description=f"decoding {split} images", total=len(items))):
            if isinstance(result, ImageDecodeError):
                bad.append(result)
            else:
                images.append(result)
                labels.append(label)
                kept.append(rel)
        files[f"{split}_files"] = "\n".join(kept)
        arrays[f"{split}_images"] = np.stack(images) if images else np.zeros((0, channels, size, size), np.uint8)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    notes = list(layout.notes)
    if bad:
        listing = "\n".join(f"  {e}" for e in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        if not skip_bad:
            raise DataError(
                f"{len(bad)} image file(s) could not be decoded:\n{listing}\n"
                "Remove or fix them, or pass --skip-bad-images to skip them."
            )
        notes.append(f"skipped {len(bad)} undecodable image file(s)")
        log.warning("skipped %d undecodable image file(s):\n%s", len(bad), listing)
    return arrays, {"classes": "\n".join(classes), "notes": "\n".join(notes), **files}


def _read_archive(path: Path, contents: bool = True) -> tuple[dict[str, bytes], list[str]]:
    """Image bytes by member name (other files, and every file without `contents`, with empty bytes, so
    empty class folders are caught), and the directories' names; a .zip (what a photo service's or a
    course's download usually is) or a tar. Each image is read up to its size or MAX_FILE_BYTES and one
    byte more, which decode_image then refuses as too large."""
    files: dict[str, bytes] = {}
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                dirs = [i.filename.rstrip("/") for i in infos if i.is_dir()]
                for info in track([i for i in infos if not i.is_dir()], description="reading archive"):
                    files[info.filename] = _member(archive.open, info, info.filename, info.file_size, contents)
        else:
            with tarfile.open(path, "r:*") as tar:
                members = tar.getmembers()
                dirs = [m.name for m in members if m.isdir()]
                for m in track([m for m in members if m.isfile()], description="reading archive"):
                    files[m.name] = _member(tar.extractfile, m, m.name, m.size, contents)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); it may be truncated or corrupt, provide it again") from None
    return files, dirs


def _member(open_member: Callable[[Any], Any], member: Any, name: str, size: int, contents: bool) -> bytes:
    """An archive member's bytes if it is an image and `contents` are wanted (else none), at most one
    byte over the limit. Never more: a read of n bytes sets aside n at once, and 60,000 reads of 50 MB,
    each shrunk to its file, left CIFAR-10's archive in 60,000 memory maps, past Linux's 65,530 a process."""
    if not (contents and _visible(name) and is_image_file(name)):
        return b""
    with open_member(member) as f:
        return f.read(min(size, MAX_FILE_BYTES + 1))


class Layout:
    """Which file belongs to which split and class, before any pixel is decoded; `split_folders`: each
    split's folder (relative, e.g. "flowers12/test") where the class folders sit under split folders."""

    def __init__(self, classes: list[str], splits: dict[str, list[tuple[str, int]]], notes: list[str],
                 split_folders: dict[str, str] | None = None):
        self.classes, self.splits, self.notes = classes, splits, notes
        self.split_folders = split_folders or {}

    def image_count(self) -> int:
        return sum(len(items) for items in self.splits.values())


def find_layout(paths: Iterable[str], where: str, dirs: Iterable[str] = (), need_train: bool = True) -> Layout:
    """Work out splits and classes from relative file paths (POSIX style).

    Hidden entries (any part starting with a dot) are ignored. A single wrapping folder is
    descended into. Splits present must have the same classes, and a train/ split folder must be
    among them (unless not `need_train`: a folder to evaluate may hold test/ alone).
    """
    parts = [PurePosixPath(p).parts for p in paths if _visible(p)]
    prefix: tuple[str, ...] = ()
    while True:
        tops = {p[len(prefix)] for p in parts if len(p) > len(prefix) + 1}
        loose = [p for p in parts if len(p) == len(prefix) + 1 and is_image_file(p[-1])]
        if len(tops) == 1 and not loose and next(iter(tops)).lower() not in SPLIT_ALIASES:
            only = next(iter(tops))
            deeper = {p[len(prefix) + 1] for p in parts if len(p) > len(prefix) + 2 and p[len(prefix)] == only}
            if deeper:
                prefix += (only,)
                continue
        break
    tops = {p[len(prefix)] for p in parts if len(p) > len(prefix) + 1}
    split_dirs = {t: SPLIT_ALIASES[t.lower()] for t in tops if t.lower() in SPLIT_ALIASES}
    # {split: {class: [relpath]}}
    found: dict[str, dict[str, list[str]]] = {}
    if split_dirs:
        if len(set(split_dirs.values())) != len(split_dirs):
            raise DataError(f"{where}: several folders name the same split: {sorted(split_dirs)}")
        if need_train and "train" not in split_dirs.values():
            raise DataError(f"{where}: found {sorted(split_dirs)} but no train/ folder")
        for p in parts:
            if len(p) > len(prefix) + 2 and p[len(prefix)] in split_dirs and is_image_file(p[-1]):
                found.setdefault(split_dirs[p[len(prefix)]], {}).setdefault(p[len(prefix) + 1], []).append("/".join(p))
        empty = {split_dirs[t] for t in split_dirs} - set(found)
        for split in empty:
            raise DataError(f"{where}: the {split} folder holds no class folders with images")
    else:
        for p in parts:
            if len(p) > len(prefix) + 1 and is_image_file(p[-1]):
                found.setdefault("train", {}).setdefault(p[len(prefix)], []).append("/".join(p))
    if not found:
        raise NoImagesFound(
            f"{where}: no images found. Expected class folders (e.g. cats/, dogs/) holding "
            "PNG/JPEG/BMP/WebP/GIF files, optionally under train/ and test/ or val/."
        )
    dir_parts = [PurePosixPath(d).parts for d in dirs if _visible(d)]
    _check_class_folders(found, parts, dir_parts, prefix, split_dirs, where)
    first = "train" if "train" in found else min(found)
    classes = sorted(found[first])
    for split, by_class in found.items():
        missing, extra = set(classes) - set(by_class), set(by_class) - set(classes)
        if missing or extra:
            raise DataError(
                f"{where}: the {split} split's classes differ from {first}'s"
                + (f"; missing in {split}: {sorted(missing)}" if missing else "")
                + (f"; only in {split}: {sorted(extra)}" if extra else "")
                + ". Every split needs the same class folders, so that label numbers mean the same thing."
            )
    if len(classes) < 2:
        raise DataError(f"{where}: found only one class folder ({classes[0]}); a classifier needs at least two")
    splits = {
        split: [(rel, classes.index(c)) for c in classes for rel in sorted(by_class[c])]
        for split, by_class in found.items()
    }
    notes = [f"{where}: " + ", ".join(f"{s} {len(v)}" for s, v in splits.items()) + f" images in {len(classes)} classes"]
    return Layout(classes, splits, notes, {split: "/".join((*prefix, name)) for name, split in split_dirs.items()})


def _check_class_folders(found, parts, dir_parts, prefix, split_dirs, where) -> None:
    """A class folder without a single image is an error: it would silently vanish from the class list."""
    depth = len(prefix) + (1 if split_dirs else 0)
    in_scope = lambda p: p[: len(prefix)] == prefix and (not split_dirs or p[len(prefix)] in split_dirs)  # noqa: E731
    folders = {p[: depth + 1] for p in parts if len(p) > depth + 1 and in_scope(p)}
    folders |= {p for p in dir_parts if len(p) == depth + 1 and in_scope(p)}
    for folder in sorted(folders):
        split = split_dirs[folder[len(prefix)]] if split_dirs else "train"
        if folder[-1] not in found.get(split, {}):
            raise DataError(f"{where}/{'/'.join(folder)}: class folder holds no image files (PNG, JPEG, BMP, WebP, GIF)")


def _visible(path: str) -> bool:
    return not any(part.startswith(".") or part in SKIPPED_NAMES for part in PurePosixPath(path).parts)
