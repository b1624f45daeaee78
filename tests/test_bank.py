"""FeatureBank (DyMe and FIFO) and the DyMe reference, on a hand-made two-layer layout (no model needed)."""

import pytest
import torch

from streamv2v_trt.bank import NO_UPDATE, BankOp, FeatureBank
from streamv2v_trt.config import BankConfig
from streamv2v_trt.kernels.dyme import COSINE_EPS, dyme_merge, dyme_ref
from streamv2v_trt.layout import BankLayer, BankLayout
from streamv2v_trt.spec import BankKind

BATCH = 2
LAYERS = (
    BankLayer(0, "down_blocks.0.attentions.0.transformer_blocks.0.attn1", tokens=16, channels=8, fuse=False),
    BankLayer(1, "up_blocks.1.attentions.0.transformer_blocks.0.attn1", tokens=4, channels=12, fuse=True),
)


def make_bank(kind=BankKind.DYME, frames=1, seed=0, perm_pool=32, interval=1):
    """interval=1: every frame updates the bank, so `update(frame_id, ...)` with consecutive ids stores or merges."""
    cfg = BankConfig(interval=interval, seed=seed, perm_pool=perm_pool)
    return FeatureBank(BankLayout(LAYERS, kind, frames), cfg, BATCH, "cpu", torch.float32)


