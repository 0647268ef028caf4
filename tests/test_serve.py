"""Export, torch-free prediction and the HTTP server, on a small model trained on real images."""

import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cnnkit.cli import main
from cnnkit.config import apply_overrides, load_recipe
from cnnkit.data.images import decode_image
from cnnkit.training import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    cfg = apply_overrides(load_recipe("fmnist-baseline"), {
        "max_train_samples": 6000, "max_eval_samples": 1000, "epochs": 1, "report": False,
        "output": str(out), "name": "r"})
    run_dir = train(cfg).run_dir
    assert main(["--quiet", "export", str(run_dir), "--parity-samples", "1000"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def images(fmnist_images):
    """Real Fashion-MNIST pictures in many shapes: PNG, JPEG, grey, RGBA, tiny, large."""
    x, y = fmnist_images
    trouser = x[np.flatnonzero(y == 1)[0]]

    def encode(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    grey = Image.fromarray(trouser)
    return {
        "png": encode(grey, "PNG"),
        "jpeg": encode(grey.convert("RGB"), "JPEG", quality=95),
        "rgba": encode(grey.convert("RGBA"), "PNG"),
        "tiny": encode(grey.resize((1, 1)), "PNG"),
        "large": encode(grey.resize((3000, 3000), Image.Resampling.BILINEAR), "PNG"),
    }


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A few hundred bytes that claim to be a 20000 x 20000 image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.fixture(scope="module", params=["onnx", "torch"])
def client(run, request):
    from cnnkit.serve import create_app

    with TestClient(create_app(run, engine=request.param)) as c:
        yield c


def test_export_has_metadata_and_predict_runs_without_torch(run, images, tmp_path):
    import onnx

    model = onnx.load(str(run / "export" / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"])[1] == "Trouser"
    assert json.loads(meta["preprocess"])["data_size"] == 28
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    (tmp_path / "t.png").write_bytes(images["png"])
    code = ("import sys, json; from cnnkit.cli import main; rc = main(['predict', sys.argv[1], sys.argv[2], "
            "'--engine', 'onnx', '--json']); assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "t.png")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["engine"] == "onnxruntime" and result["results"][0]["top"][0]["class"] == "Trouser"


def test_export_refuses_a_model_that_disagrees(run, monkeypatch, tmp_path):
    from cnnkit import export
    from cnnkit.errors import CnnkitError

    monkeypatch.setattr(export, "MAX_ABS_DIFF", -1.0)  # nothing can pass
    with pytest.raises(CnnkitError, match="disagrees with PyTorch"):
        main(["--debug", "export", str(run), "--out", str(tmp_path / "m.onnx"), "--parity-samples", "50"])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("kind", ["png", "jpeg", "rgba", "tiny", "large"])
def test_predict_real_images(client, images, kind):
    r = client.post("/predict", files={"file": (f"x.{kind}", images[kind])}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["top"]) == 3 and body["model"] == "r" and body["time_ms"] >= 0
    probs = [t["probability"] for t in body["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    if kind != "tiny":
        assert body["top"][0]["class"] == "Trouser"


def test_images_are_decoded_on_the_pool_not_the_event_loop(client, images, monkeypatch):
    """A phone's photo takes up to 400 ms to decode (HEIC): on the event loop it would hold up every request."""
    from cnnkit import serve

    threads = []

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(serve, "decode_image", spy)
    assert client.post("/predict", files={"file": ("x.jpg", images["jpeg"])}).status_code == 200
    assert client.post("/predict/batch", files=[("files", ("a.png", images["png"]))]).status_code == 200
    assert len(threads) == 2 and all(t.startswith("cnnkit-infer") for t in threads), threads


def test_batch_reports_each_file(client, images):
    files = [("files", ("a.png", images["png"])), ("files", ("b.txt.png", b"not an image")), ("files", ("c.jpg", images["jpeg"]))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["top"][0]["class"] == "Trouser" and results[1]["status"] == 415 and "top" in results[2]


@pytest.mark.parametrize("endpoint", ["/predict", "/explain"])
@pytest.mark.parametrize("case,status", [
    ("empty", 400), ("text", 415), ("truncated", 415), ("bomb", 413), ("huge", 413), ("no_file", 422), ("bad_k", 422),
])
def test_hostile_input_gets_4xx_and_server_keeps_answering(client, images, case, status, endpoint):
    jpeg = images["jpeg"]
    if case == "no_file":
        r = client.post(endpoint)
    elif case == "bad_k":  # no top 0, and no more feature maps than the server's limit
        params = {"top_k": 0} if endpoint == "/predict" else {"maps": 17}
        r = client.post(endpoint, files={"file": ("a.png", images["png"])}, params=params)
    else:
        data = {"empty": b"", "text": b"hello, I am text", "truncated": jpeg[: len(jpeg) // 2], "bomb": png_bomb(),
                "huge": b"\0" * (11 * 1024 * 1024)}[case]
        r = client.post(endpoint, files={"file": ("x.png", data)})
    assert r.status_code == status, r.text
    if case not in ("no_file", "bad_k"):
        assert "error" in r.json()
    assert client.get("/health").json() == {"status": "ok"}


def test_explain_endpoint_shows_the_maps_of_each_stage_and_the_softmax(client, images):
    r = client.post("/explain", files={"file": ("t.png", images["png"])}, params={"maps": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["name"] for s in body["stages"]] and all(len(s["maps"]) == 4 for s in body["stages"])
    assert all(s["label"] == s["name"] for s in body["stages"])  # one network: its layers' own names
    assert all(m.startswith("data:image/png;base64,") for s in body["stages"] for m in s["maps"])
    probs = [row["probability"] for row in body["softmax"]]
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    top = client.post("/predict", files={"file": ("t.png", images["png"])}).json()["top"][0]["class"]
    assert max(body["softmax"], key=lambda row: row["probability"])["class"] == top


def test_model_info_and_openapi(client):
    info = client.get("/model").json()
    assert info["classes"][1] == "Trouser" and info["input"]["size"] == 28 and "test_accuracy" in info["metrics"]
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/").text
    assert "<input id=\"file\"" in page
    tested = info["metrics"]["test_samples"]  # what the model tells apart, and how well it did, before any upload
    assert "10 classes: T-shirt/top, Trouser, Pullover" in page and f"right on its {tested} test images" in page


def test_the_web_page_names_many_classes_briefly_and_escapes_the_run_name(run, tmp_path):
    from cnnkit.serve import create_app, page_about

    about = page_about([f"c{i}" for i in range(25)], {"test_accuracy": 0.5, "test_samples": 8})
    assert about == "25 classes: " + ", ".join(f"c{i}" for i in range(20)) + " and 5 more · 50.0% right on its 8 test images"
    named = tmp_path / "<b>run"
    shutil.copytree(run, named)
    with TestClient(create_app(named, engine="torch")) as c:
        page = c.get("/").text
    assert "model &lt;b&gt;run" in page and "<b>run" not in page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_web_page_in_chromium(run, images, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from cnnkit.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        deadline = time.time() + 20
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        browser.get(f"http://127.0.0.1:{port}/")
        (tmp_path / "trouser.png").write_bytes(images["png"])
        browser.find_element("id", "file").send_keys(str(tmp_path / "trouser.png"))
        WebDriverWait(browser, 20).until(lambda b: b.find_elements("css selector", ".bar .class-name"))
        top = browser.find_elements("css selector", ".bar .class-name")
        assert top[0].text == "Trouser" and len(top) == 5
        assert "Trouser" in browser.find_element("id", "status").text
        # ... and inside the network: each stage's feature maps, and the softmax with its numbers
        WebDriverWait(browser, 20).until(lambda b: b.find_elements("css selector", "#stages .stage img"))
        assert len(browser.find_elements("css selector", "#stages .stage")) >= 3
        titles = [h.text for h in browser.find_elements("css selector", "#stages .stage h3")]
        assert titles and all(t.startswith("features.") for t in titles), titles  # each stage's label, as /explain gives
        assert browser.find_elements("css selector", "#softmax tr")[0].text.startswith("Trouser")
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)
