"""manifest.json and `open_build_folder`: every field of the spec, the weights, the builder, the files and the
tensors (names, shapes, dtypes) are checked, and every refusal says what differs and how to rebuild; the build
cache reuses an intact build, `--force` rebuilds it and a changed spec rebuilds it.

All of it on one shared tiny fp32 --onnx-only build (32x32, 2 steps); tests that damage files copy it first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_spec

from build_engines import BuildConfig, build, stages
from build_engines.__main__ import build_parser, config_from_args, main
from streamv2v_trt import BankConfig, StreamConfig, StreamV2V
from streamv2v_trt.build_folder import check_io, open_build_folder
from streamv2v_trt.layout import DTYPES, NETWORKS, bank_layout
from streamv2v_trt.manifest import FORMAT_VERSION, EngineMismatch, FileEntry, load_manifest, sha256_file
from streamv2v_trt.models.loader import find_weights, load_text, unet_skeleton
from streamv2v_trt.prompt import text_shape
from streamv2v_trt.spec import EngineSpec, LoraSpec

SPEC = tiny_spec(height=32, width=32, steps=2)
FIFO = replace(SPEC, bank="fifo", bank_frames=2)


@pytest.fixture(scope="module")
def built(tiny_build) -> Path:
    return tiny_build(SPEC)


@pytest.fixture
def folder(built, tmp_path) -> Path:
    """A private copy of the build that a test may damage."""
    return shutil.copytree(built, tmp_path / "engines")


def edit_manifest(folder: Path, edit) -> None:
    """Edit manifest.json as JSON (its own contents are not hashed: only the files it lists are)."""
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def refused(folder, backend="onnxruntime", cfg=None, **kwargs) -> str:
    with pytest.raises(EngineMismatch) as e:
        StreamV2V.from_engines(folder, backend, cfg, **kwargs)
    return str(e.value)


# A spec other than the folder's is rebuilt into its own folder (the naming rule), which the refusal names.
WRITES = re.compile(r" \(writes (?P<folder>\S+); open that folder\)$")


def rebuild_command(message: str) -> str:
    assert "Rebuild: python -m build_engines " in message, message
    return message.split("Rebuild: ", 1)[1].split(" The folder was built with", 1)[0]  # before a LoRA hint


def written_folder(message: str) -> Path | None:
    """Where the rebuild command of a refusal writes when that is not the refused folder."""
    match = WRITES.search(rebuild_command(message))
    return Path(match["folder"]) if match else None


def rebuild_config(message: str) -> BuildConfig:
    """The `Rebuild: python -m build_engines ...` command of a refusal, parsed as the CLI parses it."""
    argv = shlex.split(WRITES.sub("", rebuild_command(message)))
    assert argv[:3] == ["python", "-m", "build_engines"], argv
    return config_from_args(build_parser().parse_args(argv[3:]))


def test_matching_folder_is_opened(built):
    opened = open_build_folder(built, "onnxruntime", threads=1)
    manifest = opened.manifest
    assert manifest.spec == SPEC and opened.cfg.spec == SPEC
    assert opened.cfg.t_index_list == SPEC.default_t_index_list() and opened.cfg.bank == BankConfig()
    assert manifest.weights_hash == find_weights(SPEC).hash(SPEC.vae) and manifest.random_weights
    assert (manifest.builder, manifest.builder_version, manifest.target) == (None, None, {})
    assert manifest.ff_layers and all(name.endswith("attn1") for name in manifest.ff_layers)
    assert all(SPEC.fuses(name) for name in manifest.ff_layers)
    assert sorted(manifest.networks) == sorted(NETWORKS) and manifest.has("onnx") and not manifest.has("engine")
    for name, net in manifest.networks.items():
        assert net.files == {"onnx": FileEntry(f"{name}.onnx", sha256_file(built / f"{name}.onnx"))}
    unet = {t.name: t for t in manifest.network("unet").tensors}
    bank = [t for t in unet.values() if t.role == "bank"]
    assert bank and all(t.layer and t.dtype == "float32" and t.shape[0] == 2 for t in bank)
    assert unet["timestep"].dtype == "int64" and unet["sample"].shape == (2, 4, 4, 4)
    assert manifest.created and manifest.exporter.startswith("torch ") and manifest.format_version == FORMAT_VERSION
    assert manifest.build_command == SPEC.build_command(built, onnx_only=True)
    assert rebuild_config(f"Rebuild: {manifest.build_command}").spec == SPEC
    backend = opened.backend
    assert (backend.name, backend.device, backend.dtype) == ("onnxruntime", torch.device("cpu"), torch.float32)
    assert [t.name for t in manifest.network("unet").inputs()] == backend.layout.input_names()


def test_runtime_settings_and_self_guidance_are_not_refused(built):
    # Timestep values, noise seed, bank interval and guidance scale are runtime inputs; RCFG `self` needs no
    # extra UNet batch element, so the engines built for `none` serve it.
    stream = StreamV2V.from_engines(
        built, t_index_list=(20, 30), seed=5, bank=BankConfig(interval=2), guidance_scale=1.3, threads=1
    )
    cfg = stream.cfg
    assert (cfg.t_index_list, cfg.seed, cfg.bank.interval, cfg.guidance_scale) == ((20, 30), 5, 2, 1.3)
    selfish = StreamConfig(replace(SPEC, cfg_type="self"), guidance_scale=1.5)
    assert StreamV2V.from_engines(built, cfg=selfish, threads=1).cfg.cfg_type.value == "self"
    manifest = load_manifest(built)
    assert replace(manifest, spec=replace(SPEC, cfg_type="self")).differences(SPEC) == []  # and back


# One case per EngineSpec field: what is asked (changes to the build's spec), the words that name the difference.
FIELD_CASES: dict[str, tuple[dict, tuple[str, ...]]] = {
    "model": ({"model": "sd-turbo"}, ("model: engines have 'tiny', asked 'sd-turbo'",)),
    "height": ({"height": 64}, ("height: engines have 32, asked 64",)),
    "width": ({"width": 48}, ("width: engines have 32, asked 48",)),
    "steps": ({"steps": 1}, ("steps: engines have 2, asked 1",)),
    "cfg_type": (
        {"cfg_type": "initialize"},
        ("UNet batch: engines have 2", "asked 3 (2 step(s), guidance initialize)"),
    ),
    "cfg_type full": ({"cfg_type": "full"}, ("UNet batch: engines have 2", "asked 4 (2 step(s), guidance full)")),
    "bank": ({"bank": "fifo"}, ("bank: engines have dyme, asked fifo",)),
    "bank_frames": ({"bank_frames": 3}, ("bank_frames: engines have 2, asked 3",)),  # on the FIFO x2 build
    "ff_threshold": ({"ff_threshold": 0.9}, ("ff_threshold: engines have 0.98, asked 0.9",)),
    "ff_strength": ({"ff_strength": 0.5}, ("ff_strength: engines have 0.8, asked 0.5",)),
    "ff_layer_prefixes": (
        {"ff_layer_prefixes": ("mid_block.",)},
        ("ff_layer_prefixes: engines have ('mid_block.', 'up_blocks.0.', 'up_blocks.1.'), asked ('mid_block.',)",),
    ),
    "vae": ({"vae": "full"}, ("vae: engines have taesd, asked full",)),
    "precision": ({"precision": "fp16"}, ("precision: engines have fp32, asked fp16",)),
    "loras": ({"loras": "LORA"}, ("loras: engines were built with no LoRA, asked ", ":0.5 (file contents or scales")),
    "weights_seed": ({"weights_seed": 1}, ("weights_seed: engines have 0, asked 1", "weights hash: engines have ")),
    "max_streams": ({"max_streams": 2}, ("max_streams: engines have 1, asked 2",)),
    "sizes": (
        {"height": 64, "width": 64, "sizes": ((64, 64), (64, 128))},
        ("sizes: engines have 32x32, asked 64x64,128x64 (64x64,128x64 not built)",),
    ),
    # A folder without ControlNets asked for one: rebuilt with --controlnet into the folder named for it.
    "controlnets": ({"controlnets": ("tiny",)}, ("controlnets: engines have (), asked ('tiny',)",)),
}


def test_the_cases_cover_every_spec_field():
    assert {f.name for f in dataclasses.fields(EngineSpec)} <= set(FIELD_CASES)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    path.write_bytes(b"the spec compares LoRA files by their sha256 and scale")
    return path


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_each_spec_field_is_refused_with_a_rebuild_command(tiny_build, lora_file, case):
    changes, fragments = FIELD_CASES[case]
    base = FIFO if case == "bank_frames" else SPEC  # a DyMe bank always holds 1 frame
    # A swappable folder (the --onnx-only default) takes any LoRA set when opened: a frozen one compares them.
    folder = tiny_build(base, weights="frozen") if case == "loras" else tiny_build(base)
    if changes.get("loras") == "LORA":
        changes = {"loras": (LoraSpec(lora_file, 0.5),)}
    asked = replace(base, **changes)
    message = refused(folder, cfg=StreamConfig(asked))
    assert all(words in message for words in fragments), message
    assert f"build folder {folder} does not match" in message
    # one field asked differently, one difference named (plus what it implies: the UNet batch, the weights)
    assert message.count(": engines ") == (2 if case in ("model", "steps", "vae", "weights_seed") else 1), message
    cfg = rebuild_config(message)
    assert cfg.spec == asked and (cfg.builder.value, cfg.onnx_only) == ("auto", True)
    if case == "weights_seed":  # the same spec but for its random weights: rebuilt in place
        assert cfg.out == folder and written_folder(message) is None
        assert fragments[0] in refused(folder, cfg=StreamConfig(asked), verify_hashes=False)  # without hashing too
    else:  # another spec: into the folder the naming rule gives it, which the command says
        assert cfg.out is None and written_folder(message) == cfg.folder(None) == Path("engines", asked.folder_name())


def test_every_difference_is_named_at_once(built):
    asked = replace(SPEC, bank="fifo", bank_frames=2, height=64, steps=1, precision="fp16", ff_strength=0.5)
    message = refused(built, cfg=StreamConfig(asked))
    for words in (
        "bank: engines have dyme, asked fifo",
        "bank_frames: engines have 1, asked 2",
        "height: engines have 32, asked 64",
        "UNet batch: engines have 2",
        "asked 1 (1 step(s), guidance none)",
        "precision: engines have fp32, asked fp16",
        "ff_strength: engines have 0.8, asked 0.5",
    ):
        assert words in message, message
    assert rebuild_config(message).spec == asked and written_folder(message) == Path("engines", asked.folder_name())


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: p.write_text('{"spec": {"model": "tiny", "height": '), "corrupt or unreadable (JSONDecodeError"),
        (lambda p: p.write_bytes(b"\x00\xff\xfe garbage"), "corrupt or unreadable"),
        (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "networks"})),
         "corrupt or unreadable (KeyError"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "spec": {"model": "tiny", "colour": 1}})),
         "unknown spec fields ['colour']"),
        (lambda p: p.unlink(), "no manifest.json (not built, or not a build folder)"),
    ],
)  # fmt: skip
def test_corrupt_or_missing_manifest_is_refused(folder, damage, problem):
    damage(folder / "manifest.json")
    message = refused(folder)
    assert problem in message and f"Rebuild: python -m build_engines --model MODEL ... --out {folder}" in message


def test_format_version_1_manifest_is_refused(folder):
    """A folder built before the EngineSpec manifest (format 1: flat fields, one sha256 per file kind)."""
    v1 = {
        "model": "tiny", "weights_hash": "0123456789abcdef", "random_weights": True, "height": 32, "width": 32,
        "t_index_list": [20, 35], "bank_kind": "dyme", "bank_frames": 1, "interval": 4, "ff_layers": [],
        "ff_threshold": 0.98, "ff_strength": 0.8, "vae": "taesd", "precision": "fp32", "builder": None,
        "builder_version": None, "exporter": "torch 2.11.0 dynamo, opset 18", "created": "2026-11-20T10:00:00+00:00",
        "build_command": "python -m build_engines --model tiny", "timings_s": {},
        "loras": {"fingerprint": "none", "files": []}, "cfg_type": "none", "format_version": 1,
        "networks": {n: {"onnx": f"{n}.onnx", "onnx_sha256": "0" * 64, "tensors": []} for n in NETWORKS},
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(v1))
    message = refused(folder)
    assert "has format 1, written by another version of build_engines; this runtime reads format 2" in message
    assert "Rebuild: python -m build_engines --model tiny --force" in message  # its own build command, forced


def test_newer_format_manifest_is_refused_with_its_own_build_command(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    message = refused(folder)
    assert "has format 99, written by another version of build_engines; this runtime reads format 2" in message
    assert f"Rebuild: {manifest['build_command']} --force" in message


def test_missing_or_altered_onnx_is_refused(folder):
    (folder / "vae_decoder.onnx").unlink()
    with open(folder / "unet.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    message = refused(folder)
    assert f"vae_decoder: file {folder / 'vae_decoder.onnx'} is missing" in message
    assert f"unet: file {folder / 'unet.onnx'} was altered or truncated (sha256 differs" in message
    cfg = rebuild_config(message)
    assert (cfg.spec, cfg.out, cfg.onnx_only) == (SPEC, folder, True)  # the same spec: rebuilt in place
    message = refused(folder, verify_hashes=False)  # presence only, no hashing
    assert "vae_decoder.onnx is missing" in message and "unet.onnx was altered" not in message


@pytest.mark.parametrize("network, tensor", [("unet", "bank_v.3"), ("vae_decoder", "images")])
def test_an_edited_tensor_dtype_in_the_manifest_is_refused(folder, network, tensor):
    def edit(d):
        (t,) = [t for t in d["networks"][network]["tensors"] if t["name"] == tensor]
        t["dtype"] = "float16"

    edit_manifest(folder, edit)
    message = refused(folder, threads=1)
    entry = next(t for t in load_manifest(folder).network(network).tensors if t.name == tensor)
    direction = "input" if entry.is_input else "output"
    want = f"{network} {tensor}: manifest has {direction} {list(entry.shape)} float16, expected {direction}"
    assert want in message and f"{list(entry.shape)} float32" in message, message
    assert message.count("expected") == 1  # the ONNX itself still agrees with the layout
    assert (rebuild_config(message).spec, rebuild_config(message).out) == (SPEC, folder)


@pytest.fixture(scope="module")
def io_contract(built):
    """What `check_io` compares: the layout's tensors (from the model's structure) and the manifest."""
    weights = find_weights(SPEC)
    tokenizer, text_encoder, _ = load_text(SPEC, weights, "cpu", torch.float32)
    layout = bank_layout(unet_skeleton(SPEC, weights), SPEC)
    return layout.network_specs(SPEC, text_shape(tokenizer, text_encoder)), load_manifest(built)


def fake_runners(manifest) -> dict[str, SimpleNamespace]:
    """Runners that report exactly what the manifest records (torch dtypes, as real runners report them)."""
    runners = {}
    for name in NETWORKS:
        net = manifest.network(name)
        ins = {t.name: (t.shape, DTYPES[t.dtype]) for t in net.inputs()}
        outs = {t.name: (t.shape, DTYPES[t.dtype]) for t in net.outputs()}
        runners[name] = SimpleNamespace(path=Path(f"{name}.onnx"), input_specs=ins, output_specs=outs)
    return runners


def _move_to_outputs(r, name):
    r.output_specs[name] = r.input_specs.pop(name)


@pytest.mark.parametrize(
    "network, change, words",
    [
        ("unet", lambda r: r.input_specs.update(timestep=((2,), torch.int32)),
         "unet timestep: unet.onnx has input [2] int32, expected input [2] int64"),
        ("vae_encoder", lambda r: r.output_specs.update(latents=((1, 4, 4, 4), torch.float16)),
         "vae_encoder latents: vae_encoder.onnx has output [1, 4, 4, 4] float16, expected output [1, 4, 4, 4] float32"),
        ("unet", lambda r: r.output_specs.update({"cur_k.0": ((2, 17, 32), torch.float32)}),
         "unet cur_k.0: unet.onnx has output [2, 17, 32] float32, expected output [2, 16, 32] float32"),
        ("vae_decoder", lambda r: r.input_specs.pop("latents"),
         "vae_decoder latents: vae_decoder.onnx has nothing, expected input [1, 4, 4, 4] float32"),
        ("vae_decoder", lambda r: r.output_specs.update(alpha=((1, 1, 32, 32), torch.float32)),
         "vae_decoder alpha: vae_decoder.onnx has output [1, 1, 32, 32] float32, expected nothing"),
        ("unet", lambda r: _move_to_outputs(r, "timestep"),
         "unet timestep: unet.onnx has output [2] int64, expected input [2] int64"),
    ],
    ids=["input-dtype", "output-dtype", "shape", "missing", "extra", "direction"],
)  # fmt: skip
def test_check_io_refuses_a_runner_that_disagrees(io_contract, built, network, change, words):
    expected, manifest = io_contract
    check_io(expected, manifest, fake_runners(manifest), built, "REBUILD")  # as recorded: accepted
    runners = fake_runners(manifest)
    change(runners[network])
    with pytest.raises(EngineMismatch) as e:
        check_io(expected, manifest, runners, built, "REBUILD")
    message = str(e.value)
    assert words in message and message.count("expected") == 1 and message.endswith("Rebuild: REBUILD"), message


def test_check_io_compares_the_manifest_with_the_layout(io_contract, built):
    expected, manifest = io_contract
    unet = manifest.network("unet")
    tensors = tuple(replace(t, shape=(3, *t.shape[1:])) if t.name == "sample" else t for t in unet.tensors)
    edited = replace(manifest, networks={**manifest.networks, "unet": replace(unet, tensors=tensors)})
    with pytest.raises(EngineMismatch, match=r"unet sample: manifest has input \[3, 4, 4, 4\] float32, expected input"):
        check_io(expected, edited, fake_runners(manifest), built, "REBUILD")


def test_tensorrt_on_an_onnx_only_folder_is_refused_before_importing_tensorrt(built, monkeypatch):
    for module in ("tensorrt", "tensorrt_rtx", "streamv2v_trt.backends.tensorrt"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of them would raise ImportError
    message = refused(built, "tensorrt")
    assert "no TensorRT engines in this folder (builder: onnx only)" in message
    cfg = rebuild_config(message)
    assert (cfg.spec, cfg.out, cfg.onnx_only, cfg.builder.value) == (SPEC, built, False, "auto")


def test_aoti_on_an_onnx_folder_is_refused_before_importing_aoti(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamv2v_trt.backends.aoti", None)
    message = refused(built, "aoti")
    assert "no AOTInductor packages in this folder (builder: onnx only)" in message
    cfg = rebuild_config(message)
    assert (cfg.spec, cfg.out, cfg.builder.value) == (SPEC, built, "aoti")


@pytest.mark.parametrize(
    "builder, kind, backend, rebuild",
    [("tensorrt-rtx", "engine", "tensorrt", ("tensorrt-rtx", False)), ("aoti", "package", "aoti", ("auto", True))],
)
def test_onnxruntime_on_a_folder_without_onnx_is_refused(folder, builder, kind, backend, rebuild):
    def edit(d):
        d["builder"] = builder
        for name, net in d["networks"].items():
            net["files"] = {kind: {"name": f"{name}.{kind}", "sha256": "0" * 64}}

    edit_manifest(folder, edit)
    message = refused(folder, "onnxruntime")
    assert f"no ONNX files in this folder (builder: {builder}); open it with --backend {backend}. Rebuild: " in message
    cfg = rebuild_config(message)  # a build that has ONNX: TensorRT builds keep theirs, else ONNX only
    assert (cfg.spec, cfg.builder.value, cfg.onnx_only) == (SPEC, *rebuild)


def test_missing_or_altered_engine_is_refused(folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine: stop at the device
    manifest = load_manifest(folder)
    networks = {}
    for name, net in manifest.networks.items():  # the bytes do not matter to the checks, only presence and hash
        (folder / f"{name}.engine").write_bytes(name.encode() * 100)
        networks[name] = replace(net, files={**net.files, "engine": FileEntry.of(folder / f"{name}.engine")})
    replace(manifest, networks=networks, builder="tensorrt-rtx", builder_version="1.7").save(folder)
    with pytest.raises(RuntimeError, match="runs on a CUDA GPU"):  # every file check passed
        StreamV2V.from_engines(folder, "tensorrt")

    (folder / "unet.engine").unlink()
    (folder / "vae_encoder.engine").write_bytes(b"truncated")
    message = refused(folder, "tensorrt")
    assert "unet.engine is missing" in message and "vae_encoder.engine was altered or truncated" in message
    cfg = rebuild_config(message)
    assert cfg.spec == SPEC and cfg.builder.value == "tensorrt-rtx" and not cfg.onnx_only
    StreamV2V.from_engines(folder, "onnxruntime", threads=1)  # the ONNX Runtime backend does not need the engines


def test_rerun_reuses_and_force_rebuilds(folder, capsys):
    argv = shlex.split(SPEC.build_command(folder, onnx_only=True))[3:]
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in folder.iterdir()}
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert summary.count("reused") == 3 and "built" not in summary, summary
    assert "builder none (--onnx-only)" in summary and f"-> {folder / 'manifest.json'}" in summary
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in folder.iterdir()} == before

    descs = []
    result = build(BuildConfig(SPEC, out=folder, onnx_only=True), progress=descs.append)
    assert result.reused and result.manifest == load_manifest(folder)
    assert descs == [f"{stage} (reused)" for stage in stages(None)]

    assert main([*argv, "--force"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("built") == 3 and "reused" not in summary, summary
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert all(after[name] != before[name][0] for name in ("unet.onnx", "vae_encoder.onnx", "manifest.json"))
    assert load_manifest(folder).spec == SPEC
    StreamV2V.from_engines(folder, threads=1)  # the rebuilt folder passes every check


class ExportStarted(Exception):
    pass


def test_a_changed_spec_rebuilds(folder, monkeypatch, caplog):
    """Reuse is decided from the previous manifest; a spec that differs in any field exports again."""

    def export_network(module, specs, seed=0, dynamic=None):  # export.export_network's signature
        raise ExportStarted(specs[0].name)

    monkeypatch.setattr("build_engines.export.export_network", export_network)
    assert build(BuildConfig(SPEC, out=folder, onnx_only=True)).reused  # unchanged: nothing exported
    with caplog.at_level(logging.INFO, logger="build_engines.build"), pytest.raises(ExportStarted, match="sample"):
        build(BuildConfig(replace(SPEC, ff_strength=0.5), out=folder, onnx_only=True))
    assert "differs (ff_strength: engines have 0.8, asked 0.5): rebuilding" in caplog.text
    with pytest.raises(ExportStarted, match="sample"):  # the base weights too
        build(BuildConfig(replace(SPEC, weights_seed=1), out=folder, onnx_only=True))