def frame_outputs(bank, seed):
    """What one UNet call returns for the bank: `cur_k.0`, ... filled with seeded random tokens."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"cur_{p}.{layer.index}": torch.randn(BATCH, layer.tokens, layer.channels, generator=g)
        for layer in bank.layout.layers
        for p in bank.layout.parts(layer)
    }


def snapshot(bank):
    return {name: t.clone() for name, t in bank.inputs().items()}


def test_dyme_keeps_fixed_size_after_100_updates():
    bank = make_bank()
    shapes = {n: t.shape for n, t in bank.inputs().items()}
    ptrs = {n: t.data_ptr() for n, t in bank.inputs().items()}
    assert set(shapes) == {"bank_valid", "bank_k.0", "bank_v.0", "bank_k.1", "bank_v.1", "bank_o.1"}
    for i in range(100):
        bank.update(i, frame_outputs(bank, seed=i))
    assert {n: t.shape for n, t in bank.inputs().items()} == shapes
    assert {n: t.data_ptr() for n, t in bank.inputs().items()} == ptrs
    assert all(torch.isfinite(t).all() for t in bank.tensors.values())
    assert bank.stored == 100 and bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0]
    assert bank.perm_index.item() == 99 % 32  # 99 merges after the first store, through a pool of 32


def test_dyme_is_deterministic_with_a_seed():
    banks = [make_bank(seed=0), make_bank(seed=0), make_bank(seed=1)]
    for i in range(5):
        for bank in banks:
            bank.update(i, frame_outputs(bank, seed=i))
    same, other = snapshot(banks[1]), snapshot(banks[2])
    for name, t in snapshot(banks[0]).items():
        assert torch.equal(t, same[name]), name
    assert any(not torch.equal(t, other[name]) for name, t in snapshot(banks[0]).items() if name != "bank_valid")


def test_identical_tokens_merge_to_themselves():
    B, N, C = 2, 9, 6
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(B, N, C, generator=g) for _ in range(3)]  # K, V, O; bank and current hold the same tokens
    # Sources: the bank's tokens; destinations: their twins in the current frame, shuffled. Each source's best
    # match is its twin (cosine 1), so every destination is the mean of two equal tokens: itself.
    src = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    dst = torch.stack([torch.randperm(N, generator=g) for _ in range(B)]) + N
    perm = torch.cat([src, dst], dim=1)
    for merged, part in zip(dyme_merge(x, x, perm), x):
        torch.testing.assert_close(merged, torch.gather(part, 1, (dst - N)[..., None].expand(-1, -1, C)))
    # All 2N tokens equal: any split merges to that token.
    same = [torch.full((B, N, C), 0.5)]
    perm = torch.stack([torch.randperm(2 * N, generator=g) for _ in range(B)])
    torch.testing.assert_close(dyme_ref(same, same, perm)[0], same[0])


def cosine(a, b):
    return float(a @ b) / (max(float(a.norm()), COSINE_EPS) * max(float(b.norm()), COSINE_EPS))


def loop_reference(bank, current, perm):
    """DESIGN.md §3 DyMe, written out token by token."""
    B, N, _ = bank[0].shape
    out = [torch.empty_like(x) for x in bank]
    for b in range(B):
        tokens = [torch.cat([x[b], y[b]]) for x, y in zip(bank, current)]  # per part: [2N, C]
        sources, dests = perm[b, :N].tolist(), perm[b, N:].tolist()
        sums = [[t[d].clone() for d in dests] for t in tokens]
        counts = [1] * N
        for a in sources:
            sims = [cosine(tokens[0][a], tokens[0][d]) for d in dests]
            j = max(range(N), key=lambda i: (sims[i], -i))  # argmax, ties to the lowest index
            counts[j] += 1
            for part, t in zip(sums, tokens):
                part[j] += t[a]
        for o, part in zip(out, sums):
            for j in range(N):
                o[b, j] = part[j] / counts[j]
    return out


@pytest.mark.parametrize("B,N,C", [(2, 7, 5), (1, 1, 3), (3, 12, 16)])
def test_dyme_ref_equals_a_plain_loop(B, N, C):
    g = torch.Generator().manual_seed(N)
    bank = [torch.randn(B, N, C, generator=g, dtype=torch.float64) for _ in range(3)]
    current = [torch.randn(B, N, C, generator=g, dtype=torch.float64) for _ in range(3)]
    perm = torch.stack([torch.randperm(2 * N, generator=g) for _ in range(B)])
    for got, want in zip(dyme_ref(bank, current, perm), loop_reference(bank, current, perm)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fifo_keeps_the_last_k_frames():
    k = 3
    bank = make_bank(BankKind.FIFO, frames=k)
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [0.0] * k
    history = []
    for f in range(8):
        history.append(frame_outputs(bank, seed=100 + f))
        bank.update(f, history[-1])
        assert bank.valid.unique(dim=0).squeeze(0).tolist() == [
            1.0 if s <= f else 0.0 for s in range(k)
        ]  # fills slot by slot
        for layer in LAYERS:
            n = layer.tokens
            for p in bank.layout.parts(layer):
                t = bank.tensors[f"bank_{p}.{layer.index}"]  # [B, k*N, C]
                for s in range(k):
                    held = [g for g in range(f + 1) if g % k == s]  # frames written to slot s (a ring)
                    want = history[held[-1]][f"cur_{p}.{layer.index}"] if held else torch.zeros_like(t[:, :n])
                    assert torch.equal(t[:, s * n : (s + 1) * n], want), (f, p, layer.index, s)
    # The last k frames, and only those, are in the bank.
    k0 = bank.tensors["bank_k.0"]
    stored = {tuple(k0[:, s * 16 : (s + 1) * 16].flatten().tolist()) for s in range(k)}
    assert stored == {tuple(h["cur_k.0"].flatten().tolist()) for h in history[-k:]}


def test_dyme_bank_valid_and_first_store():
    bank = make_bank()
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [0.0]
    first = frame_outputs(bank, seed=0)
    bank.update(0, first)
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0]
    for name, t in bank.tensors.items():  # frame 0 is stored as is, not merged with the empty bank
        assert torch.equal(t, first[name.replace("bank_", "cur_")]), name
    bank.update(1, frame_outputs(bank, seed=1))
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0]
    assert not torch.equal(bank.tensors["bank_k.0"], first["cur_k.0"])


@pytest.mark.parametrize("kind,frames", [(BankKind.DYME, 1), (BankKind.FIFO, 2)])
def test_reset_restores_the_empty_state(kind, frames):
    bank = make_bank(kind, frames, perm_pool=4)
    empty = snapshot(bank)
    ptrs = {n: t.data_ptr() for n, t in bank.inputs().items()}
    run = []
    for i in range(6):
        bank.update(i, frame_outputs(bank, seed=i))
        run.append(snapshot(bank))
    bank.reset()
    assert bank.stored == 0 and bank.perm_index.item() == 0
    assert {n: t.data_ptr() for n, t in bank.inputs().items()} == ptrs
    for name, t in bank.inputs().items():
        assert torch.equal(t, empty[name]), name
    for i in range(6):  # the same frames after a reset give the same banks, DyMe permutations included
        bank.update(i, frame_outputs(bank, seed=i))
        for name, t in bank.inputs().items():
            assert torch.equal(t, run[i][name]), (i, name)


# --- the bank plans its own updates: plan (host) / apply (device) / advance (host counter) -----------------


def test_dyme_plan_stores_frame_0_then_merges_every_interval():
    bank = make_bank(interval=4)
    assert bank.plan(0) == BankOp("store", 0)
    assert [bank.plan(f) for f in (1, 2, 3, 5, 7)] == [NO_UPDATE] * 5
    assert bank.plan(0) == BankOp("store", 0) and bank.stored == 0  # planning changes nothing
    bank.advance(bank.plan(0))
    assert bank.stored == 1
    assert bank.plan(4) == BankOp("merge") and bank.plan(8) == BankOp("merge")
    assert [bank.plan(f) for f in (1, 2, 3, 5, 6, 7, 9)] == [NO_UPDATE] * 7
    bank.advance(NO_UPDATE)
    assert bank.stored == 1  # a frame without an update does not count
    bank.advance(BankOp("merge"))
    assert bank.stored == 2 and bank.plan(8) == BankOp("merge")
    bank.reset()
    assert bank.stored == 0 and bank.plan(0) == BankOp("store", 0)
    # An empty bank stores whatever the frame id (the first update after a reset is never a merge).
    assert bank.plan(4) == BankOp("store", 0)


def test_fifo_plan_stores_into_the_ring_slots():
    k = 3
    bank = make_bank(BankKind.FIFO, frames=k, interval=2)
    plans = []
    for f in range(12):
        op = bank.plan(f)
        plans.append(op)
        bank.advance(op)
    stores = [BankOp("store", s) for s in (0, 1, 2, 0, 1, 2)]
    assert plans == [x for s in stores for x in (s, NO_UPDATE)]
    assert bank.stored == 6


def test_apply_never_moves_host_counters():
    bank = make_bank(BankKind.FIFO, frames=2, interval=4)
    current = frame_outputs(bank, seed=0)
    for op in (NO_UPDATE, BankOp("store", 0), BankOp("store", 1), BankOp("store", 1)):
        bank.apply(op, current)
        assert bank.stored == 0 and bank.plan(0) == BankOp("store", 0)  # the plan still sees an empty ring
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0, 1.0]
    dyme = make_bank(interval=4)
    dyme.apply(dyme.plan(0), current)
    dyme.apply(BankOp("merge"), frame_outputs(dyme, seed=1))
    assert dyme.stored == 0 and dyme.plan(0) == BankOp("store", 0)


def test_apply_none_changes_nothing():
    bank = make_bank()
    bank.update(0, frame_outputs(bank, seed=0))
    before = snapshot(bank)
    perm_index = bank.perm_index.clone()
    bank.apply(NO_UPDATE, frame_outputs(bank, seed=1))
    assert torch.equal(bank.perm_index, perm_index)
    for name, t in bank.inputs().items():
        assert torch.equal(t, before[name]), name


def test_fifo_store_writes_only_its_slot():
    k = 3
    bank = make_bank(BankKind.FIFO, frames=k)
    current = frame_outputs(bank, seed=4)
    bank.apply(BankOp("store", 1), current)
    assert bank.valid.unique(dim=0).squeeze(0).tolist() == [0.0, 1.0, 0.0]
    for layer in LAYERS:
        n = layer.tokens
        for p in bank.layout.parts(layer):
            t = bank.tensors[f"bank_{p}.{layer.index}"]
            assert torch.equal(t[:, n : 2 * n], current[f"cur_{p}.{layer.index}"])
            assert not t[:, :n].any() and not t[:, 2 * n :].any()


def test_merge_applies_dyme_with_the_pooled_permutation():
    pool = 3
    bank = make_bank(perm_pool=pool, interval=1)
    history = [frame_outputs(bank, seed=10 + i) for i in range(pool + 2)]
    bank.update(0, history[0])
    want = {name: t.clone() for name, t in bank.tensors.items()}
    for i in range(1, pool + 2):
        op = bank.plan(i)
        assert op == BankOp("merge")
        perm_used = (i - 1) % pool  # the device counter picks the permutation; it wraps around the pool
        assert bank.perm_index.item() == perm_used
        bank.apply(op, history[i])
        for layer in LAYERS:
            names = [f"{{}}_{p}.{layer.index}" for p in bank.layout.parts(layer)]
            merged = dyme_ref(
                [want[n.format("bank")] for n in names],
                [history[i][n.format("cur")] for n in names],
                bank.perms[layer.index][perm_used],
            )
            for n, m in zip(names, merged):
                want[n.format("bank")] = m
        for name, t in bank.tensors.items():
            torch.testing.assert_close(t, want[name], rtol=0, atol=0, msg=f"merge {i}: {name}")
        bank.advance(op)
    assert bank.perm_index.item() == (pool + 1) % pool and bank.stored == pool + 2
