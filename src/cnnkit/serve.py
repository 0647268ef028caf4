"""The prediction server: a FastAPI app over one run's model, with a small web page.

Inference runs in a bounded thread pool, off the event loop. Every upload goes through
`decode_image` with limits; bodies over the size limit are refused before they are read.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from cnnkit.data.images import MAX_PIXELS, decode_image
from cnnkit.errors import ImageDecodeError, RunError

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BATCH_FILES = 64


class TorchEngine:
    """The run's PyTorch model, for runs without an ONNX export."""

    name = "torch"

    def __init__(self, run_dir: Path, threads: int | None):
        import torch

        from cnnkit.predict import predict_images
        from cnnkit.runs import load_run

        if threads:
            torch.set_num_threads(threads)
        self.run = load_run(run_dir)
        self.classes = self.run.classes
        self.preprocess = self.run.preprocess.to_dict()
        self._predict = predict_images

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return self._predict(self.run, images, k)


class OnnxEngine:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None):
        from cnnkit.onnx_engine import OnnxModel

        self.model = OnnxModel(path, threads)
        self.classes, self.preprocess = self.model.classes, self.model.preprocess

    def top_k(self, images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return self.model.top_k(images, k)


def load_engine(run_dir: Path, engine: str = "auto", threads: int | None = None):
    onnx_path = Path(run_dir) / "export" / "model.onnx"
    if engine == "onnx" or (engine == "auto" and onnx_path.is_file()):
        return OnnxEngine(onnx_path, threads)
    if engine not in ("auto", "torch"):
        raise RunError(f"engine must be auto, onnx or torch; got {engine!r}")
    return TorchEngine(run_dir, threads)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes, by header or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await error(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(run_dir: Path, *, engine: str = "auto", max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, workers: int = 2, threads: int | None = None) -> FastAPI:
    run_dir = Path(run_dir)
    model = load_engine(run_dir, engine, threads)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnnkit-infer")
    app = FastAPI(title="cnnkit", description=f"Image classification with the run {run_dir.name}",
                  version=__import__("cnnkit").__version__)
    # Multipart framing adds a little to the file itself; the per-file limit is checked again below.
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024)
    model_id = run_dir.name

    async def decode(upload: UploadFile) -> np.ndarray:
        data = await upload.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise _HttpError(413, f"{upload.filename}: file over {max_upload_bytes} bytes")
        if not data:
            raise _HttpError(400, f"{upload.filename or 'upload'}: empty file")
        try:
            return model_decode(data, upload.filename)
        except ImageDecodeError as e:
            status = {"too_large": 413, "empty": 400}.get(e.kind, 415)
            raise _HttpError(status, f"{upload.filename}: {e.reason}") from None

    def model_decode(data: bytes, name: str | None) -> np.ndarray:
        pre = model.preprocess
        return decode_image(data, pre["data_size"], pre["data_channels"], name=name,
                            max_bytes=max_upload_bytes, max_pixels=max_pixels)

    async def infer(images: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        return await asyncio.get_running_loop().run_in_executor(pool, model.top_k, images, k)

    @app.exception_handler(_HttpError)
    async def http_error(request: Request, exc: _HttpError):
        return error(exc.status, exc.message)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model_info() -> dict[str, Any]:
        pre = model.preprocess
        return {"model": model_id, "engine": model.name, "classes": model.classes,
                "input": {"size": pre["data_size"], "channels": pre["data_channels"], "model_input_size": pre["input_size"],
                          "mean": pre["mean"], "std": pre["std"]},
                "metrics": {k: summary[k] for k in ("test_accuracy", "best_val_accuracy", "epochs_run", "dataset")
                            if k in summary},
                "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_batch_files": MAX_BATCH_FILES}}

    @app.post("/predict")
    async def predict(file: UploadFile = File(..., description="an image: PNG, JPEG, BMP, WebP or GIF"),
                      top_k: int = Query(5, ge=1, le=100)) -> dict[str, Any]:
        t0 = time.perf_counter()
        image = await decode(file)
        top = (await infer(image[None], min(top_k, len(model.classes))))[0]
        return {"model": model_id, "engine": model.name, "top": [{"class": c, "probability": p} for c, p in top],
                "time_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.post("/predict/batch")
    async def predict_batch(files: list[UploadFile] = File(...), top_k: int = Query(5, ge=1, le=100)) -> dict[str, Any]:
        t0 = time.perf_counter()
        if len(files) > MAX_BATCH_FILES:
            raise _HttpError(413, f"at most {MAX_BATCH_FILES} files per request, got {len(files)}")
        results: list[dict[str, Any]] = []
        good, images = [], []
        for f in files:
            try:
                images.append(await decode(f))
                good.append(len(results))
                results.append({"file": f.filename})
            except _HttpError as e:
                results.append({"file": f.filename, "error": e.message, "status": e.status})
        if images:
            for i, top in zip(good, await infer(np.stack(images), min(top_k, len(model.classes)))):
                results[i]["top"] = [{"class": c, "probability": p} for c, p in top]
        return {"model": model_id, "engine": model.name, "results": results,
                "time_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (resources.files("cnnkit") / "static" / "index.html").read_text().replace("{{MODEL}}", model_id)

    app.state.engine = model
    return app


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
