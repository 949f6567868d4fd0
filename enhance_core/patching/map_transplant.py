"""Another batch element's attention map handed to some rows of a kernel call (editing: the
target's rows take the source's q and k, so their map is the source's, with their own values).

In joint attention (text in self-attention) the map of the video queries spans video and text keys:
with prompts of equal token count the rows take the source's keys over every token and its video
queries, and their text queries get their own map back (those few rows recomputed with SDPA over
the rows' own q, k and v, written over the kernel's output); with prompts of other lengths only the
video tokens' q and k can be taken.
"""

import torch


def _mask_4d(mask):
    # ComfyUI's attention masks: [Lq, Lk], [B, Lq, Lk] or [B, H|1, Lq|1, Lk] (as attention_pytorch promotes them).
    while mask is not None and mask.ndim < 4:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask.unsqueeze(1)
    return mask


def take_map(call, q, k, rows: slice, qs, ks, source_span) -> str:
    """q, k (copies of the call's) with the rows `rows` taking qs, ks (the source rows' q and k, in
    the call's layout; source_span: where their video tokens are). Returns what was taken: "all"
    (q and k), "video and text keys" (the rows' text queries then need own_attention_rows), "video
    tokens" (a joint call whose text has another length), or "" (shapes that do not pair)."""
    span = call.map_span("video tokens")
    qs, ks = qs.to(q), ks.to(k)
    if qs.shape == q[rows].shape and span == source_span:
        if span is None:
            q[rows], k[rows] = qs, ks
            return "all"
        _tokens(q, call, span)[rows] = _tokens(qs, call, span)
        k[rows] = ks
        return "video and text keys"
    if span is not None and source_span is not None and span[1] - span[0] == source_span[1] - source_span[0]:
        _tokens(q, call, span)[rows] = _tokens(qs, call, source_span)
        _tokens(k, call, span)[rows] = _tokens(ks, call, source_span)
        return "video tokens"
    return ""


def text_tokens(call) -> torch.Tensor:
    """The tokens of a joint call outside its video tokens."""
    start, stop = call.map_span("video tokens")
    return torch.cat([torch.arange(0, start), torch.arange(stop, call.seq_len)]).to(call.q.device)


def _tokens(t, call, span):
    """The tokens [start, stop) of q, k or v along the call's token axis (a view)."""
    return t.narrow(call.token_axis, span[0], span[1] - span[0])


def own_attention_rows(call, out: torch.Tensor, batch_rows: list, tokens: torch.Tensor) -> None:
    """Over `out` (the kernel output of `call`), the query tokens `tokens` of the batch rows in
    each slice of `batch_rows`, attended with the call's own q, k, v and mask."""
    for rows in batch_rows:
        q = call.heads_first(call.q)[rows].index_select(2, tokens)
        k, v = call.heads_first(call.k)[rows], call.heads_first(call.v)[rows]
        mask = _mask_4d(call.mask_rows(torch.arange(rows.start, rows.stop, device=q.device)))
        if mask is not None:
            mask = mask.index_select(2, tokens) if mask.shape[2] > 1 else mask
            mask = mask if mask.dtype == torch.bool else mask.to(q.dtype)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(out.dtype)
        if call.skip_output_reshape:
            out[rows, :, tokens] = o
        else:
            out[rows, tokens] = o.transpose(1, 2).reshape(o.shape[0], len(tokens), -1)
