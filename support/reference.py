"""Naive reference implementations of the formulas the methods compute efficiently: each
materialises the whole attention map and follows the official recipe step by step, so tests can
compare the chunked or fused code against it."""

import math

import torch
from einops import rearrange


def naive_scale(q, k, frames, weight):
    """Enhance-A-Video's official recipe, per batch element: (b s) h f d regroup, float32 softmax,
    off-diagonal mean."""
    scales = []
    for b in range(q.shape[0]):
        qb = rearrange(q[b:b + 1].float(), "b (f s) h d -> (b s) h f d", f=frames)
        kb = rearrange(k[b:b + 1].float(), "b (f s) h d -> (b s) h f d", f=frames)
        attn = (qb @ kb.transpose(-1, -2) / qb.shape[-1] ** 0.5).softmax(-1)
        off = ~torch.eye(frames, dtype=torch.bool)
        cfi = attn[..., off].mean()
        scales.append(((frames + weight) * cfi).clamp(min=1))
    return torch.stack(scales)


def naive_entropy(q, k, mask=None):
    """Materialise softmax(q k^T / sqrt(D)) and take -sum p log p / log(n_keys) per row. `mask` is a
    ComfyUI attention mask (boolean keep-mask or additive), promoted to 4-D as attention_pytorch does."""
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    n = torch.full(s.shape[:-1], s.shape[-1], dtype=torch.float64)
    if mask is not None:
        m = mask.unsqueeze(0) if mask.ndim == 2 else mask  # [Lq, Lk] -> [B, Lq, Lk] -> [B, H, Lq, Lk]
        m = m.unsqueeze(1) if m.ndim == 3 else m
        allowed = m if m.dtype == torch.bool else m > -1e4
        s = s + (torch.zeros(m.shape, dtype=torch.float64).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m.double())
        n = allowed.sum(-1).expand(s.shape[:-1]).double()
    p = s.softmax(-1)
    h = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return (h / n.log()).float()
