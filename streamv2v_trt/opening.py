"""Open a stream: `open_stream(source, cfg)` and `open_multistream(source, cfg, K)`, the one way every surface
opens its streams (`video`, `serve` and each Ray replica, the demo, the benchmarks).

    stream = open_stream(Source(engines="engines/sd-turbo-512x512-b1-dyme1-taesd-fp16-aoti", cuda_graphs=True))
    stream = open_stream(Source(model="sd-turbo", device="cuda"), cfg, prompt="a watercolor painting")
    multi = open_multistream(Source(engines="engines/tiny-64x64-b1-s4-dyme1-taesd-fp32"), streams=4)

`Source` (source.py) says where the networks come from and how they run, `StreamConfig` what they run.
"""

from __future__ import annotations

from .blending import PromptBlend
from .config import StreamConfig
from .cuda_graph import CudaGraphStream
from .multistream import MultiStream
from .pipeline import StreamV2V
from .source import Source
from .stream import Stream


def open_stream(
    source: Source | None = None,
    cfg: StreamConfig | None = None,
    *,
    prompt: PromptBlend = "",
    negative_prompt: str = "",
    **runtime,
) -> Stream:
    """One stream: a `StreamV2V`, or a `CudaGraphStream` over it with `source.cuda_graphs`.

    cfg: what it runs (default: the model preset's spec, or the folder's own, with the `runtime` settings, e.g.
    `seed=3, t_index_list=(30,)`). A folder built for another spec is refused with `EngineMismatch`, which names
    every difference and the command that rebuilds it. `negative_prompt`: RCFG initialize and full CFG.
    """
    source = source or Source()
    stream = StreamV2V.from_source(source, cfg, prompt=prompt, negative_prompt=negative_prompt, **runtime)
    return CudaGraphStream(stream) if source.cuda_graphs else stream


def open_multistream(
    source: Source | None = None,
    cfg: StreamConfig | None = None,
    streams: int | None = None,
    *,
    prompt: PromptBlend = "",
    negative_prompt: str = "",
    **runtime,
) -> MultiStream:
    """`streams` slots batched into one network call per tick (`MultiStream`; each slot with this prompt).

    streams: default `cfg.spec.max_streams` (a folder's K). A build folder runs exactly the K it was built for
    (`--max-streams K`); another K is refused with the command that builds it. Eager runs any K.
    """
    return MultiStream.from_source(
        source or Source(), cfg, streams, prompt=prompt, negative_prompt=negative_prompt, **runtime
    )
