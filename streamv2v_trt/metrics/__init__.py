"""Quality metrics of a translated video: warp error (`metrics.warp`, needs OpenCV) and CLIP scores
(`metrics.clip`, needs a local CLIPModel folder).

`python -m streamv2v_trt.metrics warp-error IN OUT` and `python -m streamv2v_trt.metrics clip-score OUT
--prompt ... --clip FOLDER`. Nothing is imported here, so each metric only needs its own dependencies.
"""
