"""Where each UNet Linear / Conv2d weight lives in a build folder's `unet.onnx`: the map a LoRA writer needs to give
ONNX Runtime (overridden initializers) or TensorRT (a refitter's named weights) new values.

The exporter keeps some parameter names (`unet.conv_in.weight`, a Gemm's `...time_emb_proj.weight`) but folds the
transpose of every Linear that became a MatMul into a new constant (`val_115`, holding W.T), and the cleanup's
constant folding may rename or duplicate more. What survives is structure and value: an initializer is a weight
when a Conv or MatMul/Gemm reads it as its weight operand, the operator says whether it holds W or W.T (MatMul: W.T;
Gemm: W.T unless transB; Conv: W), and its bytes, so transformed, equal exactly one module's weight bytes. The map
is built from the file and the UNet with the very weights it was exported from (the folder's base weights), and
every module is checked: one without an initializer, or whose weight equals another module's (which of the two
initializers is which cannot be told), is left out and a LoRA that touches it is refused (`unmapped`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

# Weights are compared and moved as raw bits (integers of their width): bf16 has no numpy type.
_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Initializer:
    """One ONNX initializer holding a module's weight: `name`, and whether it holds the weight transposed (W.T)."""

    name: str
    transposed: bool

    def value(self, weight: torch.Tensor) -> torch.Tensor:
        """What this initializer holds for `weight` (contiguous)."""
        return (weight.T if self.transposed else weight).contiguous()


@dataclass(frozen=True)
class WeightMap:
    """Module name (in the UNet, e.g. `down_blocks.0.attentions.0.proj_in`) -> the initializers holding its weight."""

    path: Path
    initializers: dict[str, tuple[Initializer, ...]]
    problems: dict[str, str]  # module name -> why it has no initializer

    def values(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{initializer name: value} for {module name: weight}; every module must be mapped (`unmapped` first)."""
        return {i.name: i.value(w) for module, w in weights.items() for i in self.initializers[module]}

    def unmapped(self, modules: Iterable[str]) -> dict[str, str]:
        """The modules among `modules` this file cannot take new weights for, each with why."""
        missing = [m for m in modules if m not in self.initializers]
        return {m: self.problems.get(m, "not a Linear/Conv2d of the UNet") for m in missing}


def _weight_modules(unet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _bits(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _raw(init: TensorProto) -> np.ndarray:
    """The initializer's elements as integers of their width, in its shape (the bits, whatever the type)."""
    size = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    if init.raw_data:
        flat = np.frombuffer(init.raw_data, dtype=_BITS[size])
    else:  # typed fields (small tensors): numpy's own value, viewed as bits
        flat = np.ascontiguousarray(numpy_helper.to_array(init)).reshape(-1).view(_BITS[size])
    return flat.reshape(tuple(init.dims))


def _weight_bits(weight: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, bytes]:
    w = weight.detach().to("cpu").contiguous()
    return tuple(w.shape), w.dtype, _digest(w.view(_TORCH_BITS[w.element_size()]).numpy().tobytes())


_ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.DOUBLE: torch.float64,
}


def weight_initializers(model: onnx.ModelProto) -> dict[str, bool]:
    """The float initializers read only as an operator's weight, each with whether it holds W.T: a Conv's W (as
    is), a MatMul's B (W.T: x @ W.T), a Gemm's B (W.T unless transB). What a LoRA can change, by structure alone
    (no values needed: `load_external_data=False` is enough)."""
    inits = {i.name: i.data_type for i in model.graph.initializer}
    uses: dict[str, set[bool | None]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in inits:
                continue
            if node.op_type == "Conv" and index == 1:
                use = False
            elif node.op_type == "MatMul" and index == 1:
                use = True
            elif node.op_type == "Gemm" and index == 1:
                use = not next((a.i for a in node.attribute if a.name == "transB"), 0)
            else:
                use = None
            uses.setdefault(name, set()).add(use)
    # read as something else too (a shared constant), or not a float weight: not a weight
    return {n: next(iter(u)) for n, u in uses.items() if len(u) == 1 and None not in u and inits[n] in _ONNX_TO_TORCH}


def weight_map(onnx_path: str | PathLike, unet: nn.Module) -> WeightMap:
    """The initializers of `onnx_path` (a `BankUNet` export) that hold each Linear / Conv2d weight of `unet` (the
    diffusers UNet with the folder's base weights, in its precision), found by operator and exact bits."""
    path = Path(onnx_path)
    model = onnx.load(str(path))  # external data (unet.onnx.data) is read from beside it
    inits = {i.name: i for i in model.graph.initializer}
    candidates: dict[tuple, list[Initializer]] = {}  # (shape, dtype, digest of W's bits) -> initializers
    for name, transposed in weight_initializers(model).items():
        bits = _raw(inits[name])
        if transposed:
            if bits.ndim != 2:
                continue
            bits = bits.T
        key = (tuple(bits.shape), _ONNX_TO_TORCH[inits[name].data_type], _digest(_bits(bits)))
        candidates.setdefault(key, []).append(Initializer(name, transposed))
    del model, inits

    modules = _weight_modules(unet)
    keys = {name: _weight_bits(m.weight) for name, m in modules.items()}
    owners: dict[tuple, list[str]] = {}
    for name, key in keys.items():
        owners.setdefault(key, []).append(name)
    found, problems = {}, {}
    for name, key in keys.items():
        if key not in candidates:
            problems[name] = f"no initializer of {path.name} holds its weight {list(key[0])} {key[1]} (W or W.T)"
        elif len(owners[key]) > 1:
            others = [n for n in owners[key] if n != name]
            problems[name] = f"its weight equals that of {others[:2]}: which initializer is which cannot be told"
        else:
            found[name] = tuple(candidates[key])
    return WeightMap(path, found, problems)


def with_initializers(onnx_path: str | PathLike, values: dict[str, torch.Tensor]) -> bytes:
    """`onnx_path` serialized with the named initializers holding `values` (each checked against the initializer's
    shape and dtype; written inline); the other initializers stay as they are, external data included (the session
    is told where: `ONNX_FOLDER_KEY`)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    left = dict(values)
    for init in model.graph.initializer:
        t = left.pop(init.name, None)
        if t is None:
            continue
        t = t.detach().to("cpu").contiguous()
        have = (tuple(t.shape), t.dtype)
        want = (tuple(init.dims), _ONNX_TO_TORCH.get(init.data_type, f"onnx type {init.data_type}"))
        if have != want:
            raise ValueError(f"{Path(onnx_path).name}: initializer {init.name} is {want}, given {have}")
        raw = t.view(_TORCH_BITS[t.element_size()]).numpy().tobytes()
        init.CopyFrom(onnx.TensorProto(name=init.name, dims=init.dims, data_type=init.data_type, raw_data=raw))
    if left:
        raise KeyError(f"{Path(onnx_path).name} has no initializers {sorted(left)[:5]}")
    return model.SerializeToString()


# ONNX Runtime session option: where a model given as bytes finds its external data (unet.onnx.data).
ONNX_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def read_initializers(onnx_path: str | PathLike, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The values of the named initializers of `onnx_path` as CPU tensors (a refitter's missing weights)."""
    names = set(names)
    model = onnx.load(str(onnx_path))
    out = {}
    for init in model.graph.initializer:
        if init.name in names:
            out[init.name] = torch.from_numpy(_raw(init).copy()).view(_ONNX_TO_TORCH[init.data_type])
    missing = sorted(names - out.keys())
    if missing:
        raise KeyError(f"{Path(onnx_path).name} has no initializers {missing[:5]}")
    return out
