"""Frame sizes without a rebuild, build side: `EngineSpec.sizes` and `build_engines --sizes` (a list or a range), one
folder holding every size's networks, every size opened and checked, `NamedIOBackend.at_size`.

One shared two-size tiny fp32 --onnx-only build (64x64 and 128x64) against the single-size builds of each size; tests
that damage files copy it first. The AOTInductor two-size build (swappable weights reaching every size) is slow.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from test_build_cli import parse
from test_lora_swap import files  # noqa: F401  (the module's LoRA fixture, for the AOTInductor test)
from test_manifest import rebuild_config, refused

from build_engines import BuildConfig, build, stages
from build_engines.__main__ import build_parser
from streamv2v_trt import StreamConfig, StreamV2V
from streamv2v_trt.build_folder import open_build_folder
from streamv2v_trt.layout import NETWORKS
from streamv2v_trt.manifest import load_manifest, sha256_file
from streamv2v_trt.spec import MAX_SIZES, EngineSpec, parse_sizes

WIDE = (64, 128)  # (height, width): 128 wide, 64 high
SPEC = tiny_spec(sizes=((64, 64), WIDE))  # starts at 64x64 (the first size)
PROMPT = "a watercolor cat"

pytestmark = pytest.mark.usefixtures("one_thread")


def video(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly drifting random scene (consecutive frames similar, so fusion and merges happen)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def two(tiny_build) -> Path:
    return tiny_build(SPEC)


@pytest.fixture
def folder(two, tmp_path) -> Path:
    return shutil.copytree(two, tmp_path / "engines")


# -- the spec and the flag --------------------------------------------------------------------------------------


def test_a_list_and_a_range_parse_and_the_start_size_defaults_to_the_first():
    cfg = parse("--model", "tiny", "--sizes", "128x64,64x64")  # WIDTHxHEIGHT
    assert cfg.spec.sizes == ((64, 64), (64, 128)) and (cfg.spec.height, cfg.spec.width) == (64, 128)
    grid = parse("--model", "tiny", "--sizes", "64x64-192x128").spec
    assert grid.sizes == tuple((h, w) for h in (64, 128) for w in (64, 128, 192)) and grid.height == grid.width == 64
    assert parse("--model", "tiny", "--sizes", "64x64,128x64", "--width", "128").spec.width == 128
    # one size that is the start size is the plain single-size spec (the same build, the same folder)
    assert (
        parse("--model", "tiny", "--sizes", "96x64").spec
        == parse("--model", "tiny", "--width", "96", "--height", "64").spec
    )
    assert parse_sizes(" 512x512 , 768X512") == ((512, 512), (512, 768))


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--sizes", "64x64-4096x64"),
         f"is 64 sizes (64 widths x 1 heights, every multiple of 64); a build holds at most {MAX_SIZES}"),
        (("--sizes", "128x128-64x64"), "a range goes from the smaller WIDTHxHEIGHT to the larger"),
        (("--sizes", "512"), "a frame size is WIDTHxHEIGHT, e.g. 768x512; got '512'"),
    ],
)  # fmt: skip
def test_bad_sizes_are_refused_by_the_parser_with_what_to_do(flags, words, capsys):
    with pytest.raises(SystemExit):
        parse("--model", "tiny", *flags)
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"sizes": ((64, 64), (64, 96))}, "sizes 96x64: a build for several sizes needs multiples of 64"),
        ({"sizes": ((64, 64), (128, 128)), "height": 32}, "the start size 64x32 (--width x --height) is not among"),
        ({"sizes": ((64, 64), (64, 64), (128, 64))}, "name a size twice"),
    ],
)
def test_bad_size_sets_are_refused(fields, words):
    with pytest.raises(ValueError) as e:
        tiny_spec(**fields)
    assert words in str(e.value)


def test_a_build_for_sizes_serves_any_spec_within_them():
    built = tiny_spec(sizes=((64, 64), (64, 128), (128, 128)))
    assert built.differences(tiny_spec()) == []  # one of its sizes, single-size
    assert built.differences(tiny_spec(height=64, width=128)) == []  # another start size
    assert built.differences(replace(built, height=128, width=128)) == []
    assert built.differences(tiny_spec(sizes=((64, 64), (128, 128)))) == []  # a subset
    assert built.differences(tiny_spec(height=128, width=64)) == [
        "sizes: engines have 64x64,128x64,128x128, asked 64x128 (64x128 not built)"
    ]
    assert tiny_spec().differences(built) == [
        "sizes: engines have 64x64, asked 64x64,128x64,128x128 (128x64,128x128 not built)"
    ]


def test_folder_names_differ_per_size_set_and_stay_readable():
    names = {
        tiny_spec().folder_name(),
        SPEC.folder_name(),
        tiny_spec(sizes=((64, 64), (128, 128))).folder_name(),
        tiny_spec(sizes=parse_sizes("64x64-192x128")).folder_name(),
        tiny_spec(sizes=parse_sizes("64x64,128x64,64x128,320x320,448x64")).folder_name(),
        tiny_spec(sizes=parse_sizes("64x64,128x64,64x128,320x320,512x64")).folder_name(),
    }
    assert len(names) == 6
    assert SPEC.folder_name() == "tiny-64x64-128x64-b1-dyme1-taesd-fp32"  # a whole range: smallest-largest
    assert "tiny-64x64+128x128-b1-dyme1-taesd-fp32" in names and "tiny-64x64-192x128-b1-dyme1-taesd-fp32" in names
    assert SPEC.folder_name() == replace(SPEC, width=128).folder_name()  # the start size is not part of the build


def test_json_round_trip_and_older_specs_without_sizes():
    assert EngineSpec.from_json(SPEC.to_json()) == SPEC and SPEC.to_json()["sizes"] == ["64x64", "128x64"]
    old = {k: v for k, v in tiny_spec().to_json().items() if k != "sizes"}
    assert EngineSpec.from_json(old) == tiny_spec() and tiny_spec().served_sizes == ((64, 64),)


def test_build_command_parses_back_into_a_multi_size_spec():
    for spec in (SPEC, replace(SPEC, width=128), EngineSpec("sd-turbo", sizes=parse_sizes("512x512-768x768"))):
        argv = shlex.split(spec.build_command("out"))
        assert "--sizes" in argv and parse(*argv[3:]).spec == spec


def test_progress_names_every_size():
    assert stages(None) == stages(None, ((64, 64),)) and "export unet" in stages(None)
    descs = stages("tensorrt-rtx", SPEC.sizes)
    assert len(descs) == 2 * len(stages("tensorrt-rtx")) and "build vae_decoder 128x64" in descs
    assert stages("aoti", SPEC.sizes) == [f"compile {n} {s}" for s in ("64x64", "128x64") for n in NETWORKS]


# -- the two-size folder ---------------------------------------------------------------------------------------


def test_the_folder_holds_every_size_under_one_naming_rule(two):
    manifest = load_manifest(two)
    assert manifest.spec == SPEC and list(manifest.size_networks) == ["128x64"]
    for (h, w), networks in manifest.sized_networks().items():
        for name in NETWORKS:
            entry = networks[name].files["onnx"]
            assert entry.name == f"{name}-{w}x{h}.onnx" and sha256_file(two / entry.name) == entry.sha256
        assert next(t for t in networks["vae_encoder"].tensors if t.name == "images").shape == (1, 3, h, w)
    assert sorted(p.name for p in two.glob("*.onnx")) == sorted(
        f"{n}-{s}.onnx" for n in NETWORKS for s in ("64x64", "128x64")
    )


def test_rerun_reuses_every_size(folder):
    descs = []
    result = build(BuildConfig(SPEC, out=folder, onnx_only=True), progress=descs.append)
    assert result.reused and descs == [f"{d} (reused)" for d in stages(None, SPEC.sizes)]
    assert {a.size for a in result.artifacts} == {"64x64", "128x64"} and "unet 128x64" in result.summary()


def test_every_size_opens_and_at_size_switches_runners(two):
    opened = open_build_folder(two, "onnxruntime", threads=1)
    backend = opened.backend
    assert backend.sizes == ((64, 64), WIDE) and backend.size == (64, 64) and backend.at_size(64, 64) is backend
    wide = backend.at_size(*WIDE)
    assert wide.size == WIDE and wide.sizes == backend.sizes and wide.lora_weights is backend.lora_weights
    assert wide.networks is not backend.networks and wide.dtype == backend.dtype
    assert [layer.tokens * 2 for layer in backend.layout.layers] == [layer.tokens for layer in wide.layout.layers]
    assert wide.at_size(64, 64).networks is backend.networks  # back: the first size's runners
    at_wide = open_build_folder(two, "onnxruntime", StreamConfig(replace(SPEC, width=128)), threads=1)
    assert at_wide.backend.size == WIDE and at_wide.backend.sizes == backend.sizes


@pytest.mark.parametrize("size", [(64, 64), WIDE])
def test_each_size_streams_as_a_single_size_folder_does(two, tiny_build, size):
    """The stream on the two-size folder at `size` (opened there, and switched there with at_size) equals one on
    a folder built for that size alone: the same export of the same module at the same shapes, run by ONNX Runtime."""
    h, w = size
    alone = StreamV2V.from_engines(tiny_build(tiny_spec(height=h, width=w)), "onnxruntime", prompt=PROMPT, threads=1)
    cfg = StreamConfig(replace(SPEC, height=h, width=w))
    opened = StreamV2V.from_engines(two, "onnxruntime", cfg, prompt=PROMPT, threads=1)
    first = StreamV2V.from_engines(two, "onnxruntime", prompt=PROMPT, threads=1)
    switched = StreamV2V(first.backend.at_size(h, w), first.prompt_encoder, first.scheduler, cfg)
    switched.update_prompt(PROMPT)
    assert opened.backend.size == switched.backend.size == size
    for i, frame in enumerate(video(9, h, w)):  # frames 0, 4, 8 store and merge the bank
        want = alone(frame)
        assert want.shape == (h, w, 3)
        for s in (opened, switched):
            # The same ONNX graph on the same inputs: ORT computes the same numbers, so no tolerance.
            assert np.array_equal(s(frame), want), f"frame {i}"
            torch.testing.assert_close(s.latents, alone.latents, atol=0, rtol=0)


def test_a_size_not_built_is_refused_with_the_rebuild_command(two):
    backend = open_build_folder(two, "onnxruntime", threads=1).backend
    with pytest.raises(ValueError) as e:
        backend.at_size(128, 128)
    message = str(e.value)
    assert message.startswith("the build folder has frame sizes 64x64,128x64, not 128x128; rebuild: "), message
    argv = shlex.split(message.split("rebuild: ", 1)[1].split(" (writes ", 1)[0])
    cfg = build_parser().parse_args(argv[3:])
    assert "--sizes" in argv and cfg.sizes == ((64, 64), (64, 128), (128, 128))
    with pytest.raises(ValueError, match="not 72x64, and no build can add it: sizes 72x64: a build for several"):
        backend.at_size(64, 72)
    asked = tiny_spec(height=128, width=128)
    message = refused(two, cfg=StreamConfig(asked))
    assert "sizes: engines have 64x64,128x64, asked 128x128 (128x128 not built)" in message
    assert rebuild_config(message).spec == asked


def test_a_damaged_file_of_another_size_is_refused(folder):
    with open(folder / "unet-128x64.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    (folder / "vae_decoder-128x64.onnx").unlink()
    message = refused(folder)  # opened at 64x64, whose files are intact: every size is checked
    assert f"unet: file {folder / 'unet-128x64.onnx'} was altered or truncated" in message
    assert f"vae_decoder: file {folder / 'vae_decoder-128x64.onnx'} is missing" in message
    cfg = rebuild_config(message)
    assert (cfg.spec, cfg.out) == (SPEC, folder)  # the same spec: rebuilt in place
    # asked for one of its sizes alone, the folder is still rebuilt with every size it holds
    message = refused(folder, cfg=StreamConfig(tiny_spec(height=64, width=128)))
    assert rebuild_config(message).spec == replace(SPEC, width=128) and rebuild_config(message).out == folder


def test_a_tensor_of_another_size_is_checked_three_ways(folder):
    d = json.loads((folder / "manifest.json").read_text())
    (t,) = [t for t in d["size_networks"]["128x64"]["unet"]["tensors"] if t["name"] == "bank_k.0"]
    t["dtype"] = "float16"
    (folder / "manifest.json").write_text(json.dumps(d))
    message = refused(folder, threads=1)
    assert f"unet at 128x64 bank_k.0: manifest has input {t['shape']} float16, expected input" in message, message
    del d["size_networks"]["128x64"]["vae_encoder"]
    (folder / "manifest.json").write_text(json.dumps(d))
    assert "networks missing from the manifest at 128x64: vae_encoder" in refused(folder)


def test_a_manifest_without_sizes_still_opens(tiny_build, tmp_path):
    """A folder written before sizes existed: no `sizes` in its spec, no `size_networks`."""
    folder = shutil.copytree(tiny_build(tiny_spec()), tmp_path / "old")
    d = json.loads((folder / "manifest.json").read_text())
    del d["spec"]["sizes"], d["size_networks"]
    (folder / "manifest.json").write_text(json.dumps(d))
    stream = StreamV2V.from_engines(folder, "onnxruntime", prompt=PROMPT, threads=1)
    assert stream.backend.sizes == ((64, 64),) and stream(video(1, 64, 64)[0]).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="has frame sizes 64x64, not 128x64; rebuild: python -m build_engines"):
        stream.backend.at_size(*WIDE)


@pytest.mark.slow
def test_aoti_swappable_weights_reach_every_size(tiny_build, files, monkeypatch):  # noqa: F811
    """One AOTInductor build for two sizes: the LoRA set on the stream at one size is in the other size's package
    too (one CPU base copy, written into both), and a write that fails at one size leaves every size on the set it
    had. Bound: test_aoti_loras.py's AOTI-vs-eager bound."""
    from test_aoti_loras import assert_close_frames

    from streamv2v_trt.lora_set import lora_specs

    folder = tiny_build(SPEC, builder="aoti")
    manifest = load_manifest(folder)
    assert manifest.weights == "swappable" and manifest.has("package") and (folder / "unet-128x64.pt2").is_file()
    s = StreamV2V.from_engines(folder, "aoti", prompt=PROMPT)
    s.set_loras([(files["a"], 0.8)])
    assert len(s.backend.lora_weights.runners) == 2
    cfg = StreamConfig(replace(s.cfg.spec, width=128))
    wide = StreamV2V(s.backend.at_size(*WIDE), s.prompt_encoder, s.scheduler, cfg)
    wide.update_prompt(PROMPT)
    fused = tiny_spec(height=64, width=128, loras=lora_specs([(files["a"], 0.8)]))
    assert_close_frames(wide, StreamV2V.from_pretrained(fused, prompt=PROMPT), video(5, *WIDE))

    def refuse(tensors):
        raise RuntimeError("no room for the constants")

    monkeypatch.setattr(s.backend.lora_weights.runners[1], "load_weights", refuse)  # the 128x64 package
    with pytest.raises(RuntimeError, match="no room"):
        s.set_loras([(files["b"], 1.0)])  # written into the 64x64 package first, then taken back
    monkeypatch.undo()
    assert s.cfg.spec.loras == fused.loras
    s.reset()
    at_start = StreamV2V.from_pretrained(replace(fused, width=64), prompt=PROMPT)
    assert_close_frames(s, at_start, video(5, 64, 64))


