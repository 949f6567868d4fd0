"""Attention entropy: exact against a naive softmax, the sampled estimate against the exact value."""

import pytest
import torch

from freevideo.enhance_core.measures import attention_entropy as ae
from support.reference import naive_entropy


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0, 8.0])
def test_exact_equals_naive_softmax_entropy(temperature):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 70, 32, generator=g) * temperature
    k = torch.randn(2, 3, 90, 32, generator=g) * temperature
    want = naive_entropy(q, k)
    torch.testing.assert_close(ae.row_entropy(q, k), want, atol=2e-5, rtol=0)
    # Small blocks: several row blocks and key chunks, so the online accumulation is exercised.
    torch.testing.assert_close(ae.row_entropy_chunked(q, k, chunk_bytes=2 * 3 * 13 * 4 * 20, key_chunk=13), want, atol=2e-5, rtol=0)
    torch.testing.assert_close(ae.attention_entropy(q, k, rows=None), want.mean(dim=(1, 2)), atol=2e-6, rtol=0)


def test_exact_with_masks_equals_naive():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 40, 16, generator=g) * 2, torch.randn(2, 2, 40, 16, generator=g) * 2
    keep = torch.rand(2, 40, 40, generator=g) > 0.3
    keep[..., 0] = True  # every row keeps a key
    additive = torch.zeros(2, 40, 40).masked_fill(~keep, float("-inf"))
    padding = torch.zeros(2, 1, 1, 40)
    padding[1, ..., 25:] = -torch.finfo(torch.float32).max  # text padding, as some joint-attention models mask it
    for mask in (keep, additive, padding):
        torch.testing.assert_close(ae.row_entropy_chunked(q, k, mask, key_chunk=7), naive_entropy(q, k, mask), atol=2e-5, rtol=0)
        torch.testing.assert_close(ae.row_entropy(q, k, mask), naive_entropy(q, k, mask), atol=2e-5, rtol=0)


def test_fused_path_falls_back_where_exp_underflows():
    """Logit ranges beyond float32's exp (w underflows in the fused kernel): those rows are redone exactly."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 50, 16, generator=g) * 40, torch.randn(1, 2, 50, 16, generator=g) * 40
    got = ae.row_entropy(q, k)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, naive_entropy(q, k), atol=2e-5, rtol=0)


def test_identity_and_uniform_maps_have_entropy_zero_and_one():
    k = torch.randn(1, 1, 64, 16)
    assert ae.attention_entropy(torch.zeros(1, 1, 64, 16), k, rows=None).item() == pytest.approx(1.0, abs=1e-6)
    eye = torch.eye(64).view(1, 1, 64, 64) * 30.0  # logits 112.5 on the diagonal, 0 elsewhere
    assert ae.attention_entropy(eye, eye, rows=None).item() == pytest.approx(0.0, abs=1e-6)


def video_qk(frames, height, width, heads, dim, temperature, seed):
    """q, k with the structure of a video DiT's self-attention: RMS-normalised per token (QK-norm, as in Wan),
    a smooth function of the (frame, y, x) position per head plus token noise; temperature sets the
    logit scale and so the entropy."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"), -1)
    pos = grid.reshape(-1, 3).float()
    angles = pos @ (torch.randn(heads, 3, dim // 2, generator=g) * 0.3)
    base = torch.cat([angles.sin(), angles.cos()], -1).unsqueeze(0)
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).sqrt()  # noqa: E731
    q = rms(base + 0.7 * torch.randn(base.shape, generator=g)) * temperature
    k = rms(base + 0.7 * torch.randn(base.shape, generator=g)) * temperature
    return q, k


@pytest.mark.parametrize("temperature,seed", [(1.0, 0), (1.5, 1), (2.0, 2)])
def test_sampled_estimate_within_one_percent_of_exact(temperature, seed):
    """Wan-like sizes: a 30x52 token grid (480p), 3 latent frames, 12 heads; entropies from ~0.9 down to
    ~0.27. The default subset is 512 rows per head, 11% of the 4680 rows here (1.6% at 81 frames)."""
    q, k = video_qk(3, 30, 52, 12, 64, temperature, seed)
    exact = ae.attention_entropy(q, k, rows=None)
    estimate = ae.attention_entropy(q, k)  # default rows
    assert ae.DEFAULT_ROWS < q.shape[2]
    assert float(((estimate - exact) / exact).abs().max()) < 0.01, (float(exact), float(estimate))
    assert torch.equal(estimate, ae.attention_entropy(q, k)), "the subset must be fixed, not redrawn per call"


def test_subset_is_fixed_stratified_and_differs_between_heads():
    a = ae.sampled_rows(10_000, 4, 100)
    assert torch.equal(a, ae.sampled_rows(10_000, 4, 100))
    assert a.shape == (4, 100) and not torch.equal(a[0], a[1])
    assert ((a // 100) == torch.arange(100)).all(), "one row in each of the 100 equal spans"
    assert torch.equal(ae.sampled_rows(50, 2, 100), torch.arange(50).expand(2, 50)), "more rows than the sequence: all of them"


def test_bad_row_count():
    with pytest.raises(ValueError, match="rows"):
        ae.attention_entropy(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), rows=0)
