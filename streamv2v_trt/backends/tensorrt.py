"""TensorRT / TensorRT-RTX backend: deserialize the three engines, bind every tensor by name, enqueue on torch's stream.

Per engine (as NVIDIA's demo/Diffusion `Engine`): outputs are torch buffers allocated once with the engine's
shapes and dtypes and their addresses set once; inputs are bound to the pipeline's fixed buffers (latents,
prompt, bank), so `set_tensor_address` runs on the first call and never again. `execute_async_v3` enqueues
on the current torch CUDA stream with no host sync, so a whole frame can be captured in a CUDA graph
(cuda_graph.py). The runtime never builds engines: `python -m build_engines` does.
"""

from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import torch

from ..engine.trt import import_tensorrt, trt_logger
from ..layout import BankLayout
from .binding import InputBinder, NamedIOBackend, Spec

log = logging.getLogger(__name__)


def _torch_dtypes(trt) -> dict:
    names = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
    return {getattr(trt, n): t for n, t in names.items() if hasattr(trt, n)}  # a flavour may lack some types


class TrtEngine:
    """One deserialized engine and its execution context, with named torch I/O."""

    def __init__(self, path: str | PathLike, trt, logger, device: torch.device) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"engine {self.path} not found; build it with python -m build_engines")
        self.device = device
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"could not deserialize {self.path} (errors logged above): it was built by another TensorRT version "
                "or flavour, or for another GPU. Rebuild it with python -m build_engines on this machine."
            )
        self.context = self.engine.create_execution_context()
        dtypes = _torch_dtypes(trt)
        self.input_specs: dict[str, Spec] = {}
        self.output_specs: dict[str, Spec] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.path.name}: tensor {name} has dynamic shape {shape}; engines are static")
            trt_dtype = self.engine.get_tensor_dtype(name)
            if trt_dtype not in dtypes:
                raise TypeError(f"{self.path.name}: tensor {name} has dtype {trt_dtype}, not supported by this runtime")
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.input_specs if is_input else self.output_specs)[name] = (shape, dtypes[trt_dtype])
        self.outputs = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in self.output_specs.items()}
        for name, t in self.outputs.items():
            self._set_address(name, t)
        self.bind_inputs = InputBinder(self.path.name, self.input_specs, device, self._set_address)

    def _set_address(self, name: str, t: torch.Tensor) -> None:
        if not self.context.set_tensor_address(name, t.data_ptr()):
            raise RuntimeError(f"{self.path.name}: set_tensor_address({name}) failed")

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.bind_inputs(inputs)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed (errors logged above)")
        return self.outputs


class TensorRTBackend(NamedIOBackend):
    """UNet, VAE encoder and VAE decoder engines, all on one CUDA device and torch's current stream."""

    name = "tensorrt"

    def __init__(
        self,
        unet: str | PathLike,
        vae_encoder: str | PathLike,
        vae_decoder: str | PathLike,
        layout: BankLayout,
        *,
        device: torch.device | str = "cuda",
        flavour: str = "auto",
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"the tensorrt backend runs on a CUDA GPU (asked {self.device}, CUDA available: "
                f"{torch.cuda.is_available()}); on a CPU use backend='onnxruntime' with the same build folder"
            )
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        trt, self.flavour = import_tensorrt(flavour)
        logger = trt_logger(trt)
        with torch.cuda.device(self.device):
            self._set_networks(
                TrtEngine(unet, trt, logger, self.device),
                TrtEngine(vae_encoder, trt, logger, self.device),
                TrtEngine(vae_decoder, trt, logger, self.device),
                layout,
            )