@pytest.mark.slow
def test_tensorrt_rtx_builds_an_engine_per_size_from_the_folders_onnx(folder):
    """TensorRT-RTX builds on the CPU: over the two-size ONNX folder, each size's ONNX is reused (no model loaded)
    and gets its engine, named by the same rule, listed and hashed per size."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[trt-rtx]')")
    descs = []
    result = build(BuildConfig(SPEC, out=folder, builder="tensorrt-rtx"), progress=descs.append)
    assert descs == [d if d.startswith("build") else f"{d} (reused)" for d in stages("tensorrt-rtx", SPEC.sizes)]
    manifest = load_manifest(folder)
    assert manifest.builder == "tensorrt-rtx" and manifest.has("engine") and manifest.has("onnx")
    assert manifest.network("unet", WIDE).files["engine"].name == "unet-128x64.engine"
    assert manifest.file_problems(folder, ("onnx", "engine")) == []
    assert sorted(a.path.name for a in result.artifacts if a.kind == "engine") == sorted(
        f"{n}-{s}.engine" for n in NETWORKS for s in ("64x64", "128x64")
    )
    (folder / "vae_encoder-128x64.engine").write_bytes(b"truncated")
    message = refused(folder, "tensorrt")  # the engine of the size a stream does not start at is checked too
    assert f"vae_encoder: file {folder / 'vae_encoder-128x64.engine'} was altered or truncated" in message


def test_the_stream_clis_start_a_multi_size_folder_at_any_built_size(two):
    """`video`/`serve --height/--width`: a size the folder was built for opens it at that size; another is refused
    naming the built sizes, with the command that builds them and the asked one (when a multi-size build takes it)."""
    from streamv2v_trt.cli.main import build_parser as cli_parser
    from streamv2v_trt.cli.stream_args import CliError, resolve_spec

    def spec(*size_flags: str) -> EngineSpec:
        args = cli_parser().parse_args(["video", "a.mp4", "b.mp4", "--prompt", "x", "--engines", str(two), *size_flags])
        return resolve_spec(args, torch.device("cpu"), load_manifest(two))

    assert (spec().height, spec().width) == (64, 64)
    wide = spec("--height", "64", "--width", "128")
    assert (wide.height, wide.width) == WIDE and wide.served_sizes == SPEC.served_sizes
    assert open_build_folder(two, "onnxruntime", StreamConfig(wide)).backend.layout == (
        open_build_folder(two, "onnxruntime").backend.at_size(*WIDE).layout
    )
    with pytest.raises(CliError, match=r"frame sizes 64x64,128x64, not 96x64: pick one \(.*multiples of 64"):
        spec("--width", "96")
    with pytest.raises(CliError, match=r"not 192x64: pick one, or rebuild: python -m build_engines .*--sizes "
                       r"64x64,128x64,192x64"):  # fmt: skip
        spec("--width", "192")
