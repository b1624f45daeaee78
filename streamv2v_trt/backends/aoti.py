"""AOTInductor backend piece: one `.pt2` package (one network) run with named torch I/O.

`python -m build_engines --builder aoti` writes the package (build_engines/aoti.py) and stores our I/O contract
inside it as AOTInductor metadata, so the package itself says which tensors it takes and returns; this module
reads that contract, refuses a package built for another device, GPU or torch, and runs it.

Streams and CUDA graphs: the package is loaded with `run_single_threaded=True`. With no stream handle, AOTI's CUDA
runner enqueues on torch's current stream (`c10::cuda::getCurrentCUDAStream()` in the runner), so no cross-stream
sync is needed. The default (thread-safe) loader records a CUDA event after each run and, with its single model
instance, waits on the host (`cudaEventQuery` / `cudaEventSynchronize`) for the previous run before starting the
next: a host sync per call and illegal during stream capture. The single-threaded path has none of that, so `run`
can be captured in a CUDA graph. Run once before capturing: the first call does AOTI's one-time constant setup
and loads the kernels. Outputs are fresh tensors from torch's caching allocator on each call (from the graph's
pool under capture), not fixed buffers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import torch

from ..layout import DTYPES
from ..manifest import EngineMismatch
from .named_io import Spec

IO_KEY = "streamv2v_io"  # package metadata: JSON list of AotiTensor, inputs in call order, then outputs
BUILD_KEY = "streamv2v_build"  # package metadata: JSON {torch, device, capability, options}
REBUILD = "python -m build_engines --builder aoti"


@dataclass(frozen=True)
class AotiTensor:
    """One tensor of a package's I/O contract, as stored in its metadata."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of layout.DTYPES
    is_input: bool


def io_to_json(tensors: list[AotiTensor]) -> str:
    return json.dumps([asdict(t) for t in tensors])


