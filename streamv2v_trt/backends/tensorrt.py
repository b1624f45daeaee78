"""TensorRT / TensorRT-RTX: deserialize an engine, bind every tensor by name, enqueue on torch's stream.

Per engine (as NVIDIA's demo/Diffusion `Engine`): outputs are torch buffers allocated once with the engine's
shapes and dtypes and their addresses set once; inputs are bound to the pipeline's fixed buffers (latents,
prompt, bank), so `set_tensor_address` runs on the first call and never again. `execute_async_v3` enqueues
on the current torch CUDA stream with no host sync, so a whole frame can be captured in a CUDA graph
(cuda_graph.py). The runtime never builds engines: `python -m build_engines` does.

An engine with an optimisation profile (`build_engines --shapes dynamic`) serves every frame size of its folder:
one runner per size, each with its own execution context (its input shapes set once, its own output buffers), all
on the one deserialized engine (`TrtRunner.at_shapes`), so the weights are on the GPU once and a refit reaches every
size. On TensorRT-RTX the contexts specialise their kernels for their shapes when first run (EAGER: before a CUDA
graph captures them) and share one runtime cache.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from os import PathLike
from pathlib import Path

import torch

from ..flavours import Builder
from ..layout import DTYPES
from .named_io import InputBinder, Spec, resolve_shape
from .tensorrt_import import import_tensorrt, rtx_refusal, rtx_runs_on, trt_logger

log = logging.getLogger(__name__)

# TensorRT DataType names -> the names of layout.DTYPES.
_TRT_TYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}

# torch dtype -> TensorRT DataType, for refit weights (the module is imported lazily: a function of it)
_TRT_DTYPES = {
    torch.float32: lambda trt: trt.float32,
    torch.float16: lambda trt: trt.float16,
    torch.bfloat16: lambda trt: trt.bfloat16,
}


def check_device(device: torch.device, flavour: str) -> torch.device:
    """The CUDA device engines of `flavour` will run on; refuses a CPU and a GPU that TensorRT-RTX cannot run on."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"the tensorrt backend runs on a CUDA GPU (asked {device}, CUDA available: {torch.cuda.is_available()}); "
            "on a CPU use --backend onnxruntime (Python: backend='onnxruntime') with the same build folder"
        )
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device)
    if flavour == Builder.TENSORRT_RTX and not rtx_runs_on(capability):
        raise RuntimeError(rtx_refusal(capability, torch.cuda.get_device_name(device)))
    return device


