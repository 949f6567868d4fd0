"""Enhance-A-Video's cross-frame intensity (CFI), computed from the q and k of a self-attention call.

For every spatial position and head, the temporal attention between the F frames is
A = softmax(q k^T / sqrt(D)) over the key frames (an F x F map). CFI is the mean of the
off-diagonal entries of A, averaged over spatial positions and heads; the enhance scale is
clamp((F + tau) * CFI, min=1) (paper eq. 7).

Each row of A sums to 1, so the off-diagonal sum of a map is F - trace(A): only the diagonal of
the softmax is needed, which is exp(logit_ii - logsumexp_j logit_ij).
"""

import torch

# Bytes of float32 work (q, k copies and F x F logits) per chunk of spatial positions; keeps the
# temporal maps of a long video from ever existing whole. CPUs run fastest when a chunk stays in
# cache (16 MiB measured best of 2-256 MiB here); accelerators want few, large kernel launches.
CPU_CHUNK_BYTES = 16 * 1024 * 1024
ACCELERATOR_CHUNK_BYTES = 256 * 1024 * 1024


def temporal_off_diagonal_mean(q: torch.Tensor, k: torch.Tensor, frames: int, chunk_bytes: int | None = None) -> torch.Tensor:
    """Mean off-diagonal temporal attention per batch element.

    q, k: [B, F*S, H, D] video tokens only, frame-major (f, h, w) order.
    Returns a float32 tensor [B].
    """
    b, n, h, d = q.shape
    if n % frames:
        raise ValueError(f"{n} video tokens do not split into {frames} frames")
    s = n // frames
    qf = q.view(b, frames, s, h, d)
    kf = k.view(b, frames, s, h, d)
    if chunk_bytes is None:
        chunk_bytes = CPU_CHUNK_BYTES if q.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
    per_position = b * h * (frames * frames + 2 * frames * d) * 4
    step = max(1, min(s, chunk_bytes // max(per_position, 1)))
    scale = d ** -0.5
    total = torch.zeros(b, dtype=torch.float32, device=q.device)
    for s0 in range(0, s, step):
        # [B, F, s, H, D] -> [B, s, H, F, D]
        qc = qf[:, :, s0:s0 + step].permute(0, 2, 3, 1, 4).float()
        kc = kf[:, :, s0:s0 + step].permute(0, 2, 3, 1, 4).float()
        logits = torch.matmul(qc * scale, kc.transpose(-1, -2))  # [B, s, H, F, F]
        diag = torch.diagonal(logits, dim1=-2, dim2=-1) - torch.logsumexp(logits, dim=-1)
        trace = diag.exp().sum(-1)  # [B, s, H]
        total += (frames - trace).sum(dim=(1, 2))
    return total / (s * h * frames * (frames - 1))


def enhance_scale(q: torch.Tensor, k: torch.Tensor, frames: int, weight: float, chunk_bytes: int | None = None) -> torch.Tensor:
    """clamp((F + weight) * CFI, min=1) per batch element, float32 [B]."""
    cfi = temporal_off_diagonal_mean(q, k, frames, chunk_bytes)
    return ((frames + weight) * cfi).clamp(min=1.0)
