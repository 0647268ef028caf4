"""How long `cnnkit explain` takes for one image, and POST /explain under load.

For each run folder: the whole `cnnkit explain RUN IMAGE` command as a user runs it (a new
process: imports, loading the checkpoint, the page), the median of 3; then, for the first run,
`cnnkit serve` answering POST /explain from C concurrent clients (real test images), with its
latency, errors and the server's memory before and after. Writes the block `explain-speed`.

    python benchmarks/explain_speed.py RUN [RUN ...] --requests 500 --concurrency 4
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_recipes import commit, machine, write_block  # noqa: E402
from serve_load import load_test  # noqa: E402


def test_images(run: Path, n: int = 100) -> list[bytes]:
    """The run's own test images (its splits, rebuilt from its configuration), as PNG files."""
    from cnnkit.runs import read_config, run_splits

    _, splits = run_splits(read_config(run))
    out = []
    for img in splits.test.images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def time_command(run: Path, image: Path, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cnnkit", "--quiet", "explain", str(run), str(image),
                        "--out", str(image.with_suffix(".html"))], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--label", default="explain-speed")
    args = p.parse_args()
    rows = ["| run | model | input | `cnnkit explain` (whole command, median of 3) |", "|---|---|---|---|"]
    work = HERE / "runs" / "explain-speed"
    work.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        meta = json.loads((run / "checkpoints" / "best.json").read_text())
        image = work / f"{run.name}.png"
        image.write_bytes(test_images(run, 1)[0])
        seconds = time_command(run, image)
        size = meta["preprocess"]["input_size"]
        rows.append(f"| {run.name} | {meta['model']} | {size}x{size} | {seconds:.2f} s |")
        print(rows[-1], flush=True)
    load = load_test(args.runs[0], "auto", args.requests, args.concurrency, test_images(args.runs[0]), "/explain",
                     warmup=20)
    print(load, flush=True)
    block = (f"Measured {date.today()} on {machine()}, commit {commit()}.\n"
             f"Command: `python benchmarks/explain_speed.py {' '.join(str(r) for r in args.runs)} --requests "
             f"{args.requests} --concurrency {args.concurrency}`\n\n" + "\n".join(rows) + "\n\n"
             f"POST /explain on {args.runs[0].name} (`cnnkit serve`; /explain runs the PyTorch model whatever "
             f"the engine; load generator on the same cores): {load['requests']} requests from {load['concurrency']} clients, {load['errors']} errors, "
             f"{load['throughput_rps']} requests/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, server memory "
             f"{load['rss_before_mb']} MB after 20 warm-up requests, {load['rss_after_mb']} MB after them all.")
    write_block(args.label, block)
    print(block)


if __name__ == "__main__":
    main()
