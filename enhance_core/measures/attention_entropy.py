"""Normalised row entropy of softmax attention, from q and k, without storing the attention map.

For one query row i with logits s_ij = q_i . k_j / sqrt(D) over the keys j it may attend to:
    H_i = -sum_j p_ij log p_ij = logsumexp_j(s_ij) - sum_j p_ij s_ij,      p_i = softmax(s_i)
normalised by log(n_keys) to [0, 1] (the paper's "entropy percentage"): 0 is the identity map, 1 the
uniform map. Keys are streamed in chunks with an online (flash-attention style) accumulation of
  m = max_j s_ij,  S = sum_j exp(s_ij - m),  T = sum_j exp(s_ij - m) (s_ij - m)
so that H_i = log S - T / S; query rows are processed in blocks, so memory stays at one
[rows x key-chunk] logit block whatever the sequence length.

Without a mask the same quantity comes out of one fused SDPA call (flash / memory-efficient kernels:
no map, and 5x faster on CPU than the elementwise passes above): with p = softmax(s_i),
  sum_j p_ij s_ij = scale * q_i . (sum_j p_ij k_j)  -> an attention output with V = K, and
  logsumexp_j s_ij                                  -> from one extra key whose logit is c_i and whose
                                                        value is an indicator channel: the output
                                                        there is w = e^c / (e^c + sum_j e^s_ij).
c_i is the row's mean logit, so that lse - c >= log(n_keys) (Jensen): w <= 1/(n+1) never rounds
away the row's own sum. A row where w underflows (a logit range above ~87) is recomputed with the
chunked path.

The sampled estimate runs the same exact computation on a fixed random subset of query rows per head
(every key): the mean over rows of a head is a sample mean, so its error shrinks as 1/sqrt(rows) and
does not depend on the sequence length, while the cost is rows/L of the exact one.

Masks follow ComfyUI's kernels: boolean (True = attend) or additive float, shaped [Lq, Lk], [B, Lq, Lk]
or [B, H|1, Lq|1, Lk]. A key with an additive mask at or below MASKED (-1e4: weight exp(-1e4) is 0 in
every float format) counts as masked: it is left out of n_keys as well.
"""

import math

import torch

# Bytes of float32 logits one block may hold (the block's temporaries are a small multiple of it).
CHUNK_BYTES = 64 * 1024 * 1024
# Query rows per head of the sampled estimate unless the caller says otherwise. The estimate of the
# mean over heads and rows is within 1% of the exact value on the test inputs (tests/
# test_attention_entropy.py) and costs rows / L of the exact computation.
DEFAULT_ROWS = 512
MASKED = -1e4
SEED = 0x1E_ADA9


