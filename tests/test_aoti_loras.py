"""LoRAs swapped at runtime on an AOTInductor build folder with swappable weights (tiny model, fp32, CPU).

Bound: the package's constants are written with base + deltas computed by the eager path's own code
(`LoraWeights`, `add_deltas`) on the same CPU weights, so the package then holds the very weights an eager stream
with that LoRA fused holds; what differs is the compiled code, so AOTI-vs-eager frames are held to test_aoti.py's
bound for the same comparison (uint8 frames within 1, latents within 1e-4: inductor's C++ kernels reorder float
sums). Two AOTI streams holding the same weights are compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import load_file
from test_lora import save
from test_lora_swap import PROMPT, files, video  # noqa: F401  (files: the module's LoRA fixture)

from build_engines.aoti import compile_aoti
from streamv2v_trt import StreamV2V
from streamv2v_trt.backends.aoti import AotiRunner
from streamv2v_trt.backends.aoti_loras import PackageLoraWeights
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.manifest import EngineMismatch, load_manifest
from streamv2v_trt.models.lora import LoraError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def folder(tiny_build):
    """The session's tiny AOTInductor CPU build: swappable weights by default on the CPU."""
    return tiny_build(tiny_spec(), builder="aoti")


def aoti(folder, loras=None) -> StreamV2V:
    return StreamV2V.from_engines(folder, "aoti", prompt=PROMPT, loras=lora_specs(loras) if loras else loras)


def eager(loras=()) -> StreamV2V:
    return StreamV2V.from_pretrained(tiny_spec(loras=lora_specs(loras)), prompt=PROMPT)


def assert_close_frames(a: StreamV2V, b: StreamV2V, frames) -> None:
    for i, frame in enumerate(frames):
        x, y = a(frame), b(frame)
        assert np.abs(x.astype(np.int16) - y).max() <= 1, f"frame {i}"
        torch.testing.assert_close(a.sample, b.sample, atol=1e-4, rtol=0, msg=lambda m, i=i: f"frame {i}: {m}")


def test_the_cpu_build_records_swappable_weights(folder):
    manifest = load_manifest(folder)
    assert manifest.weights == "swappable" and manifest.spec.loras == ()
    assert manifest.build_options["freezing"] is False
    names = AotiRunner(folder / "unet.pt2", "cpu").constant_names
    assert "unet.conv_in.weight" in names and not any(n.startswith("_frozen_param") for n in names)


def test_the_cpu_copy_of_the_unet_is_loaded_with_the_first_lora_set(folder, files):  # noqa: F811
    """A folder that never gets a LoRA holds no copy of the UNet: until the first set, only its structure."""
    s = aoti(folder)
    s(video(1)[0])
    assert s.backend.lora_weights.unet.conv_in.weight.device.type == "meta"
    s.set_loras([(files["a"], 0.8)])
    assert s.backend.lora_weights.unet.conv_in.weight.device.type == "cpu"


def test_hot_swap_equals_an_eager_stream_with_the_lora_fused(folder, files):  # noqa: F811
    s, plain = aoti(folder), aoti(folder)
    frames = video(10)
    for frame in frames[:3]:
        assert np.array_equal(s(frame), plain(frame))
    s.set_loras([(files["a"], 0.8)], reset=True)
    assert s.cfg.spec.loras == lora_specs([(files["a"], 0.8)])
    assert_close_frames(s, eager([(files["a"], 0.8)]), frames[3:])
    # and the LoRA really changed the frames
    plain.reset()
    assert max(np.abs(s(f).astype(np.int16) - plain(f)).max() for f in frames[:4]) > 1


def test_opening_with_loras_equals_a_swap(folder, files):  # noqa: F811
    pair = [(files["a"], 1.0), (files["b"], 0.5)]
    opened, swapped = aoti(folder, pair), aoti(folder)
    swapped.set_loras(pair)
    torch.testing.assert_close(opened.prompt_embeds, swapped.prompt_embeds, atol=0, rtol=0)
    for i, frame in enumerate(video(5)):
        assert np.array_equal(opened(frame), swapped(frame)), f"frame {i}"
    assert_close_frames(aoti(folder, pair), eager(pair), video(5))


