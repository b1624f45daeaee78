"""AOTInductor packages (build_engines/aoti.py) run by `AotiRunner` equal the eager modules (tiny model, fp32, CPU).

The three networks are compiled once per session (about a minute for the UNet, 15 s per VAE on 2 cores), by the
session's shared `tiny_build` (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from build_engines.aoti import DEFAULT_OPTIONS, aoti_options
from build_engines.export import example_inputs, network_modules
from streamv2v_trt.backends.aoti import BUILD_KEY, AotiMismatch, AotiRunner
from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.layout import DTYPES, NETWORKS
from streamv2v_trt.manifest import load_manifest
from streamv2v_trt.models.loader import load_models

pytestmark = pytest.mark.slow

ATOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def aoti(tiny_build):
    """The tiny model's UNet (DyMe bank, latent 8x8), VAE encoder and decoder, compiled once per session by
    `python -m build_engines --builder aoti` (the session's shared build folder; the GPU check's test reuses it)."""
    spec = tiny_spec()
    modules, specs = network_modules(load_models(spec), spec)
    out = tiny_build(spec, builder="aoti")
    return SimpleNamespace(out=out, modules=modules, specs=specs, paths={n: out / f"{n}.pt2" for n in NETWORKS})


@pytest.fixture(scope="session")
def runners(aoti):
    return {name: AotiRunner(path, "cpu") for name, path in aoti.paths.items()}


def test_packages_are_written_atomically_and_record_the_build(aoti):
    files = sorted(p.name for p in aoti.out.iterdir())
    assert files == ["manifest.json", "unet.pt2", "vae_decoder.pt2", "vae_encoder.pt2"]  # no temporary left
    manifest = load_manifest(aoti.out)
    assert manifest.builder == "aoti" and manifest.builder_version == torch.__version__
    assert manifest.target == {"device": "cpu", "torch": torch.__version__}
    assert manifest.build_options == aoti_options("cpu")
    assert all(set(net.files) == {"package"} for net in manifest.networks.values())


def test_stream_on_packages_equals_eager_frame_by_frame(aoti):
    """30 frames with DyMe merges (every 4 frames): the AOTI stream equals eager, as the ONNX Runtime one does."""
    from streamv2v_trt import StreamV2V

    engine = StreamV2V.from_engines(aoti.out, "aoti", prompt="a cat")
    eager = StreamV2V.from_pretrained(tiny_spec(), prompt="a cat")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3)).astype(np.int16)
    for i in range(30):
        frame = np.clip(base + 3 * i, 0, 255).astype(np.uint8)  # a slowly changing scene: fusion and merges fire
        a, b = engine(frame), eager(frame)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, i
        torch.testing.assert_close(engine.sample, eager.sample, atol=1e-4, rtol=0)
        for name, t in eager.bank.tensors.items():
            torch.testing.assert_close(engine.bank.tensors[name], t, atol=1e-4, rtol=0, msg=lambda m, n=name: n + m)
    assert engine.bank.stored == eager.bank.stored == 8


@pytest.mark.parametrize("network", NETWORKS)
def test_runner_specs_equal_the_layout(aoti, runners, network):
    specs, runner = aoti.specs[network], runners[network]
    assert runner.input_specs == {s.name: (s.shape, DTYPES[s.dtype]) for s in specs if s.is_input}
    assert runner.output_specs == {s.name: (s.shape, DTYPES[s.dtype]) for s in specs if not s.is_input}
    assert list(runner.input_specs) == [s.name for s in specs if s.is_input]  # call order
    assert list(runner.output_specs) == [s.name for s in specs if not s.is_input]


def _stream_bank(unet: BankUNet, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A real previous frame's k/v/o in the bank (a noisier copy of this frame), so feature fusion fires on the
    similar tokens and DyMe merges real features."""
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(9))
    prev = dict(inputs, sample=inputs["sample"] + noise, bank_valid=torch.zeros_like(inputs["bank_valid"]))
    with torch.no_grad():
        cur = unet.run(prev)
    out = dict(inputs)
    for name in unet.layout.bank_names():
        bank = out[name].clone()
        c = cur[name.replace("bank_", "cur_")]
        bank[:, : c.shape[1]] = c  # [B, N, C] into slot 0 of [B, S*N, C]
        out[name] = bank
    return out