def io_from_json(text: str, where: str) -> list[AotiTensor]:
    """The stored contract, checked: a malformed entry means the package was not written by our builder."""
    try:
        tensors = [
            AotiTensor(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"], bool(d["is_input"]))
            for d in json.loads(text)
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where}: unreadable {IO_KEY} metadata ({e}); rebuild it with {REBUILD}") from e
    for t in tensors:
        if t.dtype not in DTYPES:
            raise ValueError(f"{where}: tensor {t.name} has dtype {t.dtype}, not one of {sorted(DTYPES)}")
    return tensors


def device_capability(device: torch.device) -> str | None:
    """'9.0' on an H100/H200, None on the CPU: a package's CUDA kernels run only on the capability they target."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def build_info(device: torch.device, options: dict[str, object]) -> dict[str, object]:
    """What a package was compiled for; the runner refuses a package whose record differs from its own."""
    return {
        "torch": torch.__version__,
        "device": device.type,
        "capability": device_capability(device),
        "options": options,
    }


class AotiMismatch(EngineMismatch):
    """The package was built for another device, GPU or torch version (or not by build_engines)."""


def _package_metadata(path: Path) -> dict[str, str]:
    # Reads the archive without loading its shared library, so a foreign package is refused before dlopen.
    try:
        return dict(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(str(path), "model"))
    except RuntimeError as e:
        raise ValueError(f"{path} is not an AOTInductor package ({e}); rebuild it with {REBUILD}") from e


def _check_build(path: Path, meta: dict[str, str], device: torch.device) -> None:
    if IO_KEY not in meta or BUILD_KEY not in meta:
        raise AotiMismatch(f"{path.name} has no {IO_KEY}/{BUILD_KEY} metadata: not written by {REBUILD}; rebuild it")
    try:
        build = dict(json.loads(meta[BUILD_KEY]))
    except (ValueError, TypeError) as e:
        raise AotiMismatch(f"{path.name}: unreadable {BUILD_KEY} metadata ({e}); rebuild it with {REBUILD}") from e
    want = {"device": device.type, "torch": torch.__version__, "capability": device_capability(device)}
    diffs = [f"{k} {build.get(k)!r} (here {v!r})" for k, v in want.items() if build.get(k) != v]
    if diffs:
        raise AotiMismatch(
            f"{path.name} was compiled for another target: {', '.join(diffs)}. AOTInductor packages run only on the "
            f"device type, GPU compute capability and torch version they were compiled with; rebuild it on this "
            f"machine with {REBUILD}"
        )


class AotiRunner:
    """One AOTInductor package: `input_specs` / `output_specs` (name -> (shape, dtype)) and `run(inputs) -> outputs`.

    Not thread-safe (single-threaded loader, see the module docstring): one runner per thread.
    """

    def __init__(self, path: str | PathLike, device: torch.device | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"AOTInductor package {self.path} not found; build it with {REBUILD}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{self.path.name}: device {self.device} asked, but this torch has no CUDA device")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # tensors always carry an index
        meta = _package_metadata(self.path)
        _check_build(self.path, meta, self.device)
        tensors = io_from_json(meta[IO_KEY], self.path.name)
        self.input_specs: dict[str, Spec] = {t.name: (t.shape, DTYPES[t.dtype]) for t in tensors if t.is_input}
        self.output_specs: dict[str, Spec] = {t.name: (t.shape, DTYPES[t.dtype]) for t in tensors if not t.is_input}
        # Precomputed per-call checks, in the package's input order.
        self._inputs = tuple((n, torch.Size(s), d) for n, (s, d) in self.input_specs.items())
        self._staging: dict[str, torch.Tensor] = {}
        self._output_names = tuple(self.output_specs)

        from torch._inductor import aoti_load_package  # heavy import, only for this backend

        index = self.device.index if self.device.type == "cuda" else -1
        try:
            model = aoti_load_package(str(self.path), run_single_threaded=True, device_index=index)
        except RuntimeError as e:
            raise RuntimeError(f"AOTInductor could not load {self.path} ({e}); rebuild it with {REBUILD}") from e
        # The loader itself, not AOTICompiledModel.__call__, which parses the call spec and flattens a pytree every
        # call. Our call spec is a flat tuple of tensors in input order, checked here once.
        from torch.utils import _pytree as pytree

        n_in, n_out = (pytree.treespec_loads(spec).num_leaves for spec in model.loader.get_call_spec())
        if (n_in, n_out) != (len(self._inputs), len(self._output_names)):
            raise AotiMismatch(
                f"{self.path.name}: the compiled graph takes {n_in} inputs and returns {n_out} outputs, its metadata "
                f"lists {len(self._inputs)} and {len(self._output_names)}; rebuild it with {REBUILD}"
            )
        self._loader = model.loader
        self._run = model.loader.run

    @property
    def constant_names(self) -> frozenset[str]:
        """The package's replaceable constants by module name (`unet.conv_in.weight`); a package compiled with
        `freezing` lists its Linear/Conv2d weights as `_frozen_param<N>` (build_engines/aoti.py, DEFAULT_WEIGHTS)."""
        return frozenset(self._loader.get_constant_fqns())

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` (constant name -> new value) into the package's constants, between two runs.

        Every name is checked before any constant is written (the loader raises "Constant not found" first). The
        values are copied into the constants' own storage (`user_managed=False`), so the next run reads them all
        and `tensors` may be freed. The package loader in torch 2.13 offers no `swap_constant_buffer` (only its
        container runner does), so the active buffer is written; the runner is single-threaded, so no run is
        under way while it is written. Not to be called while a CUDA graph that replays this package is in
        flight (unmeasured on CUDA)."""
        unknown = sorted(set(tensors) - self.constant_names)
        if unknown:
            raise KeyError(f"{self.path.name}: no constants {unknown[:4]} in the package; rebuild it with {REBUILD}")
        values = {k: v.to(self.device) for k, v in tensors.items()}
        self._loader.load_constants(values, False, False, False)  # use_inactive, check_full_update, user_managed

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs by name; every input checked by name and shape, no host sync.

        The package reads raw memory with the example inputs' (contiguous) strides: a channels_last or sliced
        tensor would be read wrongly, not rejected. So an input of another dtype, device or layout is copied into
        a contiguous staging buffer (allocated on its first use), as the other engine backends do."""
        args = []
        try:
            for name, shape, dtype in self._inputs:
                t = inputs[name]
                if t.shape != shape:
                    raise ValueError(self._bad_input(name, t))
                if t.dtype != dtype or t.device != self.device or not t.is_contiguous():
                    staging = self._staging.get(name)
                    if staging is None:
                        staging = self._staging[name] = torch.empty(shape, dtype=dtype, device=self.device)
                    t = staging.copy_(t)
                args.append(t)
        except KeyError:
            missing = [n for n, _, _ in self._inputs if n not in inputs]
            raise KeyError(f"{self.path.name}: inputs {missing} not given (got {sorted(inputs)})") from None
        return dict(zip(self._output_names, self._run(args)))

    def _bad_input(self, name: str, t: torch.Tensor) -> str:
        shape, dtype = self.input_specs[name]
        return (
            f"{self.path.name}: input {name} is {tuple(t.shape)} {t.dtype} on {t.device}"
            f"; the package expects {shape} {dtype} on {self.device}"
        )
