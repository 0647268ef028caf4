"""The prediction server: a FastAPI app over one run's model, with a small web page.

Inference runs in a bounded thread pool, off the event loop. Every upload goes through
`decode_image` with limits; bodies over the size limit are refused before they are read.
"""

from __future__ import annotations

import asyncio
import html
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from cnnkit.data.images import MAX_PIXELS, decode_image
from cnnkit.errors import ImageDecodeError
from cnnkit.models.concat import layer_label
from cnnkit.predict import load_engine
from cnnkit.runs import read_summary

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_BATCH_FILES = 64
MAX_EXPLAIN_MAPS = 16  # feature maps per stage in one /explain answer


def page_about(classes: list[str], summary: dict[str, Any]) -> str:
    """The web page's line under the model's name: what it can tell apart, and how well it did on its test."""
    shown = ", ".join(classes[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    tested = (f" · {100 * summary['test_accuracy']:.1f}% right on its {summary['test_samples']} test images"
              if "test_accuracy" in summary and "test_samples" in summary else "")
    return f"{len(classes)} classes: {shown}{tested}"


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
    model = load_engine(run_dir, engine, threads=threads)
    summary = read_summary(run_dir)
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
        try:  # on the pool, not the event loop: a phone's photo takes 20-400 ms to decode (HEIC the most)
            return await asyncio.get_running_loop().run_in_executor(pool, model_decode, data, upload.filename)
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
                "metrics": {k: summary[k] for k in ("test_accuracy", "test_samples", "cv_accuracy", "best_val_accuracy",
                                                     "epochs_run", "dataset") if k in summary},
                "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_batch_files": MAX_BATCH_FILES}}

    @app.post("/predict")
    async def predict(file: UploadFile = File(..., description="an image: PNG, JPEG, BMP, WebP, GIF (HEIC with pillow-heif)"),
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

    inside = _Inside(run_dir, model)
    about = page_about(model.classes, summary)

    @app.post("/explain")
    async def explain(file: UploadFile = File(..., description="an image: PNG, JPEG, BMP, WebP, GIF (HEIC with pillow-heif)"),
                      maps: int = Query(8, ge=1, le=MAX_EXPLAIN_MAPS)) -> dict[str, Any]:
        """Inside the network: the most active feature maps of each stage (PNG) and the softmax."""
        t0 = time.perf_counter()
        image = await decode(file)
        result = await asyncio.get_running_loop().run_in_executor(pool, inside, image, maps)
        return {"model": model_id, **result, "time_ms": round(1000 * (time.perf_counter() - t0), 2)}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        page = (resources.files("cnnkit") / "static" / "index.html").read_text()
        return page.replace("{{MODEL}}", html.escape(model_id)).replace("{{ABOUT}}", html.escape(about))

    app.state.engine = model
    return app


class _Inside:
    """POST /explain's work: the run's PyTorch model (loaded on first use where the server predicts
    with onnxruntime), one request at a time, since it hooks the model's layers for the pass."""

    def __init__(self, run_dir: Path, engine: Any):
        self.run_dir, self.run = run_dir, getattr(engine, "run", None)
        self.lock = threading.Lock()

    def __call__(self, image: np.ndarray, maps: int) -> dict[str, Any]:
        from cnnkit.explain import colour, look_inside, png, to_pil

        with self.lock:
            if self.run is None:
                from cnnkit.runs import load_run

                self.run = load_run(self.run_dir)
            ex, _ = look_inside(self.run.model, self.run.preprocess, self.run.classes, image, max_maps=maps)
        return {"input_shape": ex["input_shape"],
                "stages": [{"name": st["name"], "label": layer_label(st["name"], self.run.meta["model"]),
                            "type": st["type"], "shape": st["shape"], "channels": st["channels"],
                            "maps": [png(to_pil(colour(m), 64)) for m in st["maps"]]} for st in ex["stages"]],
                "softmax": [{"class": c, "logit": z, "probability": p}
                            for c, z, p in zip(ex["classes"], ex["logits"], ex["probabilities"])]}


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