class TrtRunner:
    """One deserialized engine and its execution context, with named torch I/O. `shapes` (name -> shape): the
    inputs' shapes where the engine's are dynamic (a dynamic-shape build's, at one size)."""

    def __init__(
        self, path: str | PathLike, device: torch.device, flavour: str,
        shapes: dict[str, tuple[int, ...]] | None = None, *, engine_of: TrtRunner | None = None,
    ) -> None:  # fmt: skip
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine {self.path} not found; build it with python -m build_engines")
        self.device, self.flavour, self.shapes = device, flavour, shapes or {}
        trt, _ = import_tensorrt(flavour)
        self.owner = engine_of.owner if engine_of is not None else self  # the runner that deserialized the engine
        with torch.cuda.device(device):
            if self.owner is self:
                self.runtime = trt.Runtime(trt_logger(trt))
                self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
                if self.engine is None:
                    raise RuntimeError(
                        f"could not deserialize {self.path} (errors logged above): it was built by another TensorRT "
                        "version or flavour, or for another GPU. Rebuild it with python -m build_engines on this "
                        "machine."
                    )
                self.runtime_cache = None  # TensorRT-RTX: its kernels specialised per shape, shared by the contexts
            else:
                self.runtime, self.engine = self.owner.runtime, self.owner.engine
            self.context = self._context(trt)
        self.input_specs: dict[str, Spec] = {}
        self.output_specs: dict[str, Spec] = {}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {name: self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        for name in names:  # every input's shape first: an output's follows from them
            if is_input[name]:
                shape = resolve_shape(self.path.name, name, self.engine.get_tensor_shape(name), self.shapes.get(name))
                if not self.context.set_input_shape(name, shape):
                    raise ValueError(
                        f"{self.path.name}: input {name} {list(shape)} is outside the engine's optimisation profile "
                        f"(the frame sizes it was built for); rebuild it with python -m build_engines"
                    )
                self.input_specs[name] = (shape, self._dtype(name))
        for name in names:
            if not is_input[name]:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ValueError(f"{self.path.name}: output {name} has shape {shape} after every input's was set")
                self.output_specs[name] = (shape, self._dtype(name))
        self.outputs = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in self.output_specs.items()}
        for name, t in self.outputs.items():
            self._set_address(name, t)
        self.bind_inputs = InputBinder(self.path.name, self.input_specs, device, self._set_address)

    def _dtype(self, name: str) -> torch.dtype:
        trt_dtype = self.engine.get_tensor_dtype(name)
        dtype = DTYPES.get(_TRT_TYPE_NAMES.get(trt_dtype.name, ""))
        if dtype is None:
            raise TypeError(f"{self.path.name}: tensor {name} has dtype {trt_dtype}, not supported by this runtime")
        return dtype

    def _context(self, trt):
        """An execution context. A TensorRT-RTX engine with dynamic shapes: kernels specialised for this context's
        shapes (EAGER: the first run compiles them, which the warm-up before a CUDA graph capture does, rather than
        a generic kernel running while they compile in the background), in a runtime cache every size's context
        shares. A static engine's context as before."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        dynamic = any(d < 0 for name in names for d in self.engine.get_tensor_shape(name))
        if self.flavour != Builder.TENSORRT_RTX or not dynamic:
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        config.dynamic_shapes_kernel_specialization_strategy = trt.DynamicShapesKernelSpecializationStrategy.EAGER
        if self.owner.runtime_cache is None:
            self.owner.runtime_cache = config.create_runtime_cache()
        config.set_runtime_cache(self.owner.runtime_cache)
        return self.engine.create_execution_context(config)

    def at_shapes(self, shapes: dict[str, tuple[int, ...]]) -> TrtRunner:
        """A runner of the same engine (its weights, its refits) at other input shapes: a context of its own."""
        return TrtRunner(self.path, self.device, self.flavour, shapes, engine_of=self)

    def _set_address(self, name: str, t: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"{self.path.name}: set_tensor_address({name}) failed")

    def prepare_weights(
        self, values: dict[str, torch.Tensor], base: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    ) -> Callable[[], None]:
        """Refit (engines built with `--weights swappable`: REFIT_INDIVIDUAL): `values` (ONNX initializer name -> CPU
        tensor with the initializer's shape and dtype) are set on a `Refitter`, with whatever else the engine combined
        them with (`get_missing_weights`, read by `base(names)`: the ONNX's values); returns what refits the engine
        (call it between two runs). A name the engine lacks raises here, with the engine unchanged."""
        if self.owner is not self:  # one engine for every size: refit once
            return self.owner.prepare_weights(values, base)
        trt, _ = import_tensorrt(self.flavour)
        if not self.engine.refittable:
            raise RuntimeError(
                f"{self.path.name} is not refittable (built with --weights frozen); rebuild it with --weights swappable"
            )
        refitter = trt.Refitter(self.engine, trt_logger(trt))
        known = set(refitter.get_all_weights())
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(f"{self.path.name} has no refittable weights {unknown[:5]} (it has {len(known)})")
        kept = {}  # TensorRT reads the host memory when it refits: alive until then

        def set_weights(tensors: dict[str, torch.Tensor]) -> None:
            for name, t in tensors.items():
                t = kept[name] = t.detach().to("cpu").contiguous()
                weights = trt.Weights(_TRT_DTYPES[t.dtype](trt), t.data_ptr(), t.numel())
                if not refitter.set_named_weights(name, weights):
                    raise RuntimeError(f"{self.path.name}: set_named_weights({name}) refused {list(t.shape)} {t.dtype}")

        set_weights(values)
        missing = list(refitter.get_missing_weights())
        # Weights the engine combined with the ones set (say q, k, v into one matmul): every weight a LoRA set ever
        # touched is in `values`, so the missing ones still hold the file's values.
        if missing:
            if base is None:
                raise RuntimeError(f"{self.path.name}: a refit also needs {missing[:5]}; no ONNX to read them from")
            set_weights(base(missing))

        def refit() -> None:
            # "undefined if the engine has pending enqueued work": every stream (a CudaGraphStream runs on its own)
            torch.cuda.synchronize(self.device)
            if not refitter.refit_cuda_engine():
                raise RuntimeError(f"{self.path.name}: refit_cuda_engine failed (errors logged above)")
            kept.clear()

        return refit

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.bind_inputs(inputs)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed (errors logged above)")
        return self.outputs
