"""VectorQuantizerEMA: EMA arithmetic, inits, dead-code restart, purity in eval, autocast, resume."""

from __future__ import annotations

import pytest
import torch

from mrivq.models.quantizer import VectorQuantizerEMA


def _buffers(m: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_ema_step_matches_hand_computation():
    q = VectorQuantizerEMA(num_embeddings=2, embedding_dim=2, decay=0.9, epsilon=0.0, init="random",
                           dead_code_threshold=0.0, restart_every=0, restart_window=0, decay_warmup=False)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    # three vectors, channel-first [B=1, D=2, L=3]: the first two pick code 0, the third code 1
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [9.0, 9.0]]).t()[None].requires_grad_(True)
    q.train()
    out, loss, idx = q(z)
    assert idx.tolist() == [[0, 0, 1]]
    # counts [2, 1]; sums [[0, 2], [9, 9]]
    assert torch.allclose(q.cluster_size, torch.tensor([0.9 * 1 + 0.1 * 2, 0.9 * 1 + 0.1 * 1]))
    assert torch.allclose(q.embed_sum, torch.tensor([[0.0, 0.2], [9.9, 9.9]]))
    assert torch.allclose(q.codebook, torch.tensor([[0.0, 0.2 / 1.1], [9.9, 9.9]]))
    # output holds the codes selected before the update; loss = 0.25 * mean squared gap (all gaps are 1)
    assert torch.allclose(out[0].t(), torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]))
    assert torch.isclose(loss, torch.tensor(0.25))
    out.sum().backward()  # straight-through: d out / d z = identity
    assert torch.allclose(z.grad, torch.ones_like(z))


def test_kmeans_init_from_first_batch():
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    pts = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2)
    q = VectorQuantizerEMA(num_embeddings=4, embedding_dim=2, init="kmeans", restart_every=0)
    assert not bool(q.initialised)
    q.train()
    q(pts.t()[None])
    assert bool(q.initialised)
    # every true centre has a code next to it (codes were set from the batch, then one EMA step)
    d = torch.cdist(centres, q.codebook)
    assert d.min(1).values.max() < 0.5
    assert sorted(d.argmin(1).tolist()) == [0, 1, 2, 3]


def test_sample_init_takes_batch_vectors():
    torch.manual_seed(0)
    pts = torch.randn(64, 3) + 20.0
    q = VectorQuantizerEMA(num_embeddings=8, embedding_dim=3, init="sample", restart_every=0)
    q.train()
    q(pts.t()[None])
    assert (q.codebook - 20.0).abs().max() < 6.0  # near the data, far from N(0, 1)


def test_dead_codes_restart_near_data_and_usage_rises():
    def run(restart_every: int) -> VectorQuantizerEMA:
        torch.manual_seed(0)
        # nominal decay throughout: a warmed-up decay shrinks unused codes' sums towards the origin
        q = VectorQuantizerEMA(num_embeddings=8, embedding_dim=2, init="random", restart_every=restart_every,
                               restart_window=3, usage_window=5, buffer_size=256, decay_warmup=False)
        q.codebook.copy_(torch.full((8, 2), 100.0))
        q.codebook[0] = torch.tensor([0.5, 0.5])
        q.embed_sum.copy_(q.codebook)
        q.train()
        for _ in range(20):
            q(torch.rand(1, 2, 256))  # uniform in the unit square
        return q

    stuck, revived = run(0), run(2)
    assert stuck.stats()["usage"] == 1 / 8  # without restarts only the code near the data is ever used
    assert torch.allclose(stuck.codebook[1:], torch.tensor(100.0), atol=0.01)
    assert revived.stats()["usage"] > 0.5
    assert revived.codebook.min() > -0.5 and revived.codebook.max() < 1.5  # all re-seeded near data


def test_decay_warmup_follows_tensorflow_schedule_then_holds():
    q = VectorQuantizerEMA(num_embeddings=2, embedding_dim=2, decay=0.9, epsilon=0.0, init="random",
                           dead_code_threshold=0.0, restart_every=0, restart_window=0, decay_warmup=True)
    assert q.current_decay() == 0.1  # (1 + 0) / (10 + 0)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    q.train()
    q(torch.tensor([[2.0, 2.0], [9.0, 9.0]]).t()[None])
    # step 0 used decay 0.1: the codes move 90% of the way to this batch's means
    assert torch.allclose(q.cluster_size, torch.tensor([1.0, 1.0]))
    assert torch.allclose(q.codebook, torch.tensor([[1.8, 1.8], [9.1, 9.1]]))
    assert q.current_decay() == 2 / 11
    q.step.fill_(80)  # (1 + 80) / 90 = 0.9: the nominal decay from here on
    assert q.current_decay() == 0.9
    q.step.fill_(10_000)
    assert q.current_decay() == 0.9
    assert VectorQuantizerEMA(decay=0.9, decay_warmup=False).current_decay() == 0.9  # off: nominal throughout


def test_restart_from_error_or_data_picks_different_seeds():
    """``error`` re-seeds at the worst-quantized vector (an outlier here); ``data`` at a typical one."""
    def seeds(restart_from: str) -> torch.Tensor:
        torch.manual_seed(0)
        q = VectorQuantizerEMA(num_embeddings=2, embedding_dim=2, init="random", restart_every=0,
                               restart_window=1, buffer_size=64, restart_from=restart_from)
        q.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0]]))
        q.embed_sum.copy_(q.codebook)
        pool = torch.zeros(64, 2)
        pool[:63] = torch.tensor([1.0, 0.0])  # the bulk, 1 away from live code 0
        pool[63] = torch.tensor([0.0, 30.0])  # one outlier, 30 away
        q.recent.copy_(pool)
        q.recent_filled.fill_(64)
        q.step.fill_(5)
        q.last_used.copy_(torch.tensor([5, 0]))  # code 1 unused for 5 steps: dead
        q._restart()
        return q.codebook[1]

    assert torch.equal(seeds("error"), torch.tensor([0.0, 30.0]))  # weight 900 vs 63 x 1
    assert torch.equal(seeds("data"), torch.tensor([1.0, 0.0]))  # 63 of 64 rows are the bulk
    with pytest.raises(ValueError, match="restart_from"):
        VectorQuantizerEMA(restart_from="far")


