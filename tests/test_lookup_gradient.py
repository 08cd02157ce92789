"""The token lookup's gradient kept as rows: the same values as the dense gradient, read by the Triton
AdamW kernel where it would read the dense one (on CPU through Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_utils import interpreted

from nemo_lite.training.fast.lookup_gradient import LookupGradient, lookup
from nemo_lite.training.fast.optim import FusedAdamW, clip_factor
from nemo_lite.training.fast.swaps import RowsEmbedding, swap_in_lookup_rows, swap_in_weight_copies

ADAMW_KERNEL = "nemo_lite.training.fast.adamw_kernel"


def lookups_of(device: str, vocab: int = 37, hidden: int = 41, micro_batches: int = 2, padding_idx: int | None = None):
    """Two micro-batches of ids with many repeats, through ``lookup`` and through ``F.embedding`` (with
    ``padding_idx``: that token's lookups add no gradient)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=gen).to(device)
    batches = [
        (torch.randint(0, vocab // 2, (3, 50), generator=gen).to(device), torch.randn(3, 50, hidden, generator=gen))
        for _ in range(micro_batches)
    ]
    sink = LookupGradient(weight, padding_idx)
    dense = weight.clone().requires_grad_()
    sparse = weight.clone().requires_grad_()
    for ids, upstream in batches:
        upstream = upstream.to(device)
        (F.embedding(ids, dense, padding_idx=padding_idx) * upstream).sum().backward()
        out = lookup(sparse, ids, sink)
        assert torch.equal(out, F.embedding(ids, weight))
        (out * upstream).sum().backward()
    assert sparse.grad is None  # it went to the sink
    return sink, dense.grad, torch.cat([ids.reshape(-1) for ids, _ in batches])


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_rows_hold_the_dense_lookup_gradient(micro_batches):
    sink, want, ids = lookups_of("cpu", micro_batches=micro_batches)
    row_slot, rows = sink.rows()
    seen = torch.zeros(want.shape[0], dtype=torch.bool)
    seen[ids] = True
    assert (row_slot[~seen] == -1).all() and (row_slot[seen] >= 0).all()
    assert row_slot[seen].unique().numel() == int(seen.sum())  # one row per distinct token
    if micro_batches == 1:  # summed in the dense gradient's order
        assert torch.equal(rows[row_slot[seen].long()], want[seen]) and torch.equal(sink.dense(), want)
    else:  # one sum over both micro-batches, where autograd adds the two micro-batches' sums
        torch.testing.assert_close(sink.dense(), want, rtol=1e-6, atol=1e-6)
    assert (sink.dense()[~seen] == 0).all()
    assert sink.rows()[1] is rows  # reduced once per set of lookups
    sink.clear()
    assert not sink
    with pytest.raises(ValueError, match="no lookup gradient arrived"):
        sink.rows()


def test_a_lookup_gradient_must_fit_its_matrix():
    sink = LookupGradient(torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"a lookup of ids \(2, 3\) needs a gradient of \(2, 3, 4\)"):
        sink.add(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="2-d embedding matrix"):
        LookupGradient(torch.zeros(10))


def test_the_norm_names_a_gradient_it_cannot_read():
    pytest.importorskip("triton")
    from nemo_lite.training.fast import adamw_kernel

    strided = torch.zeros(8, 6, dtype=torch.bfloat16).t()
    with pytest.raises(ValueError, match=r"contiguous, 16-byte aligned torch.bfloat16 bf16 gradient; got a strided"):
        adamw_kernel.sum_of_squares(None, [strided])
    params, rows, slots = [torch.zeros(10, 4)], [torch.zeros(3, 5)], [torch.zeros(10, dtype=torch.int32)]
    with pytest.raises(ValueError, match=r"needs rows \[n, 4\] and a row_slot \[10\]; got rows \(3, 5\)"):
        adamw_kernel.sum_of_squares(rows, params=params, row_slots=slots)


def update_with_rows_and_dense(device: str, bf16: bool, hidden: int = 41, padding_idx: int | None = None):
    """One clipped AdamW step over [a lookup's rows | the same gradient dense] (+ a bf16 gradient)."""
    from nemo_lite.training.fast import adamw_kernel

    sink, reference, _ = lookups_of(device, hidden=hidden, padding_idx=padding_idx)
    row_slot, rows = sink.rows()
    dense = sink.dense()
    torch.testing.assert_close(dense, reference, rtol=1e-6, atol=1e-6)  # two micro-batches: sums grouped otherwise
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(dense.shape, generator=gen).to(device)
    bf16_grad = torch.randn(dense.shape, generator=gen).to(device, torch.bfloat16) if bf16 else None
    scale = torch.tensor(3.0, device=device)
    out = []
    for grads, row_slots in (([rows], [row_slot]), ([dense], None)):
        param, m, v = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
        steps = [torch.zeros((), device=device)]
        bf16_grads = [bf16_grad] if bf16 else None
        squares, _ = adamw_kernel.sum_of_squares(grads, bf16_grads, params=[param], row_slots=row_slots)
        adamw_kernel.adamw_(
            [param],
            grads,
            [m],
            [v],
            steps,
            bf16_grads=bf16_grads,
            row_slots=row_slots,
            lr=1e-2,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_scale=scale,
        )
        out.append((param, m, v, squares))
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["rows", "rows+bf16"])
@pytest.mark.parametrize("hidden", [41, 300, 512])
def test_the_kernel_reads_the_rows_as_the_dense_gradient(monkeypatch, bf16, hidden):
    kernel = interpreted(monkeypatch, ADAMW_KERNEL)
    monkeypatch.setattr(kernel, "BLOCK", 256)  # rows shorter than a block, of 1.2 blocks, of exactly 2
    (p1, m1, v1, s1), (p2, m2, v2, s2) = update_with_rows_and_dense("cpu", bf16, hidden)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        assert torch.equal(a, b)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)  # blocks cut at rows: partial sums grouped otherwise
    assert (v1 == 0).any() != bf16  # rows the step did not look up got no gradient (but the bf16 one)


def test_the_kernel_reads_rows_without_the_pad_tokens_lookups_as_the_dense_gradient(monkeypatch):
    # A pad token's lookups add nothing (nn.Embedding's padding_idx): its row is zero, as in the dense gradient.
    interpreted(monkeypatch, ADAMW_KERNEL)
    (p1, m1, v1, s1), (p2, m2, v2, s2) = update_with_rows_and_dense("cpu", False, padding_idx=3)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        assert torch.equal(a, b)
    assert (v1[3] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("bf16", [False, True], ids=["rows", "rows+bf16"])
def test_on_a_gpu_the_kernel_reads_the_rows_as_the_dense_gradient(bf16, padding_idx):
    (p1, m1, v1, s1), (p2, m2, v2, s2) = update_with_rows_and_dense("cuda", bf16, padding_idx=padding_idx)
    for a, b in ((p1, p2), (m1, m2), (v1, v2)):
        assert torch.equal(a, b)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)


@pytest.mark.gpu
def test_on_a_gpu_the_rows_are_the_same_every_time():
    """Deterministic: torch's sort-based lookup backward, no atomics; repeated ids as real text has them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 4096), generator=gen).cuda()
    grad = torch.randn(2, 4096, 2048, generator=gen).cuda()
    results = []
    for _ in range(3):
        sink = LookupGradient(torch.empty(128256, 2048, device="cuda"))
        sink.add(ids, grad)
        results.append(sink.rows())
    for row_slot, rows in results[1:]:
        assert torch.equal(row_slot, results[0][0]) and torch.equal(rows, results[0][1])
    want = torch.zeros(128256, 2048, device="cuda").index_add_(0, ids.reshape(-1), grad.reshape(-1, 2048))
    torch.testing.assert_close(sink.dense(), want, rtol=1e-5, atol=1e-5)


def converted(model: torch.nn.Module, rows: bool = True) -> tuple[FusedAdamW, torch.Tensor, dict]:
    """``model`` converted and its optimizer set up as the fast step does it: bf16 weight copies, and
    (``rows``) the embedding's gradient as rows. Returns the optimizer, the output projection's copy (what
    the fast step's head loss multiplies by under autocast) and the rows."""
    opt = FusedAdamW(model.parameters(), lr=1e-2, kernel="triton")
    copies = swap_in_weight_copies(model, model.output_weight)
    opt.keep_weight_copies(list(copies.items()))
    lookups = swap_in_lookup_rows(model) if rows else {}
    for param, sink in lookups.items():
        opt.keep_lookup_gradient(param, sink)
    return opt, copies[model.output_weight], lookups


def test_a_model_with_copies_and_a_lookup_gradient_gets_autocasts_gradients():
    """Under bf16 autocast the tied embedding's gradient is the lookup's rows plus the head copy's bf16
    gradient: autograd's float32 sum, bit for bit."""
    pytest.importorskip("triton")
    from model_utils import tiny_twins

    from nemo_lite.training.loss import cross_entropy_sum

    plain, model = tiny_twins()
    config = plain.config
    opt, head, lookups = converted(model)
    embed = model.embed_tokens.weight
    assert isinstance(model.embed_tokens, RowsEmbedding) and list(lookups) == [embed]
    sink = lookups[embed]
    ids = torch.randint(3, config.vocab_size, (2, 48))
    ids[:, [10, 30]] = config.eos_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy_sum(plain.forward_hidden(ids), plain.output_weight, ids).backward()
        cross_entropy_sum(model.forward_hidden(ids), head, ids).backward()
    assert embed.grad is None and sink
    rows, bf16 = opt.gradients(embed)
    assert rows is sink.rows()[1] and bf16.dtype == torch.bfloat16
    assert torch.equal(sink.dense() + bf16.float(), plain.embed_tokens.weight.grad)
    opt.zero_grad()
    assert not sink  # cleared with the other gradients
    embed.grad = torch.zeros_like(embed)  # something else wrote a dense gradient as well
    model(ids).sum().backward()
    with pytest.raises(ValueError, match="has a dense gradient and a lookup gradient"):
        opt.gradients(embed)


def test_rows_are_refused_where_the_kernel_cannot_read_them():
    """The rows are read by the triton kernel only, for a parameter of the optimizer of their shape; the
    swap takes a plain embedding only. (The fast step keeps them on only with the weight copies, which
    take the tied head's gradient off the embedding's .grad: tests/test_step.py.)"""
    weight = torch.nn.Parameter(torch.zeros(10, 4))
    with pytest.raises(
        ValueError, match="a lookup gradient is read by the triton AdamW kernel: it needs kernel='triton'"
    ):
        FusedAdamW([weight]).keep_lookup_gradient(weight, LookupGradient(weight))
    pytest.importorskip("triton")
    opt = FusedAdamW([weight], kernel="triton")
    with pytest.raises(ValueError, match=r"the lookup gradient \(10, 5\) is not for a \(10, 4\) parameter"):
        opt.keep_lookup_gradient(weight, LookupGradient(torch.zeros(10, 5)))
    other = torch.nn.Parameter(torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"is not for a \(10, 4\) parameter of this optimizer"):
        opt.keep_lookup_gradient(other, LookupGradient(other))
    for embedding in (torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Embedding(10, 4, scale_grad_by_freq=True)):
        with pytest.raises(ValueError, match="lookup rows support a plain embedding"):
            RowsEmbedding(embedding)


def test_an_optimizer_step_with_the_rows_is_the_step_with_the_dense_gradient(monkeypatch):
    """Two steps of a tied model with weight copies, the lookup's gradient as rows against dense, through
    the fast step's calls (prepare_step, grad_norm, the clipped step): the same weights, bit for bit."""
    interpreted(monkeypatch, ADAMW_KERNEL)
    from model_utils import tiny_twins

    from nemo_lite.training.loss import cross_entropy_sum

    models = tiny_twins(num_hidden_layers=1)
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, models[0].config.vocab_size, (2, 32), generator=gen) for _ in range(2)]
    norms = []
    for model, rows in zip(models, (True, False), strict=True):
        opt, head, _ = converted(model, rows)
        for ids in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                cross_entropy_sum(model.forward_hidden(ids), head, ids).backward()
            assert (model.embed_tokens.weight.grad is None) == rows
            opt.prepare_step()
            norm = opt.grad_norm()
            norms.append(norm)
            # not binding: the norms differ in the last bit (blocks cut at rows)
            opt.step(grad_scale=clip_factor(norm, 1e6), found_inf=torch.zeros(()))
            opt.zero_grad()
    torch.testing.assert_close(norms[:2], norms[2:], rtol=1e-6, atol=0)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    moved = models[0].embed_tokens.weight != start["embed_tokens.weight"]
    assert moved.all(dim=1).float().mean() > 0.9  # the tied embedding moved, looked-up rows and the rest