def test_scale_zero_and_an_empty_set_are_the_base(folder, files):  # noqa: F811
    s, base = aoti(folder), aoti(folder)
    frames = video(9)
    s.set_loras([(files["a"], 0.0)])
    for frame in frames[:3]:
        assert np.array_equal(s(frame), base(frame))
    s.set_loras([(files["b"], 1.0)])
    s.set_loras([])
    for frame in frames[3:]:
        assert np.array_equal(s(frame), base(frame))


def test_a_malformed_file_changes_nothing(folder, files, tmp_path):  # noqa: F811
    s, twin = aoti(folder, [(files["a"], 1.0)]), aoti(folder, [(files["a"], 1.0)])
    frames = video(6)
    for frame in frames[:2]:
        s(frame), twin(frame)
    cfg = s.cfg
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(str(files["b"]))
    factor = next(iter(tensors.values()))
    save(bad, tensors | {f"lora_unet_no_such_layer.lora_{r}.weight": factor for r in ("down", "up")})
    with pytest.raises(LoraError, match="matches no Linear/Conv2d"):
        s.set_loras([(files["b"], 1.0), (bad, 1.0)])
    assert s.cfg == cfg
    for i, frame in enumerate(frames[2:]):
        assert np.array_equal(s(frame), twin(frame)), f"frame {i}"


def test_a_frozen_folder_refuses_another_lora_set_with_the_rebuild_command(tiny_build, files):  # noqa: F811
    """`--weights frozen` on the CPU: freezing on, the manifest says frozen, LoRAs are a rebuild (today's rule)."""
    frozen = tiny_build(tiny_spec(), builder="aoti", weights="frozen")
    manifest = load_manifest(frozen)
    assert manifest.weights == "frozen" and manifest.build_options["freezing"] is True
    names = AotiRunner(frozen / "unet.pt2", "cpu").constant_names
    # The Linear/Conv2d weights a LoRA changes are folded (renamed _frozen_param<N>); biases and norms keep names.
    assert "unet.conv_in.weight" not in names and "unet.conv_in.bias" in names
    s = aoti(frozen)
    assert s.backend.lora_weights is None
    with pytest.raises(EngineMismatch, match="compiled into its files") as e:
        s.set_loras([(files["a"], 1.0)])
    assert "--builder aoti" in str(e.value) and "--weights frozen" in str(e.value)
    with pytest.raises(EngineMismatch, match="loras: engines were built with no LoRA") as e:
        aoti(frozen, [(files["a"], 1.0)])
    assert "--weights swappable" in str(e.value)


