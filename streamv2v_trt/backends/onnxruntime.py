"""ONNX Runtime: runs the very ONNX files that TensorRT compiles (UNet with bank I/O, VAE encoder/decoder).

Every tensor goes through I/O binding by name. Outputs are bound once to torch buffers allocated here, so
`run()` returns the same tensors on every call (valid until the next call) and ORT never allocates them.
Inputs are bound to the caller's tensors by pointer and rebound only when a pointer changes: the pipeline
passes the same latent, prompt and bank buffers every frame, so on a device the bank never leaves it
between calls. An input of another dtype or device is copied into a staging buffer allocated once.

CPU provider here; the CUDA provider where onnxruntime-gpu is installed (it runs on the current torch
stream, see `_providers`).

An ONNX with dynamic shapes (`build_engines --shapes dynamic`) has one runner per frame size: each is given its
size's shapes and binds its own outputs, and all share one session (`OnnxRunner.at_shapes`), so the weights are
held once.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..layout import DTYPES, dtype_name
from .named_io import InputBinder, Spec, resolve_shape

_ONNX_TYPE_NAMES = {"float": "float32", "double": "float64"}  # ORT reports "tensor(float)"; the rest match DTYPES


def _providers(device: torch.device) -> list:
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise ValueError(f"onnxruntime backend runs on cpu or cuda, got device {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"device {device} asked, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {ort.get_available_providers()}); install onnxruntime-gpu or use device='cpu'"
        )
    # ORT enqueues on torch's current stream: no cross-stream sync between the pipeline's kernels and the engine.
    stream = torch.cuda.current_stream(device).cuda_stream
    options = {"device_id": device.index or 0, "has_user_compute_stream": "1", "user_compute_stream": str(stream)}
    return [("CUDAExecutionProvider", options)]


class OnnxRunner:
    """One ONNX model behind I/O binding: named torch tensors in, preallocated named torch tensors out.

    `shapes`: every tensor's shape (name -> shape) where the model's are symbolic (a dynamic-shape build; the
    manifest's shapes at one size); a static model's own shapes must not be contradicted."""

    def __init__(
        self, path: str | PathLike, device: torch.device, threads: int | None = None,
        shapes: dict[str, tuple[int, ...]] | None = None, *, session_of: OnnxRunner | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path} not found; build it with python -m build_engines")
        self.device, self.threads, self.shapes = device, threads, shapes or {}
        # The runner that made the session, and every runner at another size that uses it (a weight swap makes
        # one new session for all of them).
        self.owner = session_of.owner if session_of is not None else self
        self.sharers: list[OnnxRunner] = []
        if self.owner is self:
            self.session = self._session(str(self.path))
        else:
            self.session = self.owner.session
            self.owner.sharers.append(self)
        self.binding = self.session.io_binding()
        self.input_specs = {i.name: self._spec(i) for i in self.session.get_inputs()}
        self.output_specs = {o.name: self._spec(o) for o in self.session.get_outputs()}
        self.outputs = {
            name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in self.output_specs.items()
        }
        for name, t in self.outputs.items():
            self._bind(self.binding.bind_output, name, t)
        self.bind_inputs = InputBinder(
            self.path.name, self.input_specs, device, lambda n, t: self._bind(self.binding.bind_input, n, t)
        )

    def _session(self, model: str | bytes) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        # A spinning pool steals the CPU from torch's threads between calls (measured 8 vs 56 FPS on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if isinstance(model, bytes):  # the file with other weights: its external data is still beside the file
            from .onnx_weights import ONNX_FOLDER_KEY

            options.add_session_config_entry(ONNX_FOLDER_KEY, str(self.path.parent))
        return ort.InferenceSession(model, options, providers=_providers(self.device))

    def _spec(self, arg) -> Spec:
        name = arg.type.removeprefix("tensor(").removesuffix(")")
        dtype = DTYPES.get(_ONNX_TYPE_NAMES.get(name, name))
        if dtype is None:
            raise TypeError(f"{self.path.name}: tensor {arg.name} has type {arg.type}, not supported by this runtime")
        return resolve_shape(self.path.name, arg.name, arg.shape, self.shapes.get(arg.name)), dtype

    @staticmethod
    def _bind(bind, name: str, t: torch.Tensor) -> None:
        index = (t.device.index or 0) if t.device.type == "cuda" else 0
        bind(name, t.device.type, index, np.dtype(dtype_name(t.dtype)), list(t.shape), t.data_ptr())

    def prepare_weights(self, values: dict[str, torch.Tensor], base=None) -> Callable[[], None]:  # noqa: ARG002
        """A new session of this file with `values` (initializer name -> CPU tensor, the file's shape and dtype) in
        place of the file's, made beside the running one; returns what swaps it in (call it between two runs).

        The new values are written into the model before the session is made, so ONNX Runtime optimizes with them:
        `SessionOptions.add_initializer` was tried first, and its values are not what the CPU provider's blocked
        convolution layout (NCHWc, graph optimization level "all") is made from: convolutions kept the file's weights.

        An error (a name, shape or dtype the file lacks, out of memory) raises here, with the running session
        unchanged. The swap cannot fail: the new session's binding is bound to this runner's output tensors (the same
        ones, so what `run` returned stays valid), and every input is bound again on the next `run`. `base` is unused
        (a TensorRT refit reads it).
        """
        from .onnx_weights import with_initializers

        if self.owner is not self:  # one session for every size: made (and swapped) by the runner that owns it
            return self.owner.prepare_weights(values, base)
        session = self._session(with_initializers(self.path, values))
        bindings = []
        for runner in (self, *self.sharers):
            binding = session.io_binding()
            for name, t in runner.outputs.items():
                runner._bind(binding.bind_output, name, t)
            bindings.append((runner, binding))

        def swap() -> None:
            for runner, binding in bindings:
                runner.session, runner.binding = session, binding
                runner.bind_inputs.bound.clear()

        return swap

    def at_shapes(self, shapes: dict[str, tuple[int, ...]]) -> OnnxRunner:
        """A runner of the same session at other shapes (a dynamic-shape ONNX at another frame size)."""
        return OnnxRunner(self.path, self.device, self.threads, shapes, session_of=self)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.bind_inputs(inputs)
        # On CUDA, ORT waits for its stream (torch's) before returning; that sync is ORT's, not avoidable here.
        self.session.run_with_iobinding(self.binding)
        return self.outputs