def test_eval_mode_and_pure_calls_never_change_state():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(num_embeddings=16, embedding_dim=4)
    z = torch.randn(2, 4, 3, 3)
    before = _buffers(q)
    q.eval()
    q(z)  # not initialised, eval: no init, no EMA
    q.quantize_indices(z)
    q.embed(torch.zeros(2, 3, 3, dtype=torch.long))
    assert _same(before, _buffers(q))
    q.train()
    q(z)
    trained = _buffers(q)
    assert not _same(before, trained)
    q.quantize_indices(z)  # pure in training mode too
    q.eval()
    q(z)
    assert _same(trained, _buffers(q))


def test_distances_are_float32_under_cpu_autocast():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(num_embeddings=64, embedding_dim=8, init="random", restart_every=0)
    q.codebook.copy_(torch.randn(64, 8) * 0.01 + 1.0)  # close codes: bf16 distances would mis-assign
    z = torch.randn(4, 8, 16) * 0.01 + 1.0
    flat = z.movedim(1, -1).reshape(-1, 8)
    expected = torch.cdist(flat.double(), q.codebook.double()).argmin(1).view(4, 16)
    q.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss, idx = q(z)
        pure = q.quantize_indices(z)
    assert torch.equal(idx, expected) and torch.equal(pure, expected)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32


def test_state_dict_round_trip_resumes_exactly():
    def make() -> VectorQuantizerEMA:
        return VectorQuantizerEMA(num_embeddings=16, embedding_dim=4, restart_every=2, restart_window=2,
                                  usage_window=4, buffer_size=32)

    torch.manual_seed(0)
    a = make().train()
    for _ in range(5):
        a(torch.randn(2, 4, 8))
    b = make()
    b.load_state_dict(a.state_dict())
    b.train()
    assert _same(_buffers(a), _buffers(b)) and a.stats() == b.stats()
    z = torch.randn(2, 4, 8)
    for m in (a, b):
        torch.manual_seed(1)  # restarts draw random numbers: same RNG state, same result
        m(z)
        m(z)
    assert _same(_buffers(a), _buffers(b))


def test_cosine_codes_stay_unit_length():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(num_embeddings=8, embedding_dim=4, use_cosine=True).train()
    for _ in range(3):
        q(torch.randn(2, 4, 16) * 5)
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(8), atol=1e-5)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, xs: list[torch.Tensor],
                start: dict) -> None:
    """One rank of a CPU (gloo) process group: EMA step from a fixed codebook, then inits/restarts."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        q = VectorQuantizerEMA(num_embeddings=4, embedding_dim=3, restart_every=0)
        q.load_state_dict(start)  # same initialised codebook on every rank
        q.train()
        q(xs[rank])  # each rank sees only its own batch
        out["ema"] = _buffers(q)
        for sync in (True, False):
            torch.manual_seed(100 + rank)  # ranks draw different random inits and restarts
            q = VectorQuantizerEMA(num_embeddings=32, embedding_dim=3, init="sample", restart_every=1,
                                   restart_window=1, ddp_sync=sync)
            q.train()
            for step in range(3):
                q(xs[rank] + step)
            out[f"restart_sync={sync}"] = _buffers(q)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_all_reduces_ema_statistics_and_shares_restarts(tmp_path):
    """Under torch.distributed (gloo, 2 processes on CPU) every rank keeps the same codebook, and one
    EMA step equals a single process's step on the ranks' batches put together."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    xs = [torch.randn(2, 3, 4, 4) + 2 * r for r in range(2)]  # different data per rank
    ref = VectorQuantizerEMA(num_embeddings=4, embedding_dim=3, restart_every=0)
    ref.train()
    ref(torch.randn(4, 3, 4, 4))  # initialise from some other batch
    start = _buffers(ref)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path), xs, start), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))

    ref(torch.cat(xs))  # single process, both batches at once
    want = _buffers(ref)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(r0["ema"][name], want[name])
        torch.testing.assert_close(r1["ema"][name], want[name])
    # random inits and dead-code restarts are rank 0's on every rank (the ring of recent encoder
    # outputs they are drawn from stays each rank's own) ...
    shared = {k: v for k, v in r0["restart_sync=True"].items() if k != "recent"}
    assert _same(shared, {k: v for k, v in r1["restart_sync=True"].items() if k != "recent"})
    assert int(shared["step"]) == 3 and bool(shared["initialised"])
    # ... and would drift apart without the synchronisation
    assert not torch.equal(r0["restart_sync=False"]["codebook"], r1["restart_sync=False"]["codebook"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_batch_leaves_the_codebook_untouched(bad):
    """An fp16 overflow upstream gives inf/NaN latents: the EMA statistics must not take them in (the
    training loop then rejects the step), neither before nor after the data initialisation."""
    q = VectorQuantizerEMA(num_embeddings=8, embedding_dim=2, init="sample")
    q.train()
    z = torch.randn(2, 2, 16)
    z_bad = z.clone()
    z_bad[0, 0, 3] = bad
    q(z_bad)
    assert not bool(q.initialised), "initialised from a non-finite batch"
    q(z)
    before = _buffers(q)
    q(z_bad)
    after = _buffers(q)
    assert _same(before, after)
    assert all(torch.isfinite(v.float()).all() for v in after.values())
