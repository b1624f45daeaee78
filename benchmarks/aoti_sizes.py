"""`python -m benchmarks.aoti_sizes`: AOTInductor for several frame sizes, one package with dynamic height and width
against one static package per size (docs/BUILD.md, "Several frame sizes"; figures in docs/BENCHMARKS.md).

The tiny model's UNet (the network whose size matters; the VAEs make the same trade), fp32, on the CPU, swappable
weights (the CPU default: no freezing). In one process and one run:

- static: `build_engines.aoti.compile_aoti` per size, as `build_engines --sizes` builds them;
- dynamic: one `torch.export` with the latent height and width as dimensions (multiples of 8: frame sizes
  multiples of 64) and every bank token count as a dimension of its own (`Dim`; when that export fails, `Dim.AUTO`,
  which lets export relate them to the latent size), compiled once with the same AOTInductor options.

It prints compile seconds and package MB of each, then UNet calls per second of each package at each size,
interleaved in rounds (one torch thread) so a busy machine slows both alike, and the largest difference between
the dynamic and the static package's outputs on the same inputs. An export or compile that fails is printed with
its error, and the static figures still come.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from build_engines.aoti import aoti_options, compile_aoti
from build_engines.export import example_inputs, network_modules
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.spec import EngineSpec


def _spec(height: int, width: int) -> EngineSpec:
    return EngineSpec("tiny", height, width, precision="fp32")


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(h), int(w)


def compile_static(spec: EngineSpec, models, out: Path) -> tuple[Path, float]:
    modules, specs = network_modules(models, spec)
    unet = specs["unet"]
    inputs = example_inputs(unet)
    names_in = [s.name for s in unet if s.is_input]
    names_out = [s.name for s in unet if not s.is_input]
    path = out / f"unet-{spec.width}x{spec.height}.pt2"
    result = compile_aoti(modules["unet"], inputs, names_in, names_out, path, torch.device("cpu"))
    return path, result.seconds


def dynamic_shapes(unet, names_in: list[str], independent: bool) -> tuple:
    """`torch.export` dynamic shapes in `BankUNet.forward`'s structure (sample, timestep, text, bank_valid, banks):
    the latent height and width as 8 x a dimension (frame sizes multiples of 64, up to 4096), and each layer's bank
    token count (shared by its k, v and o) a dimension of its own (`independent`) or left to export to relate to
    the latent size (`Dim.AUTO`)."""
    from torch.export import Dim

    h8, w8 = Dim("h8", min=1, max=64), Dim("w8", min=1, max=64)
    dims: dict[str, dict[int, object]] = {"sample": {2: 8 * h8, 3: 8 * w8}}
    layer_dims: dict[str, object] = {}
    for s in unet:
        if s.role == "bank":  # [B, S*N, C]
            own = Dim(f"n{len(layer_dims)}", min=1, max=1 << 20) if independent else Dim.AUTO
            dims[s.name] = {1: layer_dims.setdefault(s.layer, own)}
    return (*[dims.get(n) for n in names_in[:4]], tuple(dims.get(n) for n in names_in[4:]))


def compile_dynamic(size: tuple[int, int], models, out: Path, independent: bool) -> tuple[Path, float]:
    """One package for every size, exported at `size`: see `dynamic_shapes`."""
    from torch._inductor import aoti_compile_and_package
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    modules, specs = network_modules(models, _spec(*size))
    unet = specs["unet"]
    inputs = example_inputs(unet)
    names_in = [s.name for s in unet if s.is_input]
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(
            modules["unet"],
            tuple(inputs[n] for n in names_in),
            dynamic_shapes=dynamic_shapes(unet, names_in, independent),
            strict=False,
        )
    print(f"dynamic export ({'independent' if independent else 'Dim.AUTO'} bank dims) in "
          f"{time.perf_counter() - start:.1f} s; ranges {program.range_constraints}")  # fmt: skip
    path = out / "unet-dynamic.pt2"
    tmp = Path(tempfile.mkdtemp(prefix=".dyn.", dir=out))
    try:
        with temporary_cache_dir(str(tmp / "inductor")), torch.inference_mode(False), torch.no_grad():
            package = aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=aoti_options(torch.device("cpu"))
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(package), time.perf_counter() - start


def _inputs(size: tuple[int, int], models) -> tuple[list[torch.Tensor], list[str]]:
    _, specs = network_modules(models, _spec(*size))
    unet = specs["unet"]
    inputs = example_inputs(unet, seed=1)
    return [inputs[s.name] for s in unet if s.is_input], [s.name for s in unet if not s.is_input]


def _loader(path: Path):
    from torch._inductor import aoti_load_package

    return aoti_load_package(str(path), run_single_threaded=True).loader


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.aoti_sizes", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="128x128,256x128", help="two or more WIDTHxHEIGHT, multiples of 64")
    p.add_argument("--calls", type=int, default=20, help="UNet calls per package, size and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [_size(s) for s in args.sizes.split(",")]
    models = load_models(_spec(*sizes[0]), device="cpu")
    out = Path(tempfile.mkdtemp(prefix="aoti_sizes."))
    figures: dict = {"sizes": [f"{w}x{h}" for h, w in sizes], "torch": torch.__version__, "threads": 1}
    try:
        static = {}
        for size in sizes:
            path, seconds = compile_static(_spec(*size), models, out)
            static[size] = path
            figures[f"static {size[1]}x{size[0]}"] = {"compile_s": round(seconds, 1), "mb": path.stat().st_size / 1e6}
            print(f"static {size[1]}x{size[0]}: compiled in {seconds:.1f} s, {path.stat().st_size / 1e6:.2f} MB")
        dyn_path = None
        for independent in (True, False):  # independent bank dims first; on failure, export relates them
            key = "dynamic independent" if independent else "dynamic auto"
            try:
                dyn_path, seconds = compile_dynamic(sizes[0], models, out, independent)
            except Exception as e:  # the finding is how it fails: printed, and the other figures still come
                figures[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                traceback.print_exc()
                continue
            figures["dynamic"] = figures[key] = {"compile_s": round(seconds, 1), "mb": dyn_path.stat().st_size / 1e6}
            print(f"{key}: exported and compiled in {seconds:.1f} s, {dyn_path.stat().st_size / 1e6:.2f} MB")
            break
        loaders = {("static", s): _loader(static[s]) for s in sizes}
        if dyn_path is not None:
            loaders.update({("dynamic", s): _loader(dyn_path) for s in sizes})
        inputs = {s: _inputs(s, models)[0] for s in sizes}
        times: dict[tuple[str, tuple[int, int]], list[float]] = {k: [] for k in loaders}
        for (kind, size), run in loaders.items():  # warm-up and the parity check
            out_static = loaders[("static", size)].run(inputs[size])
            got = run.run(inputs[size])
            diff = max(float((a - b).abs().max()) for a, b in zip(got, out_static))
            figures[f"{kind} {size[1]}x{size[0]} max_abs_diff_vs_static"] = diff
        for _ in range(args.rounds):
            for key, loader in loaders.items():
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    loader.run(inputs[key[1]])
                times[key].append(args.calls / (time.perf_counter() - t0))
        for (kind, size), fps in times.items():
            name = f"{kind} {size[1]}x{size[0]}"
            figures[f"{name} calls_per_s"] = round(statistics.median(fps), 1)
            print(f"{name}: {statistics.median(fps):.1f} UNet calls/s (median of {args.rounds} rounds of {args.calls})"
                  f", max |dynamic - static| {figures[name + ' max_abs_diff_vs_static']:.2e}")  # fmt: skip
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
