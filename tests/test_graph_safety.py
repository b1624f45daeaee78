"""The device part of a frame must be capturable in a CUDA graph: no host data written into a tensor, no host sync.

`CudaGraphStream` records `render(plan, image)` once per plan and replays it. A host scalar copied into a stream
buffer (`valid[s] = 1`, `torch.tensor(...)`) is baked into the graph at capture, and a sync (`.item()`,
`nonzero`) cannot be captured at all; neither shows on the CPU, where nothing is captured. So every kind of frame
runs here, eagerly on the tiny model, under a dispatch mode that records each aten op and fails on the ones that
move host data into a tensor or wait for the device. (DyMe merges run
`streamv2v_trt.kernels.dyme.dyme_merge`, which takes the torch reference on CPU tensors; on CUDA it launches the
Triton kernels, which tests/test_kernels.py covers.)
"""

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from torch.utils._python_dispatch import TorchDispatchMode

from streamv2v_trt import BankConfig, StreamConfig, StreamV2V
from streamv2v_trt.backends.eager import EagerBackend
from streamv2v_trt.bank import NO_UPDATE, BankOp
from streamv2v_trt.frames import image_to_uint8, uint8_to_image
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.pipeline import FramePlan
from streamv2v_trt.prompt import PromptEncoder

SIZE = 64
aten = torch.ops.aten

pytestmark = pytest.mark.usefixtures("one_thread")

# A tensor made from host data (`t[i] = 1`, `torch.tensor(...)`), a value read back by the host, a data-dependent
# shape: each either bakes a host value into a captured graph or synchronises.
FORBIDDEN = {
    aten.lift_fresh.default: "a tensor made from host data (t[i] = x, torch.tensor(...))",
    aten.lift_fresh_copy.default: "a tensor made from host data",
    aten.lift.default: "a tensor made from host data",
    aten.item.default: ".item(): a host sync",
    aten._local_scalar_dense.default: "a value read by the host: a sync",
    aten.is_nonzero.default: "bool(tensor): a host sync",
    aten.equal.default: "torch.equal: a host sync",
    aten.nonzero.default: "nonzero: a data-dependent shape (host sync)",
    aten.masked_select.default: "masked_select: a data-dependent shape (host sync)",
}


def target_device(args, kwargs) -> torch.device | None:
    """Where `aten.to.*` / `aten._to_copy` moves its tensor: a `device=` keyword, a device or tensor argument."""
    if kwargs.get("device") is not None:
        return torch.device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (torch.device, torch.Tensor)):
            return a if isinstance(a, torch.device) else a.device
    return None


class HostTraffic(TorchDispatchMode):
    """Records every op that is FORBIDDEN, or copies between devices (a host<->device transfer)."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in FORBIDDEN:
            self.problems.append(f"{func}: {FORBIDDEN[func]}")
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.problems.append(f"{func} with a boolean mask: a data-dependent shape (host sync)")
        elif func is aten.copy_.default and args[0].device != args[1].device:
            self.problems.append(f"{func} from {args[1].device} into {args[0].device}")
        elif func.overloadpacket in (aten.to, aten._to_copy):
            target = target_device(args, kwargs)
            if target is not None and target != args[0].device:
                self.problems.append(f"{func} from {args[0].device} to {target}")
        return func(*args, **kwargs)


def test_the_watcher_catches_host_writes_and_syncs():
    """The checks below can fail: each kind of op they forbid is seen."""
    valid = torch.zeros(3)
    cases = {
        "setitem": lambda: valid.__setitem__(1, 1.0),
        "tensor": lambda: torch.tensor([1.0]),
        "item": lambda: valid.sum().item(),
        "bool": lambda: bool(valid.any()),
        "nonzero": lambda: valid.nonzero(),
        "mask": lambda: valid[valid > 0],
        "to meta": lambda: valid.to("meta"),
        "copy into meta": lambda: torch.empty(3, device="meta").copy_(valid),
        "to a meta tensor": lambda: valid.to(torch.empty(1, device="meta")),
        "to meta, as float64": lambda: valid.to("meta", torch.float64),
    }
    for name, op in cases.items():
        with torch.inference_mode(), HostTraffic() as watch:
            op()
        assert watch.problems, name
    with torch.inference_mode(), HostTraffic() as watch:  # what the bank does instead
        valid[1:2].fill_(1)
        valid.add_(torch.ones_like(valid)).remainder_(4)
    assert not watch.problems and watch.ops == 5


@pytest.fixture(scope="module")
def parts():
    models = load_models(tiny_spec())
    return models, PromptEncoder(models.tokenizer, models.text_encoder), {}


def make(parts, spec, **runtime):
    models, encoder, backends = parts
    key = (spec.bank, spec.bank_frames)
    if key not in backends:  # the networks depend on the bank kind and size, not on steps or guidance
        backends[key] = EagerBackend(models, spec)
    stream = StreamV2V(backends[key], encoder, models.scheduler, StreamConfig(spec, **runtime))
    stream.update_prompt("a painting of a cat", negative_prompt="blurry")
    return stream


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]


def run_watched(stream, n):
    """`n` frames as CudaGraphStream runs them: plan on the host, the device work (uint8 input buffer -> uint8
    output, `CudaGraphStream._frame`) under the watcher, then advance. Returns the plans."""
    frame_in = torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8)  # the fixed input buffer a graph reads
    plans = []
    with torch.inference_mode():
        for f in frames(n):
            frame_in.copy_(f)  # the upload, outside the graph
            plan = stream.plan()
            counters = (stream.frame_id, stream.bank.stored)
            with HostTraffic() as watch:
                out = image_to_uint8(stream.render(plan, uint8_to_image(frame_in, stream.dtype)))
            assert not watch.problems, (plan, sorted(set(watch.problems)))
            assert watch.ops > 100  # the whole frame ran under the watcher
            assert out.shape == (SIZE, SIZE, 3)
            assert (stream.frame_id, stream.bank.stored) == counters, plan  # only advance moves them
            stream.advance(plan)
            assert stream.frame_id == counters[0] + 1
            assert stream.bank.stored == counters[1] + (plan.bank.kind != "none")
            plans.append(plan)
    return plans


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
def test_dyme_frames_priming_store_steady_merge(parts, cfg_type):
    spec = tiny_spec(steps=2, cfg_type=cfg_type)
    stream = make(parts, spec, t_index_list=(20, 30), guidance_scale=1.5, prime=True, bank=BankConfig(interval=2))
    plans = run_watched(stream, 5)
    store, merge = BankOp("store", 0), BankOp("merge")
    assert plans == [FramePlan(True, store), FramePlan(False, NO_UPDATE), FramePlan(False, merge)] + [
        FramePlan(False, NO_UPDATE),
        FramePlan(False, merge),
    ]
    assert stream.bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0]


def test_dyme_store_without_priming(parts):
    stream = make(parts, tiny_spec())
    assert run_watched(stream, 2) == [FramePlan(False, BankOp("store", 0)), FramePlan(False, NO_UPDATE)]


def test_fifo_stores_into_slot_1(parts):
    spec = tiny_spec(bank="fifo", bank_frames=2)
    stream = make(parts, spec, bank=BankConfig(interval=1))
    plans = run_watched(stream, 3)
    assert [p.bank for p in plans] == [BankOp("store", 0), BankOp("store", 1), BankOp("store", 0)]
    assert stream.bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0, 1.0]
