"""`python -m streamv2v_trt demo`: builds (or reuses) the tiny engines and streams eager and engine paths."""

import av
import pytest
from conftest import tiny_spec

from streamv2v_trt.cli.main import main


@pytest.mark.slow
def test_demo_reuses_or_builds_engines_runs_both_paths_and_writes_a_playable_mp4(tmp_path, capsys, tiny_build):
    # The demo's ONNX build (64x64, fp32) is one of the session's shared folders, so it is reused; the demo's own
    # root keeps anything it would build away from folders other test workers read.
    shared = tiny_build(tiny_spec())
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / shared.name).symlink_to(shared, target_is_directory=True)
    out = tmp_path / "demo.mp4"
    argv = ["demo", "--frames", "6", "--size", "64", "--out", str(out), "--engines", str(engines)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eager (cpu, fp32):" in printed and "onnxruntime (cpu, fp32):" in printed and "x eager" in printed
    # One thread policy, or the ratio means nothing; and the device it ran on, as benchmarks.fps and video name it.
    assert "on cpu (" in printed and "1 CPU thread(s) for every path" in printed
    assert f"reused {engines / 'tiny-64x64-b1-dyme1-taesd-fp32'}" in printed
    # Only what runs is built: on a CPU no TensorRT-RTX folder (it builds there, but runs only on a supported GPU).
    assert [p.name for p in engines.iterdir()] == [shared.name] and "tensorrt-rtx" not in printed
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 3 * 64, 3)  # input | eager | engine

    # A second run reuses every build instead of rebuilding it.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reused " in printed and "built " not in printed
