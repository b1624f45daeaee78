"""Graph cleanup as named onnx-graphsurgeon passes that log node counts, then save (+ external data) and check."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialise a message of 2 GiB or more: weights go to external data


@dataclass(frozen=True)
class CleanupReport:
    passes: tuple[tuple[str, int], ...]  # (pass name, node count after it), starting with ("export", n)

    @property
    def nodes(self) -> int:
        return self.passes[-1][1]


def cleanup(model: onnx.ModelProto, name: str) -> tuple[onnx.ModelProto, CleanupReport]:
    """Fold constants (ONNX Runtime evaluates constant subgraphs), drop unused nodes/tensors, sort topologically."""
    graph = gs.import_onnx(model)
    counts = [("export", len(graph.nodes))]
    passes = (
        ("fold_constants", lambda g: g.fold_constants()),
        ("cleanup", lambda g: g.cleanup(remove_unused_graph_inputs=False)),  # the I/O contract keeps every input
        ("toposort", lambda g: g.toposort()),
    )
    for pass_name, run in passes:
        run(graph)
        counts.append((pass_name, len(graph.nodes)))
        log.info("%s: %-14s %5d nodes", name, pass_name, len(graph.nodes))
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version  # keep the exporter's IR version: older parsers reject newer ones
    return out, CleanupReport(tuple(counts))


def weights_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: Path) -> Path | None:
    """Save `model` to `path`; weights go to `<path>.data` when the file would pass 2 GB. Returns that data file.

    The saved file is then checked with `onnx.checker` by path (which also reads external data).
    """
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external data file
    external = weights_bytes(model) > PROTO_LIMIT - (64 << 20)  # leave room for the graph itself
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=data.name)
    onnx.checker.check_model(str(path))
    log.info("saved %s (%s)", path, f"weights in {data.name}" if external else "weights inline")
    return data if external else None