class _Wrap(torch.nn.Module):
    """BankUNet's shape: the network under `.unet`."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


@pytest.mark.parametrize("freezing", [False, True])
def test_a_package_compiled_with_freezing_has_no_weights_to_replace(tmp_path, freezing):
    """Freezing renames the weights `_frozen_param<N>` and folds them: nothing is left to write by name, so the
    swap refuses such a package with the rebuild command; without it, load_weights changes the next run."""
    torch.manual_seed(0)
    module, x = _Wrap().eval(), torch.randn(1, 4, 8, 8)
    path = tmp_path / "m.pt2"
    compile_aoti(module, {"x": x}, ["x"], ["y"], path, torch.device("cpu"), options={"freezing": freezing})
    runner = AotiRunner(path, "cpu")
    if freezing:
        assert not any(n.endswith(".weight") for n in runner.constant_names)
        with pytest.raises(EngineMismatch, match="--weights swappable"):
            PackageLoraWeights(module.unet, torch.nn.Linear(1, 1), [runner])
        return
    with torch.no_grad():
        module.unet[0].weight.mul_(2)
    with pytest.raises(KeyError, match="no constants"):
        runner.load_weights({"unet.0.weight": module.unet[0].weight, "unet.9.weight": module.unet[0].weight})
    assert not torch.equal(runner.run({"x": x})["y"], module(x))  # a bad name: nothing written
    runner.load_weights({"unet.0.weight": module.unet[0].weight})
    torch.testing.assert_close(runner.run({"x": x})["y"], module(x), atol=1e-5, rtol=0)


def test_video_lora_runs_on_the_swappable_folder_without_a_rebuild(folder, files, tmp_path, capsys):  # noqa: F811
    """`video --engines DIR --lora FILE:SCALE`: the LoRA is applied when the folder opens; the folder is untouched
    (no rebuild) and the frames differ from a run without it."""
    from test_video_cli import pan_frames, read_all, write_clip

    from streamv2v_trt.cli.main import main

    clip = tmp_path / "in.mp4"
    write_clip(clip, pan_frames(4))
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    run = ["--prompt", PROMPT, "--engines", str(folder), "--backend", "aoti", "--device", "cpu", "--no-progress"]
    outputs = {}
    for name, extra in (("base", []), ("lora", ["--lora", f"{files['a']}:0.8"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["video", str(clip), str(out), *run, *extra]) == 0, capsys.readouterr().err
        outputs[name] = np.stack([f.image for f in read_all(out)[1]]).astype(np.int16)
    assert outputs["lora"].shape == outputs["base"].shape == (4, 64, 64, 3)
    # The LoRA changes the frames by far more than the codec's rounding (a few levels).
    assert np.abs(outputs["lora"] - outputs["base"]).mean() > 4
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_video_lora_on_a_frozen_folder_is_one_error_line_naming_the_rebuild(tiny_build, files, tmp_path, capsys):  # noqa: F811
    from test_video_cli import pan_frames, write_clip

    from streamv2v_trt.cli.main import main

    frozen = tiny_build(tiny_spec(), builder="aoti", weights="frozen")
    clip = tmp_path / "in.mp4"
    write_clip(clip, pan_frames(2))
    out = tmp_path / "out.mp4"
    argv = ["video", str(clip), str(out), "--prompt", PROMPT, "--engines", str(frozen), "--device", "cpu",
            "--lora", f"{files['a']}:1", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "python -m build_engines" in err and "--lora" in err and "--weights swappable" in err, err
    assert not out.exists()


def test_serve_lora_dir_swaps_a_swappable_folder_and_refuses_a_frozen_one(folder, tiny_build, files, tmp_path):  # noqa: F811
    """`serve --lora-dir` on build folders: the picker swaps a swappable folder's weights for every slot; a folder
    with frozen weights is refused at start, naming the rebuild."""
    pytest.importorskip("fastapi")
    import json
    import shutil

    from fastapi.testclient import TestClient
    from test_web import TEST_HOSTS, serve_args

    from streamv2v_trt.cli import serve
    from streamv2v_trt.cli.stream_args import CliError
    from streamv2v_trt.serving import StreamServer
    from streamv2v_trt.web import Limits, create_app
    from streamv2v_trt.web.loras import LoraFolder

    shutil.copy(files["a"], tmp_path / "a.safetensors")
    loras = LoraFolder(tmp_path)
    frozen = serve.open_slots(serve_args("--engines", str(tiny_build(tiny_spec(), builder="aoti", weights="frozen")),
                                         "--device", "cpu"))  # fmt: skip
    with pytest.raises(CliError, match="--lora-dir: .*compiled into its files.*--weights swappable"):
        serve.lora_picker(frozen, loras)
    multi = serve.open_slots(serve_args("--engines", str(folder), "--device", "cpu"))
    with StreamServer(multi) as server:
        app = create_app(server, Limits(), TEST_HOSTS, loras=serve.lora_picker(multi, loras))
        with TestClient(app) as client, client.websocket_connect("/ws") as ws:
            assert ws.receive_json()["lora_files"] == ["a.safetensors"]
            ws.send_text(json.dumps({"type": "loras", "loras": [{"name": "a.safetensors", "scale": 0.8}]}))
            assert ws.receive_json() == {"type": "loras", "loras": [{"name": "a.safetensors", "scale": 0.8}]}
    assert multi.cfg.spec.loras == lora_specs([(tmp_path / "a.safetensors", 0.8)])
    assert multi.backend.lora_weights.unet.conv_in.weight.device.type == "cpu"  # the swap loaded the base copy