def mask_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A ComfyUI attention mask as [B|1, H|1, Lq|1, Lk] (the same promotion attention_pytorch does)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _additive(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.float()


def _key_count(mask: torch.Tensor | None, n_keys: int, shape) -> torch.Tensor | float:
    if mask is None:
        return float(n_keys)
    valid = mask if mask.dtype == torch.bool else mask > MASKED
    return valid.sum(-1).expand(shape).float()


@torch.no_grad()
def row_entropy(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Normalised entropy of every attention row.

    q: [B, H, Lq, D], k: [B, H, Lk, D] (heads-first), mask as in the module docstring.
    Returns float32 [B, H, Lq] in [0, 1]; a row with a single key has entropy 0.
    """
    if mask is None and k.shape[2] > 1:
        return _row_entropy_fused(q, k, chunk_bytes)
    return row_entropy_chunked(q, k, mask, chunk_bytes)


def _row_entropy_fused(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = d ** -0.5
    width = d + 8  # the mean-logit channel and the indicator, padded to a multiple of 8 for the kernels
    q32, k32 = q.float(), k.float()
    c = scale * torch.matmul(q32, k32.mean(dim=2, keepdim=True).transpose(-1, -2))  # [B, H, Lq, 1]
    # Keys and values are the same tensor: real keys [k_j, 0...] (value k_j, indicator 0) and the extra
    # key [0, 1, 0...] (logit c against the query's channel d, value = the indicator).
    extra = q32.new_zeros(b, h, 1, width)
    extra[..., d] = 1.0
    kv = torch.cat([torch.cat([k32, k32.new_zeros(b, h, lk, width - d)], dim=-1), extra], dim=2)
    out = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    # Rows per call: bounds the padded query copy and the output, not the (never stored) map.
    rows = max(1, min(lq, chunk_bytes // max(1, b * h * width * 4 * 2)))
    for r0 in range(0, lq, rows):
        qc = q32[:, :, r0:r0 + rows]
        cc = c[:, :, r0:r0 + rows]
        query = torch.cat([qc, (cc / scale), qc.new_zeros(*qc.shape[:3], width - d - 1)], dim=-1)
        o = torch.nn.functional.scaled_dot_product_attention(query, kv, kv, scale=scale)
        w = o[..., d]
        mean_key = o[..., :d] / (1.0 - w).unsqueeze(-1)
        lse = cc.squeeze(-1) + torch.log1p(-w) - torch.log(w)
        out[:, :, r0:r0 + rows] = lse - scale * (qc * mean_key).sum(-1)
    bad = ~torch.isfinite(out)
    if bad.any():
        # Logit ranges beyond float32's exp: redo those rows (whole row blocks, all heads) exactly.
        rows_bad = bad.any(dim=(0, 1)).nonzero().squeeze(-1)
        redo = row_entropy_chunked(q[:, :, rows_bad], k, None, chunk_bytes) * math.log(lk)
        out[:, :, rows_bad] = redo
    return (out / math.log(lk)).clamp_(0.0, 1.0)


def row_entropy_chunked(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, chunk_bytes: int = CHUNK_BYTES,
                        key_chunk: int = 4096) -> torch.Tensor:
    """row_entropy by streaming explicit logit blocks (any mask); the reference the fused path is tested against."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    mask = mask_4d(mask)
    scale = d ** -0.5
    key_chunk = min(lk, key_chunk)
    rows = max(1, min(lq, chunk_bytes // max(1, b * h * key_chunk * 4)))
    out = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    for r0 in range(0, lq, rows):
        qc = q[:, :, r0:r0 + rows].float() * scale
        mr = None if mask is None else mask[:, :, r0:r0 + rows] if mask.shape[2] > 1 else mask
        m = torch.full(qc.shape[:3], float("-inf"), device=q.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for k0 in range(0, lk, key_chunk):
            logits = torch.matmul(qc, k[:, :, k0:k0 + key_chunk].float().transpose(-1, -2))
            if mr is not None:
                logits = logits + _additive(mr[..., k0:k0 + key_chunk])
            new_m = torch.maximum(m, logits.amax(-1))
            # Rows with every key masked so far keep m = -inf; shift by 0 there to avoid inf - inf.
            safe_m = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            alpha = torch.exp(m - safe_m)
            shifted = logits - safe_m.unsqueeze(-1)
            e = torch.exp(shifted)
            # T is kept relative to the running max: moving it from m to new_m adds (m - new_m) S.
            t = alpha * (t + torch.where(s > 0, (m - safe_m) * s, torch.zeros_like(s))) \
                + torch.where(e > 0, e * shifted, torch.zeros_like(e)).sum(-1)
            s = alpha * s + e.sum(-1)
            m = new_m
        entropy = torch.log(s) - t / s
        n = _key_count(mr, lk, entropy.shape)
        norm = torch.log(torch.as_tensor(n, device=q.device, dtype=torch.float32))
        out[:, :, r0:r0 + rows] = torch.where(norm > 0, entropy / norm.clamp(min=1e-12), torch.zeros_like(entropy))
    return out.clamp_(0.0, 1.0)


def sampled_rows(n_rows: int, heads: int, rows: int, device=None, seed: int = SEED) -> torch.Tensor:
    """The fixed random subset of query rows per head: [heads, min(rows, n_rows)] sorted indices, the
    same for the same (n_rows, heads, rows, seed) on every call, different between heads.

    Stratified: one uniformly random row in each of `rows` equal spans of the sequence. Video tokens
    are frame-major and row entropy varies smoothly over frames and space, so covering every span
    lowers the estimate's variance (about 2x lower error than a plain random subset on the test
    inputs) at the same cost; it is still an unbiased mean."""
    g = torch.Generator().manual_seed(seed)
    take = min(rows, n_rows)
    edges = torch.arange(take + 1) * n_rows // take
    offsets = (torch.rand(heads, take, generator=g, dtype=torch.float64) * (edges[1:] - edges[:-1])).long()
    return (edges[:-1] + offsets).to(device)


@torch.no_grad()
def restrict_to_tokens(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, start: int, stop: int):
    """The sub-map of tokens [start, stop) attending to each other: q, k [B, H, L, D] and a ComfyUI
    mask cut to those query rows and keys (softmax then renormalises over the kept keys)."""
    mask = mask_4d(mask)
    if mask is not None:
        rows = slice(start, stop) if mask.shape[2] > 1 else slice(None)
        mask = mask[:, :, rows, start:stop]
    return q[:, :, start:stop], k[:, :, start:stop], mask


def attention_entropy(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, rows: int | None = DEFAULT_ROWS,
                      chunk_bytes: int = CHUNK_BYTES, seed: int = SEED) -> torch.Tensor:
    """Mean normalised attention entropy over heads and query rows, per batch element (float32 [B]).

    q, k: [B, H, L, D]. rows=None or rows >= L: exact (every row); else the sampled estimate over a
    fixed subset of `rows` query rows per head, exact over all keys.
    """
    b, h, lq, d = q.shape
    if rows is None or rows >= lq:
        return row_entropy(q, k, mask, chunk_bytes).mean(dim=(1, 2))
    if rows < 1:
        raise ValueError(f"rows: {rows}; use a positive number of query rows per head, or None for the exact entropy")
    idx = sampled_rows(lq, h, rows, q.device, seed)  # [H, r]
    qs = torch.gather(q, 2, idx.view(1, h, -1, 1).expand(b, h, idx.shape[1], d))
    mask = mask_4d(mask)
    if mask is not None and mask.shape[2] > 1:
        mask = mask.expand(mask.shape[0], h, lq, mask.shape[3])
        mask = torch.gather(mask, 2, idx.view(1, h, -1, 1).expand(mask.shape[0], h, idx.shape[1], mask.shape[3]))
    return row_entropy(qs, k, mask, chunk_bytes).mean(dim=(1, 2))


def call_entropy(call, rows: list[int], attention_map: str = "whole map", sample_rows: int | None = None) -> torch.Tensor:
    """attention_entropy of the batch rows `rows` of one AttentionCall, over the tokens of
    `attention_map` ("video tokens": video queries over video keys; "whole map")."""
    index = torch.tensor(rows, device=call.q.device)
    q = call.heads_first(call.q).index_select(0, index)
    k = call.heads_first(call.k).index_select(0, index)
    mask = call.mask_rows(index)
    span = call.map_span(attention_map)
    if span is not None:
        q, k, mask = restrict_to_tokens(q, k, mask, *span)
    return attention_entropy(q, k, mask, rows=sample_rows)
