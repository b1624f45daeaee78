"""manifest.json: mismatches, corrupt manifests, missing or altered files are refused with the rebuild command;
`python -m build_engines` reuses an intact build and `--force` rebuilds it."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from build_engines import BuildConfig
from build_engines.__main__ import build_parser, config_from_args, main
from streamv2v_trt.config import BankConfig, BankKind, StreamConfig
from streamv2v_trt.engine import EngineMismatch, EngineRequest, Manifest, load_checked, load_manifest, sha256_file
from streamv2v_trt.models import load_models
from streamv2v_trt.models.lora import LoraSpec

ARGS = ["--model", "tiny", "--height", "32", "--width", "32", "--precision", "fp32", "--onnx-only"]


def _request(**changes) -> EngineRequest:
    base = EngineRequest("tiny", 32, 32, (32,), BankKind.DYME, vae="taesd", precision="fp32", need="onnx")
    return replace(base, **changes)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


@pytest.fixture
def folder(built, tmp_path):
    """A private copy of the build that a test may damage."""
    return shutil.copytree(built, tmp_path / "engines")


def _refused(folder, req: EngineRequest, *expected: str) -> str:
    with pytest.raises(EngineMismatch) as e:
        load_checked(folder, req)
    msg = str(e.value)
    for part in expected:
        assert part in msg, f"{part!r} not in: {msg}"
    assert msg.endswith(f"Rebuild: {req.command(folder)}"), msg
    return msg


def test_matching_request_is_accepted(built):
    weights = load_models("tiny", seed=0).weights_hash()
    manifest = load_checked(built, _request(weights_hash=weights))
    assert manifest.model == "tiny" and manifest.weights_hash == weights
    assert (manifest.height, manifest.width, manifest.steps, manifest.latent_hw) == (32, 32, 1, (4, 4))
    assert (manifest.bank_kind, manifest.bank_frames, manifest.interval) == ("dyme", 1, 4)
    assert (manifest.ff_threshold, manifest.ff_strength, manifest.vae, manifest.precision) == (
        0.98,
        0.8,
        "taesd",
        "fp32",
    )
    assert manifest.ff_layers and all(name.endswith("attn1") for name in manifest.ff_layers)
    assert sorted(manifest.networks) == ["unet", "vae_decoder", "vae_encoder"]
    unet = manifest.network("unet")
    assert unet.onnx == "unet.onnx" and unet.onnx_sha256 == sha256_file(built / "unet.onnx")
    bank = [t for t in unet.tensors if t.role == "bank"]
    assert bank and all(t.layer and t.dtype == "float32" for t in bank)
    assert unet.tensor("timestep").dtype == "int64"
    assert manifest.created and manifest.exporter.startswith("torch ")
    assert manifest.build_command == _request().command(built)


def test_interval_and_t_index_values_are_not_refused(built):
    # the bank interval and the timestep values are runtime inputs; only the step count (UNet batch) is baked in
    load_checked(built, _request(t_index_list=(20,)))


def test_from_stream_builds_the_same_request():
    cfg = StreamConfig(height=32, width=32, t_index_list=(30, 35), bank=BankConfig(kind="fifo", frames=3))
    req = EngineRequest.from_stream("sd15", cfg, vae="full")
    assert (req.steps, req.bank_kind, req.bank_frames, req.vae, req.precision) == (2, BankKind.FIFO, 3, "full", "fp16")
    assert req.command("out dir") == (
        "python -m build_engines --model sd15 --height 32 --width 32 --t-index-list 30,35 --bank fifo "
        "--bank-frames 3 --vae full --precision fp16 --out 'out dir'"
    )


def test_every_difference_is_named(built):
    req = _request(bank_kind="fifo", bank_frames=2, height=64, t_index_list=(30, 35), precision="fp16")
    msg = _refused(
        built,
        req,
        "bank: engines have dyme x1, asked fifo x2",
        "height: engines have 32, asked 64",
        "UNet batch: engines have 1 (1 step(s), guidance none), asked 2 (2 step(s), guidance none)",
        "precision: engines have fp32, asked fp16",
    )
    assert "--bank fifo --bank-frames 2" in msg and "--t-index-list 30,35" in msg


def test_other_weights_vae_and_fusion_are_refused(built):
    _refused(built, _request(weights_hash="0123456789abcdef"), "weights hash")
    _refused(built, _request(vae="full"), "vae: engines have taesd, asked full")
    _refused(built, _request(ff_threshold=0.9), "ff threshold: engines have 0.98, asked 0.9", "--ff-threshold 0.9")
    _refused(built, _request(model="sd-turbo"), "model: engines have tiny, asked sd-turbo")


def test_onnx_only_build_has_no_engines(built):
    _refused(built, _request(need="engine"), "--onnx-only build, asked TensorRT engines")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda p: p.write_text('{"model": "tiny", "height": '), "corrupt or unreadable (JSONDecodeError"),
        (lambda p: p.write_bytes(b"\x00\xff\xfe garbage"), "corrupt or unreadable"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": 99})), "format_version 99"),
        (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "networks"})),
         "corrupt or unreadable (KeyError"),
        (lambda p: p.unlink(), "no manifest.json"),
    ],
)  # fmt: skip
def test_corrupt_or_missing_manifest_is_refused(folder, damage, problem):
    damage(folder / "manifest.json")
    _refused(folder, _request(), problem)


def test_missing_or_altered_onnx_is_refused(folder):
    (folder / "vae_decoder.onnx").unlink()
    with open(folder / "unet.onnx", "ab") as f:
        f.write(b"\0")
    _refused(folder, _request(), "vae_decoder.onnx is missing", "unet.onnx was altered or truncated")
    with pytest.raises(EngineMismatch, match="vae_decoder.onnx is missing") as e:
        load_checked(folder, _request(), verify_hashes=False)  # presence only, no hashing
    assert "unet.onnx was altered" not in str(e.value)


def test_missing_or_altered_engine_is_refused(folder):
    # Give the manifest an engine per network (the bytes do not matter to the check, only presence and hash).
    manifest = load_manifest(folder)
    networks = {}
    for name, net in manifest.networks.items():
        (folder / f"{name}.engine").write_bytes(name.encode() * 100)
        networks[name] = replace(net, engine=f"{name}.engine", engine_sha256=sha256_file(folder / f"{name}.engine"))
    replace(manifest, networks=networks, builder="tensorrt-rtx", builder_version="1.7").save(folder)
    req = _request(need="engine")
    assert isinstance(load_checked(folder, req), Manifest)
    _refused(folder, replace(req, builder="tensorrt"), "builder: engines built by tensorrt-rtx, asked tensorrt")

    (folder / "unet.engine").unlink()
    (folder / "vae_encoder.engine").write_bytes(b"truncated")
    _refused(folder, req, "unet.engine is missing", "vae_encoder.engine was altered or truncated")
    load_checked(folder, _request())  # an ONNX-only request does not need the engines


def test_rerun_reuses_and_force_rebuilds(folder, capsys):
    before = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in folder.iterdir()}
    assert main([*ARGS, "--out", str(folder)]) == 0
    summary = capsys.readouterr().out
    assert summary.count("reused") == 3 and "built" not in summary, summary
    assert {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in folder.iterdir()} == before

    assert main([*ARGS, "--out", str(folder), "--force"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("built") == 3 and "reused" not in summary, summary
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert all(after[name] != before[name][0] for name in ("unet.onnx", "vae_encoder.onnx", "manifest.json"))
    load_checked(folder, _request())


def test_guidance_sizes_the_unet_batch(built):
    batches = [BuildConfig(out=".", t_index_list=(30, 40), cfg_type=c).unet_batch for c in ("self", "initialize")]
    assert batches + [BuildConfig(out=".", t_index_list=(30, 40), cfg_type="full").unet_batch] == [2, 3, 4]
    load_checked(built, _request(cfg_type="self"))  # RCFG self needs no extra batch element: same engines
    msg = _refused(built, _request(cfg_type="full"), "UNet batch: engines have 1 (1 step(s), guidance none), asked 2")
    assert "--cfg-type full" in msg


@pytest.mark.parametrize(
    "req",
    [
        _request(),
        _request(bank_kind="fifo", bank_frames=3, t_index_list=(30, 35, 40, 45), cfg_type="initialize", need="engine"),
        _request(model="sd15", vae="full", precision="fp16", ff_threshold=0.9, ff_strength=0.5, builder="tensorrt-rtx"),
        _request(loras=(LoraSpec("styles/a b.safetensors", 0.5), LoraSpec("c.safetensors"))),
    ],
)
def test_rebuild_command_parses_back_into_the_request(req):
    argv = shlex.split(req.command("out dir"))[3:]  # drop "python -m build_engines"
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.out == Path("out dir")
    assert cfg.request() == req


def test_build_config_from_stream_matches_the_runtime_request():
    bank = BankConfig(kind="fifo", frames=2)
    stream = StreamConfig(height=64, width=48, t_index_list=(30, 40), cfg_type="full", bank=bank)
    cfg = BuildConfig.from_stream("tiny", stream, "out", vae="full", precision="fp32", onnx_only=True)
    assert cfg.unet_batch == 4
    assert cfg.request() == EngineRequest.from_stream("tiny", stream, vae="full", precision="fp32", need="onnx")
