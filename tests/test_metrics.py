"""Warp error and CLIP scores on generated videos whose answer is known."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from skimage import data

from streamv2v_trt.metrics.__main__ import main as metrics_main
from streamv2v_trt.metrics.warp import warp_error
from streamv2v_trt.video_io import VideoWriter


def pan(n: int = 12, step: int = 2) -> list[np.ndarray]:
    img = data.astronaut()[::4, ::4]  # [128, 128, 3]
    return [np.ascontiguousarray(img[20:84, 10 + step * i : 74 + step * i]) for i in range(n)]


def write_clip(path, frames: list[np.ndarray]) -> None:
    with VideoWriter(path, frames[0].shape[1], frames[0].shape[0], Fraction(12)) as w:
        for f in frames:
            w.write(f)


def shuffled(frames: list[np.ndarray]) -> list[np.ndarray]:
    perm = np.random.default_rng(0).permutation(len(frames))
    return [frames[i] for i in perm]


def test_still_video_has_no_warp_error():
    still = [pan(1)[0]] * 8
    r = warp_error(still, still)
    assert r.value < 0.1  # 0-255 scale; Farneback's flow on identical frames is ~0, not exactly 0
    assert len(r.per_pair) == 7


def test_smooth_pan_is_small_and_shuffled_pan_is_large():
    frames = pan()
    smooth = warp_error(frames, frames).value
    assert smooth < 1.0
    assert warp_error(frames, shuffled(frames)).value > 20 * smooth + 10


def test_flow_comes_from_the_input_video():
    # Output moves while the input stands still: the output's motion is flicker, not consistency.
    frames = pan()
    still = [frames[0]] * len(frames)
    assert warp_error(still, frames).value > 10
    # ... and the other way round: a still output over a moving input does not match the motion either.
    assert warp_error(frames, still).value > 10


def test_mse_orders_like_l1_and_lives_on_the_unit_scale():
    frames = pan()
    smooth, bad = warp_error(frames, frames, "mse").value, warp_error(frames, shuffled(frames), "mse").value
    assert 0 <= smooth < 1e-3 < bad < 1


def test_input_is_fitted_to_the_output_size():
    frames = pan()
    big = [np.kron(f, np.ones((2, 2, 1), dtype=np.uint8)) for f in frames]  # 128x128 copy of the same motion
    assert warp_error(big, frames).value < 1.0


def test_needs_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        warp_error(pan(1), pan(1))


def test_warp_error_cli_on_video_files(tmp_path, capsys):
    src, bad = tmp_path / "in.mp4", tmp_path / "shuffled.mp4"
    write_clip(src, pan())
    write_clip(bad, shuffled(pan()))
    assert metrics_main(["warp-error", str(src), str(src), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert metrics_main(["warp-error", str(src), str(bad), "--json"]) == 0
    worse = json.loads(capsys.readouterr().out)
    assert same["pairs"] == 11 and same["warp_error"] < 2 < 10 < worse["warp_error"]
    assert metrics_main(["warp-error", str(tmp_path / "missing.mp4"), str(src)]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    return path


def test_clip_scores_match_the_model_and_measure_consistency(clip_dir):
    from streamv2v_trt.metrics.clip import ClipScorer

    scorer = ClipScorer(clip_dir)
    frames = pan(6)
    s = scorer.score(frames, "an astronaut")
    # The text score is CLIPModel's own image-text cosine (logits / logit_scale) on our preprocessing.
    ids = scorer.tokenizer("an astronaut", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = scorer.model(input_ids=ids, pixel_values=scorer.preprocess(frames))
        expected = (out.logits_per_image[:, 0] / scorer.model.logit_scale.exp()).mean() * 100
    assert s.text == pytest.approx(float(expected), abs=1e-3)
    assert scorer.score([frames[0]] * 4, "x").consistency == pytest.approx(100.0, abs=1e-3)
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(6)]
    assert scorer.score(noise, "x").consistency < s.consistency


def test_clip_preprocessing_matches_transformers(clip_dir):
    transformers = pytest.importorskip("transformers")
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    from streamv2v_trt.metrics.clip import ClipScorer

    scorer = ClipScorer(clip_dir)
    scorer.size = scorer.crop = 224
    proc = proc_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    image = np.ascontiguousarray(data.chelsea())  # 300x451: resize and crop both matter
    theirs = proc(images=[image], return_tensors="pt").pixel_values
    ours = scorer.preprocess([image])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().mean() < 0.02  # PIL and torch bicubic differ slightly


def test_clip_score_cli(clip_dir, tmp_path, capsys):
    video = tmp_path / "v.mp4"
    write_clip(video, pan(4))
    assert metrics_main(["clip-score", str(video), "--prompt", "an astronaut", "--clip", str(clip_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["frames"] == 4 and -100 <= result["clip_text"] <= 100 and result["clip_consistency"] > 90
    assert metrics_main(["clip-score", str(video), "--prompt", "x", "--clip", str(tmp_path / "none")]) == 1
    assert "not a CLIP model folder" in capsys.readouterr().err
