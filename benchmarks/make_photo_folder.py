"""A small folder-of-photos dataset for measuring `folder-transfer` offline.

No folder of real photos can be downloaded on the project's machines, so this takes CIFAR-10's PNGs
(the only photos at hand), a few classes and a few hundred images per class, and saves each as a
JPEG of a random size and aspect ratio (shorter side 96-320 px, bicubic upscaling), as a user's
folder of camera and web images would vary. The content is still 32-pixel detail: accuracy here
is a lower bound of what sharper photos give.

    python benchmarks/make_photo_folder.py --out /tmp/photos --classes 5 --train 200 --test 100
    python benchmarks/make_photo_folder.py --out /tmp/cats-dogs --names cat dog --train 125 --test 77
"""

from __future__ import annotations

import argparse
import random
import tarfile
from pathlib import Path

from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", type=Path, default=Path.home() / ".cache/cnnkit/cifar10/cifar10-png.tar.gz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=5, help="the first N classes of the archive")
    p.add_argument("--names", nargs="+", help="these classes instead (CIFAR-10's names, e.g. cat dog)")
    p.add_argument("--train", type=int, default=200, help="images per class in train/")
    p.add_argument("--test", type=int, default=100, help="images per class in test/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    wanted = {"train": args.train, "test": args.test}
    counts: dict[tuple[str, str], int] = {}
    classes: list[str] = []
    with tarfile.open(args.archive) as tar:
        members: dict[tuple[str, str], list[tarfile.TarInfo]] = {}
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in wanted:
                continue
            split, cls = parts[-3], parts[-2]
            if args.names and cls not in args.names:
                continue
            if cls not in classes:
                if len(classes) == (len(args.names) if args.names else args.classes):
                    continue
                classes.append(cls)
            members.setdefault((split, cls), []).append(member)
        # a random sample of each class, not its first files: the archive's order is not random (the first
        # 125 cats and dogs were more alike than others: 1-NN leave-one-out 91% inside, 81% from new ones)
        plan = []  # (member, split, class, size), drawn in a fixed order
        for (split, cls), found in sorted(members.items(), key=lambda kv: kv[0]):
            for member in rng.sample(found, min(wanted[split], len(found))):
                short = rng.randint(96, 320)
                aspect = rng.uniform(0.75, 1.33)
                size = (short, round(short * aspect)) if rng.random() < 0.5 else (round(short * aspect), short)
                plan.append((member, split, cls, size))
        # read in the archive's order: a gzip stream seeks forward cheaply, backward from its start
        for member, split, cls, size in sorted(plan, key=lambda p: p[0].offset_data):
            image = Image.open(tar.extractfile(member)).convert("RGB")
            target = args.out / split / cls / (Path(member.name).stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            image.resize(size, Image.BICUBIC).save(target, quality=90)
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
    print(f"{args.out}: {len(classes)} classes ({', '.join(classes)}), "
          f"{sum(v for (s, _), v in counts.items() if s == 'train')} train and "
          f"{sum(v for (s, _), v in counts.items() if s == 'test')} test images")


if __name__ == "__main__":
    main()
