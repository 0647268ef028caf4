"""A bounded load test of `cnnkit serve` on 127.0.0.1, and onnxruntime against torch eager.

Starts the server on a free local port for a run folder, sends N requests (real test images)
with C concurrent clients, and records throughput, p50/p99 latency, errors and the server's
memory before and after. Then times single-image latency and batch throughput of both engines
in-process. Writes benchmarks/results/serve-load.json and the marked block in RESULTS.md.

    python benchmarks/serve_load.py RUN --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_recipes import commit, machine, write_block  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_pngs(run: Path, n: int = 200) -> list[bytes]:
    from cnnkit.data import load_dataset

    cfg = json.loads((run / "config.json").read_text())
    test = load_dataset(cfg["dataset"], cfg["data_dir"]).splits["test"]
    out = []
    for img in test.images[:n]:
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def load_test(run: Path, engine: str, requests: int, concurrency: int, pngs: list[bytes],
              endpoint: str = "/predict", warmup: int = 0) -> dict:
    """`warmup` requests go first, before the server's memory is read: its first answers allocate
    buffers that later ones reuse."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run), "--port", str(port),
                               "--engine", engine], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        for i in range(warmup):
            httpx.post(f"{url}{endpoint}", files={"file": ("x.png", pngs[i % len(pngs)])}, timeout=30)
        rss_before = rss_mb(server.pid)

        def worker(k: int) -> list[tuple[float, int]]:
            out = []
            with httpx.Client(base_url=url, timeout=30) as client:
                for i in range(k, requests, concurrency):
                    t0 = time.perf_counter()
                    r = client.post(endpoint, files={"file": ("x.png", pngs[i % len(pngs)])})
                    out.append((time.perf_counter() - t0, r.status_code))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = [x for part in pool.map(worker, range(concurrency)) for x in part]
        wall = time.perf_counter() - t0
        lat = sorted(1000 * t for t, _ in results)
        return {"engine": engine, "endpoint": endpoint, "requests": len(results), "concurrency": concurrency,
                "errors": sum(code != 200 for _, code in results), "throughput_rps": round(len(results) / wall, 1),
                "p50_ms": round(lat[len(lat) // 2], 2), "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
                "rss_before_mb": round(rss_before), "rss_after_mb": round(rss_mb(server.pid))}
    finally:
        server.terminate()
        server.wait(timeout=30)


def engines(run: Path) -> list[dict]:
    """Single-image latency and batch-256 throughput, onnxruntime against torch eager, in-process."""
    import torch

    from cnnkit.onnx_engine import OnnxModel
    from cnnkit.predict import TorchEngine

    onnx = OnnxModel(run / "export" / "model.onnx")
    loaded = TorchEngine(run)
    pre = onnx.preprocess
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, pre["data_channels"], pre["data_size"], pre["data_size"]), dtype=np.uint8)
    batch = rng.integers(0, 256, (256, pre["data_channels"], pre["data_size"], pre["data_size"]), dtype=np.uint8)
    rows = []
    for name, fn in (("onnxruntime", lambda x: onnx.top_k(x, 5)), ("torch eager", lambda x: loaded.top_k(x, 5))):
        def med(x, n):
            for _ in range(5):
                fn(x)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)
        rows.append({"engine": name, "single_image_ms": round(1000 * med(one, 300), 3),
                     "batch256_images_per_s": round(256 / med(batch, 30))})
    rows.append({"torch_threads": torch.get_num_threads()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    if not (args.run / "export" / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "cnnkit", "--quiet", "export", str(args.run)], check=True)
    pngs = test_pngs(args.run)
    load = [load_test(args.run, e, args.requests, args.concurrency, pngs) for e in ("onnx", "torch")]
    eng = engines(args.run)
    for row in load + eng:
        print(row)
    lines = ["| server engine | requests | concurrent | errors | requests/s | p50 | p99 | server RSS before → after |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['requests']} | {r['concurrency']} | {r['errors']} | {r['throughput_rps']} "
              f"| {r['p50_ms']} ms | {r['p99_ms']} ms | {r['rss_before_mb']} → {r['rss_after_mb']} MB |" for r in load]
    lines += ["", "| engine (in-process) | one image | batch of 256 |", "|---|---|---|"]
    lines += [f"| {r['engine']} | {r['single_image_ms']} ms | {r['batch256_images_per_s']} images/s |" for r in eng if "engine" in r]
    header = (f"Measured on {machine()}, commit {commit()}, run `{args.run.name}` (seed-cnn, Fashion-MNIST), client and "
              f"server on the same 2 cores.\nCommand: `python benchmarks/serve_load.py RUN --requests {args.requests} "
              f"--concurrency {args.concurrency}`\n\n")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "serve-load.json").write_text(json.dumps({"load": load, "engines": eng}, indent=2) + "\n")
    write_block("serve-load", header + "\n".join(lines))


if __name__ == "__main__":
    main()
