"""The CFI computation against an independent, naive implementation of the official formula."""

import pytest
import torch

from freevideo.enhance_core.measures.cross_frame_intensity import enhance_scale
from support.reference import naive_scale


@pytest.mark.parametrize("frames,heads,batch,dtype", [
    (2, 1, 1, torch.float32), (5, 2, 2, torch.float32), (7, 3, 1, torch.bfloat16), (13, 2, 3, torch.float16),
])
def test_matches_naive_official_formula(frames, heads, batch, dtype):
    g = torch.Generator().manual_seed(frames)
    s, d = 6, 16
    # Sharper logits for some batch elements so that the clamp is and is not active.
    q = (torch.randn(batch, frames * s, heads, d, generator=g) * torch.linspace(0.2, 3, batch).view(-1, 1, 1, 1)).to(dtype)
    k = torch.randn(batch, frames * s, heads, d, generator=g).to(dtype)
    for weight in (0.0, 4.0, 40.0):
        got = enhance_scale(q, k, frames, weight)
        want = naive_scale(q, k, frames, weight)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 9 * 40, 2, 8, generator=g)
    k = torch.randn(2, 9 * 40, 2, 8, generator=g)
    whole = enhance_scale(q, k, 9, 30.0)
    tiny_chunks = enhance_scale(q, k, 9, 30.0, chunk_bytes=1)
    torch.testing.assert_close(whole, tiny_chunks, rtol=1e-6, atol=1e-6)
    assert (whole > 1).all(), "weight 30 should lift the scale above the clamp on random inputs"


def test_frame_major_grouping():
    """Tokens of one pixel across frames are grouped, not neighbouring pixels of one frame: frames
    that are exact copies of each other make every temporal map uniform (CFI = 1/F)."""
    frames, s = 4, 5
    g = torch.Generator().manual_seed(2)
    one_frame_q = torch.randn(1, 1, s, 2, 8, generator=g)
    one_frame_k = torch.randn(1, 1, s, 2, 8, generator=g)
    q = one_frame_q.expand(1, frames, s, 2, 8).reshape(1, frames * s, 2, 8)
    k = one_frame_k.expand(1, frames, s, 2, 8).reshape(1, frames * s, 2, 8)
    # (F + tau) * (1/F) with tau = F gives exactly 2.
    torch.testing.assert_close(enhance_scale(q, k, frames, float(frames)), torch.tensor([2.0]))
