"""Imports run one way (spec <- algorithm <- models <- runtime <- build <- surfaces), and importing the package
does not load the model libraries an engines-only user does not need."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Module name prefixes -> layer; the longest matching prefix wins. A module may import its own layer or lower.
LAYERS = {
    "streamv2v_trt.spec": 0,
    "streamv2v_trt.config": 0,
    "streamv2v_trt.console": 0,
    "streamv2v_trt.presets": 0,
    "streamv2v_trt.flavours": 0,
    "streamv2v_trt.flags": 0,
    "streamv2v_trt.frame_sizes": 0,
    "streamv2v_trt.kernels": 1,
    "streamv2v_trt.layout": 1,
    "streamv2v_trt.attention": 1,
    "streamv2v_trt.bank": 1,
    "streamv2v_trt.schedule": 1,
    "streamv2v_trt.blending": 1,
    "streamv2v_trt.frames": 1,
    "streamv2v_trt.similar_filter": 1,
    "streamv2v_trt.images": 1,
    "streamv2v_trt.clips": 1,
    "streamv2v_trt.control_images": 1,
    "streamv2v_trt.models": 2,
    "streamv2v_trt.bank_unet": 2,
    "streamv2v_trt.control_net": 2,
    "streamv2v_trt.vae": 2,
    "streamv2v_trt.prompt": 2,
    "streamv2v_trt.pipeline": 3,
    "streamv2v_trt.stream": 3,
    "streamv2v_trt.cuda_graph": 3,
    "streamv2v_trt.graph_cache": 3,
    "streamv2v_trt.edge": 3,
    "streamv2v_trt.multistream": 3,
    "streamv2v_trt.lora_set": 3,
    "streamv2v_trt.source": 3,
    "streamv2v_trt.opening": 3,
    "streamv2v_trt.manifest": 3,
    "streamv2v_trt.build_folder": 3,
    "streamv2v_trt.backends": 3,
    "streamv2v_trt.serving": 3,
    "streamv2v_trt.hub": 3,
    "streamv2v_trt.client_limits": 3,
    "build_engines": 4,
    "streamv2v_trt.cli": 5,
    "streamv2v_trt.web": 5,
    "streamv2v_trt.video_io": 5,
    "streamv2v_trt.metrics": 5,
    "streamv2v_trt.__main__": 5,
    "benchmarks": 5,
}
NAMES = ["spec", "algorithm", "models", "runtime", "build", "surfaces"]


def layer(module: str) -> int | None:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # `from x import sub` may be a module
    return found


def sources() -> list[Path]:
    files = []
    for top in ("streamv2v_trt", "build_engines", "benchmarks"):
        files += sorted((ROOT / top).rglob("*.py"))
    return [f for f in files if f.name != "__init__.py" or f.parent.name != "streamv2v_trt"]  # the API facade


def test_every_module_has_a_layer():
    missing = [module_name(f) for f in sources() if layer(module_name(f)) is None]
    assert not missing, f"modules without a layer in tests/test_imports.py: {missing}"


def test_imports_run_one_way():
    upward = []
    for path in sources():
        own = layer(module_name(path))
        for line, target in imports(path):
            other = layer(target)
            if other is not None and other > own:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({NAMES[own]}) imports {target} ({NAMES[other]})")
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    bad = ROOT / "streamv2v_trt" / "bank.py"
    assert any(layer(t) == 1 for _, t in imports(bad))  # sanity: it resolves relative imports
    fake = tmp_path / "streamv2v_trt" / "layout.py"
    fake.parent.mkdir()
    fake.write_text("from .cli.stream_args import CliError\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [t for _, t in imports(fake)] == ["streamv2v_trt.cli.stream_args.CliError"]
    assert layer("streamv2v_trt.cli.stream_args.CliError") > layer("streamv2v_trt.layout")


def test_importing_the_package_loads_no_model_library():
    code = (
        "import sys, streamv2v_trt, streamv2v_trt.cuda_graph, streamv2v_trt.build_folder, streamv2v_trt.manifest; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'onnx', 'tensorrt_rtx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
