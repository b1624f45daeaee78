"""`python -m streamv2v_trt demo`: builds (or reuses) the tiny engines and streams eager and engine paths."""

import importlib.util

import av
import pytest

from streamv2v_trt.cli.main import main


@pytest.mark.slow
def test_demo_builds_engines_runs_both_paths_and_writes_a_playable_mp4(tmp_path, capsys):
    out, engines = tmp_path / "demo.mp4", tmp_path / "engines"
    argv = ["demo", "--frames", "6", "--size", "64", "--out", str(out), "--engines", str(engines)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "eager (cpu):" in printed and "onnxruntime (fp32, cpu):" in printed and "x eager" in printed
    assert "built " in printed and (engines / "onnxruntime-fp32" / "manifest.json").is_file()
    if importlib.util.find_spec("tensorrt_rtx") or importlib.util.find_spec("tensorrt"):
        assert (engines / "tensorrt-fp16" / "unet.engine").is_file()
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 3 * 64, 3)  # input | eager | engine

    # A second run reuses the engines instead of rebuilding them.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reused " in printed and "built " not in printed
