"""Logging for every command line entry point: our packages at INFO, third-party libraries at WARNING
(the ONNX exporter's optimiser logs thousands of INFO lines per export)."""

from __future__ import annotations

import logging

OUR_PACKAGES = ("streamv2v_trt", "build_engines", "kernels", "benchmarks")


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for name in OUR_PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