@pytest.mark.parametrize("bank_valid", [0.0, 1.0])
def test_unet_matches_eager(aoti, runners, bank_valid):
    unet = aoti.modules["unet"]
    inputs = example_inputs(aoti.specs["unet"], bank_valid=bank_valid, seed=1)
    if bank_valid:
        inputs = _stream_bank(unet, inputs)
    with torch.no_grad():
        ref = unet.run(inputs)
    got = runners["unet"].run(inputs)
    assert list(got) == unet.layout.output_names()
    for name, t in got.items():
        torch.testing.assert_close(t, ref[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("network", ["vae_encoder", "vae_decoder"])
def test_vae_matches_eager(aoti, runners, network):
    (x, y), inputs = aoti.specs[network], example_inputs(aoti.specs[network], seed=1)
    with torch.no_grad():
        ref = aoti.modules[network](inputs[x.name])
    torch.testing.assert_close(runners[network].run(inputs)[y.name], ref, atol=ATOL, rtol=0)


def test_wrong_shapes_raise_and_other_layouts_are_staged(aoti, runners):
    runner = runners["unet"]
    good = example_inputs(aoti.specs["unet"], seed=1)
    with pytest.raises(ValueError, match=r"input sample is .* the package expects"):
        runner.run(dict(good, sample=torch.zeros(1, 4, 8, 9)))
    with pytest.raises(KeyError, match=r"inputs \['bank_valid'\] not given"):
        runner.run({k: v for k, v in good.items() if k != "bank_valid"})
    want = {k: v.clone() for k, v in runner.run(good).items()}
    # Another dtype or strides (the package would misread a strided tensor) go through a contiguous staging copy.
    staged = {
        "encoder_hidden_states": good["encoder_hidden_states"].to(torch.float64),
        "bank_k.0": good["bank_k.0"].transpose(1, 2).contiguous().transpose(1, 2),  # right shape, wrong strides
    }
    got = runner.run(dict(good, **staged))
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, atol=ATOL, rtol=0)


def test_missing_package_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="build it with python -m build_engines --builder aoti"):
        AotiRunner(tmp_path / "unet.pt2", "cpu")


def _rewrite_build_record(src: Path, dst: Path, **changes) -> None:
    """A copy of the package whose stored build record says `changes` (as a package built elsewhere would)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("wrapper_metadata.json"):
                meta = json.loads(data)
                meta[BUILD_KEY] = json.dumps({**json.loads(meta[BUILD_KEY]), **changes})
                data = json.dumps(meta).encode()
            zout.writestr(item, data)


@pytest.mark.parametrize(
    "changes, says",
    [({"device": "cuda", "capability": "9.0"}, "device 'cuda'"), ({"torch": "2.0.0"}, "torch '2.0.0'")],
)
def test_package_for_another_target_is_refused(aoti, tmp_path, changes, says):
    path = tmp_path / "vae_decoder.pt2"
    _rewrite_build_record(aoti.paths["vae_decoder"], path, **changes)
    with pytest.raises(AotiMismatch, match=rf"{says}.*rebuild it on this machine with python -m build_engines"):
        AotiRunner(path, "cpu")


def test_not_a_package_is_refused(tmp_path):
    path = tmp_path / "unet.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an AOTInductor package"):
        AotiRunner(path, "cpu")


def test_options_must_be_plain_json():
    assert aoti_options("cuda", max_autotune=True) == {**DEFAULT_OPTIONS["cuda"], "max_autotune": True}
    assert aoti_options("cuda", {"freezing": False})["freezing"] is False
    with pytest.raises(TypeError, match="JSON"):
        aoti_options("cpu", {"post_grad_custom_pass": lambda g: g})
    with pytest.raises(ValueError, match="reserved"):
        aoti_options("cpu", {"aot_inductor.metadata": {}})


def test_package_copy_runs_elsewhere(aoti, tmp_path):
    """A package is self-contained: a copy in another folder loads and reports the same contract."""
    path = tmp_path / "copy.pt2"
    shutil.copy(aoti.paths["vae_encoder"], path)
    runner = AotiRunner(path, "cpu")
    assert runner.input_specs == {"images": ((1, 3, 64, 64), torch.float32)}


@pytest.mark.parametrize(
    "target, says",
    [
        ({"device": "cpu", "torch": "2.0.0"}, f"compiled by torch 2.0.0, this is torch {torch.__version__}"),
        ({"device": "cuda", "capability": "9.0", "torch": torch.__version__}, "compiled for cuda, asked to run on cpu"),
    ],
)
def test_a_folder_compiled_for_another_target_is_refused_with_the_rebuild_command(aoti, tmp_path, target, says):
    """The manifest's target is checked before any package is loaded (native code runs when loaded)."""
    from streamv2v_trt import StreamV2V
    from streamv2v_trt.manifest import EngineMismatch

    folder = tmp_path / "copy"
    shutil.copytree(aoti.out, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "target": target}))
    with pytest.raises(EngineMismatch) as refused:
        StreamV2V.from_engines(folder, "aoti", device="cpu")
    message = " ".join(str(refused.value).split())
    assert says in message and f"--builder aoti --out {folder}" in message


LEAFSPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"


def test_only_torchs_leafspec_deprecation_is_silenced():
    import warnings

    from build_engines.aoti import _torch_leafspec_warning_silenced

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with _torch_leafspec_warning_silenced():
            warnings.warn(LEAFSPEC, FutureWarning, stacklevel=1)  # torch's internal deprecation: silenced
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)  # anything else still shows
            warnings.warn(LEAFSPEC, UserWarning, stacklevel=1)  # the same words in another category too
    assert [(w.category, str(w.message)) for w in shown] == [
        (FutureWarning, "something else is deprecated"),
        (UserWarning, LEAFSPEC),
    ]


def test_a_compile_shows_no_leafspec_warning(tmp_path):
    """torch 2.13 warned about its own LeafSpec class once per compiled network (three times per build)."""
    import warnings

    from build_engines.aoti import compile_aoti

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        compile_aoti(torch.nn.Linear(4, 4).eval(), {"x": torch.randn(1, 4)}, ["x"], ["y"], tmp_path / "l.pt2", CPU)
    assert (tmp_path / "l.pt2").is_file()
    assert not [w for w in shown if "LeafSpec" in str(w.message)]
