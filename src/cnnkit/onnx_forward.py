"""A fixed torch module's forward pass under ONNX Runtime, for inference on the CPU.

On a CPU without bf16 a linear probe's cost is the frozen backbone's fp32 forward passes. On the
2-core Xeon with PyTorch's kernels capped to AVX2, ONNX Runtime computed EfficientNet-Lite0/1/2
features at 1.26-1.60x PyTorch's rate, and the photo default ran in 0.67 of the time
(benchmarks/RESULTS.md, `onnx-features-avx2`, `onnx-photos-flowers12-fp32-b2b`); but its own
kernels were not capped, and where the CPU has bf16 PyTorch's is faster. So it is a switch:
`--inference-engine onnxruntime`, `predict_logits(..., engine="onnxruntime")`.

What is cnnkit's own here is only the glue: the module is exported at its first batch of each
input shape, in memory, and the session is kept while its weights stay the same (a digest of
them is the key, so a new head or a loaded checkpoint exports again). The legacy TorchScript
exporter is used because it takes about 1 s for Lite0 against about 10 s for the dynamo
exporter, a cost paid once per model and input shape in every run (`cnnkit export` uses dynamo
for the file a user keeps). A module that does not export runs in torch, with one warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Sessions kept: one. A run uses one model at a time (each candidate backbone's features, then the
# trained model's test and report), and each session keeps its own memory arena: with four kept, a
# photo run's peak memory was 10 GB against 5 in torch; without arenas (glibc's malloc untuned) they ran
# 15-25% slower.
_KEEP = 1
_SESSIONS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_FAILED = object()  # a module that did not export: torch runs it


def onnx_forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function like `module`'s forward (float inputs on the CPU, outputs as a float32 tensor)
    that runs under ONNX Runtime in fp32. `module` must be in eval mode and must not change while
    the function is used (its weights are read once, here)."""
    digest = weights_digest(module)

    def run(x: torch.Tensor) -> torch.Tensor:
        key = (digest, tuple(x.shape[1:]), str(x.dtype))
        session = _SESSIONS.get(key)
        if session is None:
            session = _export(module, x, key)
        if session is _FAILED:
            return module(x)
        _SESSIONS.move_to_end(key)
        array = x.detach().float().contiguous().numpy()
        return torch.from_numpy(session.run(None, {"x": array})[0])

    return run


def weights_digest(module: nn.Module) -> str:
    """The module's class and every parameter and buffer, hashed: equal digests, equal forward passes."""
    h = hashlib.blake2b(type(module).__qualname__.encode(), digest_size=16)
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(str(t.dtype).encode() + str(tuple(tensor.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _export(module: nn.Module, x: torch.Tensor, key: tuple[Any, ...]) -> Any:
    import onnxruntime as ort

    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(module, (x[:1].float().contiguous(),), buffer, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}}, opset_version=17, dynamo=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Its threads would spin between batches, taking the cores from torch's preprocessing of the next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session: Any = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        _check_parity(session, module, x[:2])
    except Exception as e:  # noqa: BLE001 - any exporter or runtime failure: torch still works
        log.warning("ONNX Runtime: %s did not export (%s); it runs in torch", type(module).__name__,
                    str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        session = _FAILED
    _SESSIONS[key] = session
    while len(_SESSIONS) > _KEEP:
        _SESSIONS.popitem(last=False)
    return session


def _check_parity(session: Any, module: nn.Module, x: torch.Tensor) -> None:
    """The tracer records one path through the forward pass; a module whose output depends on its
    input in a way it cannot follow exports wrongly, not with an error. So two images are compared."""
    names = [i.name for i in session.get_inputs()]
    if names != ["x"]:
        raise ValueError(f"the exported graph takes {names or 'no inputs'}, not the images")
    x = x.float().contiguous()
    with torch.no_grad():
        want = module(x).float()
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-5):
        raise ValueError("its outputs differ from torch's")
