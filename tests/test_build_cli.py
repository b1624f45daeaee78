"""`python -m build_engines` flags: defaults, the default output folder, the rebuild commands the runtime prints,
and what `--builder auto` picks for the GPU and TensorRT flavours present (faked here: no GPU needed)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import terminal_lines, tiny_spec

from build_engines import BuildConfig, Builder, choose_builder
from build_engines.__main__ import build_parser, config_from_args
from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable, rtx_runs_on
from streamv2v_trt.spec import FF_LAYER_PREFIXES, EngineSpec, LoraSpec


def parse(*argv) -> BuildConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_are_sd_turbo_512_one_step_in_a_folder_named_by_the_specialisation():
    cfg = parse()
    spec = cfg.spec
    assert (spec.model, spec.height, spec.width, spec.steps, spec.precision.value) == ("sd-turbo", 512, 512, 1, "fp16")
    assert (spec.cfg_type.value, spec.bank.value, spec.bank_frames, spec.vae.value) == ("none", "dyme", 1, "taesd")
    assert (spec.ff_threshold, spec.ff_strength, spec.ff_layer_prefixes) == (0.98, 0.8, FF_LAYER_PREFIXES)
    assert spec.max_streams == 1 and spec.unet_batch == 1
    assert (spec.loras, spec.weights_seed, cfg.builder, cfg.onnx_only, cfg.force) == ((), 0, Builder.AUTO, False, False)
    assert cfg.out is None  # the folder follows the builder `auto` picks
    assert cfg.folder("tensorrt-rtx") == Path("engines/sd-turbo-512x512-b1-dyme1-taesd-fp16")
    assert cfg.folder(None) == cfg.folder("tensorrt") == cfg.folder("tensorrt-rtx")
    assert cfg.folder("aoti") == Path("engines/sd-turbo-512x512-b1-dyme1-taesd-fp16-aoti")


def test_default_folder_changes_with_everything_the_engines_are_specialised_for():
    def folder(*argv) -> Path:
        return parse("--model", "tiny", *argv).folder(None)

    base = folder()
    others = {
        folder("--height", "64"),
        folder("--width", "64"),
        folder("--steps", "2"),
        folder("--steps", "2", "--cfg-type", "full"),  # UNet batch 4
        folder("--bank", "fifo", "--bank-frames", "2"),
        folder("--vae", "full"),
        folder("--precision", "fp32"),
        folder("--max-streams", "2"),
    }
    assert base not in others and len(others) == 8
    # Guidance and steps matter only through the UNet batch: the same engines serve both.
    assert folder("--cfg-type", "full") == folder("--steps", "2")
    assert folder("--cfg-type", "self") == base
    assert parse("--model", "tiny", "--out", "mine").folder("tensorrt-rtx") == Path("mine")


def test_guidance_sizes_the_unet_batch():
    batches = [parse("--steps", "2", "--cfg-type", c).spec.unet_batch for c in ("none", "self", "initialize", "full")]
    assert batches == [2, 2, 3, 4]
    assert parse("--steps", "2", "--cfg-type", "initialize", "--max-streams", "2").spec.unet_batch == 6


def test_steps_come_from_the_t_index_list_or_the_preset():
    assert parse("--model", "tiny", "--t-index-list", "30,35,40").spec.steps == 3  # only the count is compiled
    assert parse("--model", "sd15").spec.steps == 4  # the preset's list
    assert parse("--model", "sd15", "--steps", "2").spec.steps == 2
    with pytest.raises(SystemExit):
        parse("--steps", "2", "--t-index-list", "30,35")  # one or the other
    with pytest.raises(SystemExit):
        parse("--t-index-list", "30,x")


def test_fusion_loras_and_seed_flags_reach_the_spec():
    cfg = parse("--ff-layers", "mid_block.,up_blocks.0.", "--lora", "a b.safetensors:0.5", "--lora", "c.safetensors")
    assert cfg.spec.ff_layer_prefixes == ("mid_block.", "up_blocks.0.")
    assert cfg.spec.loras == (LoraSpec(Path("a b.safetensors"), 0.5), LoraSpec(Path("c.safetensors"), 1.0))
    assert parse("--seed", "3").spec.weights_seed == 3


def test_aoti_on_the_cpu_defaults_to_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse("--builder", "aoti").spec.precision.value == "fp32"
    assert parse("--builder", "aoti", "--device", "cuda").spec.precision.value == "fp16"
    assert parse("--builder", "aoti", "--precision", "fp16").spec.precision.value == "fp16"
    assert parse().spec.precision.value == "fp16"  # TensorRT builds are fp16 even when built on a CPU
    with pytest.raises(ValueError, match="--onnx-only"):
        parse("--builder", "aoti", "--onnx-only")
    with pytest.raises(ValueError, match="--device"):
        parse("--builder", "tensorrt-rtx", "--device", "cpu")


@pytest.mark.parametrize(
    "spec, builder, onnx_only",
    [
        (EngineSpec("tiny", 32, 32), None, True),
        (EngineSpec("tiny", 64, 48, steps=4, cfg_type="initialize", bank="fifo", bank_frames=3), None, False),
        (
            EngineSpec("sd15", vae="full", precision="fp32", ff_threshold=0.9, ff_strength=0.5, weights_seed=7),
            "tensorrt-rtx",
            False,
        ),
        (
            EngineSpec("sd-turbo", steps=2, cfg_type="full", ff_layer_prefixes=("mid_block.",), max_streams=3),
            "aoti",
            False,
        ),
        (EngineSpec("tiny", loras=(LoraSpec("styles/a b.safetensors", 0.5), LoraSpec("c.safetensors"))), None, True),
        (EngineSpec("sd-turbo", 512, 768, sizes=((512, 512), (512, 768), (768, 512))), "aoti", False),
    ],
)
def test_build_command_parses_back_into_the_spec(spec, builder, onnx_only):
    """What `EngineMismatch` prints as `Rebuild: ...` is a command that builds exactly the asked spec."""
    argv = shlex.split(spec.build_command("out dir", builder=builder, onnx_only=onnx_only))
    assert argv[:3] == ["python", "-m", "build_engines"]
    cfg = parse(*argv[3:])
    assert cfg.spec == spec
    assert (cfg.out, cfg.builder.value, cfg.onnx_only) == (Path("out dir"), builder or "auto", onnx_only)


# --builder auto: which GPU is here (None: no GPU) and which TensorRT flavours import, faked.
def fake_machine(monkeypatch, capability: tuple[int, int] | None, *importable: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: "NVIDIA Fake GPU")
    for module in ("tensorrt", "tensorrt_rtx"):  # None in sys.modules: `import` raises ImportError
        monkeypatch.setitem(sys.modules, module, ModuleType(module) if module in importable else None)


@pytest.mark.parametrize(
    "capability, importable, expected, why",
    [
        (None, ("tensorrt_rtx",), "tensorrt-rtx", "no GPU here, TensorRT-RTX builds ahead of time"),
        ((8, 9), ("tensorrt_rtx",), "tensorrt-rtx", "TensorRT-RTX runs on NVIDIA Fake GPU, compute capability 8.9"),
        ((12, 0), ("tensorrt_rtx",), "tensorrt-rtx", "compute capability 12.0"),
        ((9, 0), ("tensorrt_rtx",), "aoti", "TensorRT-RTX does not run on NVIDIA Fake GPU, compute capability 9.0"),
        ((9, 0), ("tensorrt", "tensorrt_rtx"), "tensorrt", "TensorRT is installed and a GPU is here"),
        ((8, 9), ("tensorrt",), "tensorrt", "TensorRT is installed and a GPU is here"),
        (None, ("tensorrt",), "aoti", "no GPU here and full TensorRT needs a GPU to build"),
        ((9, 0), (), "aoti", "neither TensorRT nor TensorRT-RTX imports"),
        (None, (), "aoti", "no GPU here and neither TensorRT nor TensorRT-RTX imports"),
    ],
)
def test_auto_builder_follows_the_gpu_and_what_imports(monkeypatch, capability, importable, expected, why):
    fake_machine(monkeypatch, capability, *importable)
    builder, reason = choose_builder(BuildConfig(EngineSpec("tiny")))
    assert builder == expected and reason.startswith("auto: ") and why in reason, reason
    assert "(" not in reason, f"the summary prints it in parentheses: builder {builder} ({reason})"


def test_asked_builders_are_refused_where_they_cannot_run(monkeypatch):
    fake_machine(monkeypatch, (9, 0), "tensorrt_rtx")
    with pytest.raises(
        TensorRTUnavailable, match=r"TensorRT-RTX does not run on NVIDIA Fake GPU \(compute capability 9\.0"
    ):
        choose_builder(BuildConfig(EngineSpec("tiny"), builder="tensorrt-rtx"))
    with pytest.raises(TensorRTUnavailable, match=r'cannot import tensorrt .*pip install -e "\.\[trt\]"'):
        choose_builder(BuildConfig(EngineSpec("tiny"), builder="tensorrt"))
    # The summary prints "builder aoti (--builder aoti)", not "builder aoti (asked (--builder aoti))".
    assert choose_builder(BuildConfig(EngineSpec("tiny"), builder="aoti")) == ("aoti", "--builder aoti")
    assert choose_builder(BuildConfig(EngineSpec("tiny"), onnx_only=True)) == (None, "--onnx-only")
    fake_machine(monkeypatch, (8, 6))
    with pytest.raises(TensorRTUnavailable, match=r'pip install -e "\.\[trt-rtx\]"'):
        choose_builder(BuildConfig(EngineSpec("tiny"), builder="tensorrt-rtx"))


@pytest.mark.parametrize(
    "capability, runs",
    [((8, 0), True), ((8, 6), True), ((8, 9), True), ((12, 0), True), ((12, 1), True), ((7, 5), False),
     ((9, 0), False), ((10, 0), False)],
)  # fmt: skip
def test_rtx_capabilities(capability, runs):
    """As measured: TensorRT-RTX engines load on 8.0, 8.6, 8.9 and 12.0+, not on Hopper (9.0)."""
    assert rtx_runs_on(capability) is runs


def test_native_prints_during_an_engine_build_go_through_logging(caplog):
    """TensorRT-RTX prints some notes straight to stdout: benign ones become debug lines, the rest warnings."""
    import logging
    import os

    from build_engines.compile import _prints_through_logging

    with caplog.at_level(logging.DEBUG, logger="build_engines.compile"):
        with _prints_through_logging("building x.engine"):
            os.write(1, b"WARNING: in op c, operand b payload type requires precision-lose casting\n")
            os.write(2, b"something else went oddly\n")
    levels = {r.getMessage(): r.levelname for r in caplog.records}
    assert levels["building x.engine: something else went oddly"] == "WARNING"
    assert levels["building x.engine: 1 notes about fp16 clamp constants (benign; -v shows them)"] == "INFO"
    assert any(level == "DEBUG" and "precision-lose" in msg for msg, level in levels.items())


def run_build_engines(*argv: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m build_engines ARGV` as a user runs it: its own process, stderr as a terminal would get it (bytes
    decoded here: text mode would turn the progress bar's carriage returns into newlines)."""
    proc = subprocess.run(
        [sys.executable, "-m", "build_engines", *argv],
        capture_output=True,
        env={**os.environ, **env},
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def test_a_hub_id_without_network_is_one_line_that_says_what_to_do(tmp_path):
    """It used to be three chained tracebacks (124 lines) from huggingface_hub. Offline mode stands in for no
    network: the hub is never asked, so the test cannot hang on a real connection."""
    out = tmp_path / "out"
    proc = run_build_engines(
        "--model", "someone/not-cached-model", "--height", "64", "--width", "64", "--onnx-only", "--out", str(out),
        HF_HUB_OFFLINE="1",
    )  # fmt: skip
    lines = [line for line in terminal_lines(proc.stderr) if line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) <= 4, proc.stderr
    (error,) = [line for line in lines if line.startswith("error:")]
    assert "'someone/not-cached-model': the Hugging Face hub cannot be reached" in error
    assert "--model PATH, with unet/, vae/, text_encoder/, tokenizer/, scheduler/" in error
    assert "hf download someone/not-cached-model" in error and "preset (tiny, sd-turbo, sd15)" in error


def test_log_lines_print_above_the_progress_bar_not_into_it(tiny_build):
    """The stage bar and the build's INFO lines share stderr: each log line gets a line of its own."""
    shared = tiny_build(tiny_spec())  # reused, not rebuilt: the log lines come while the bar is drawn
    proc = run_build_engines(
        "--model", "tiny", "--height", "64", "--width", "64", "--precision", "fp32", "--onnx-only", "--out",
        str(shared),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = terminal_lines(proc.stderr)
    logged = [line for line in shown if "INFO " in line]
    assert any("reusing the build" in line for line in logged), proc.stderr
    assert all(line.startswith("INFO ") for line in logged), logged
    assert any(line.startswith("build_engines: 100%") for line in shown), shown  # the bar itself is still drawn


def test_weights_flag_picks_swappable_or_frozen_builds(tmp_path):
    assert parse("--builder", "aoti", "--device", "cpu").swappable(Builder.AOTI)  # the CPU default
    assert not parse("--builder", "aoti", "--device", "cpu", "--weights", "frozen").swappable(Builder.AOTI)
    assert parse("--builder", "aoti", "--device", "cuda", "--weights", "swappable").swappable(Builder.AOTI)
    assert not parse("--builder", "aoti", "--device", "cuda").swappable(Builder.AOTI)  # CUDA stays frozen
    # ONNX: swappable unless LoRAs are named (then fused, as before); TensorRT: frozen unless asked (a refit flag)
    assert parse("--onnx-only").swappable(None) and not parse("--onnx-only", "--weights", "frozen").swappable(None)
    assert not parse("--onnx-only", "--lora", "a.safetensors:0.5").swappable(None)
    for flavour in (Builder.TENSORRT, Builder.TENSORRT_RTX):  # the config alone (parsing imports the builder)
        assert not BuildConfig(tiny_spec(), builder=flavour).swappable(flavour)
        assert BuildConfig(tiny_spec(), builder=flavour, weights="swappable").swappable(flavour)
    from build_engines import build

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    cfg = BuildConfig(tiny_spec(loras=(LoraSpec(lora, 0.5),)), builder="aoti", device="cpu", out=tmp_path / "out")
    with pytest.raises(ValueError, match="swappable weights compiles no LoRA in") as e:
        build(cfg)  # refused before any model is loaded
    assert f"--lora {lora}:0.5" in str(e.value) and "--weights frozen" in str(e.value)
    cfg = BuildConfig(tiny_spec(loras=(LoraSpec(lora, 0.5),)), onnx_only=True, weights="swappable", out=tmp_path / "o")
    with pytest.raises(ValueError, match="swappable weights compiles no LoRA in"):
        build(cfg)
