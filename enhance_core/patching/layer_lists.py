"""The user-facing layer lists ("0-9, 20", "all") and their short form in log messages."""

import re


def format_ranges(layers) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    layers = sorted(layers)
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)


def parse_layer_list(text: str, count: int, input_name: str) -> list[int]:
    """Parse a user list such as "0-9, 20" into sorted layer indices; empty or "all" is every layer."""
    text = text.strip().lower()
    if text in ("", "all"):
        return list(range(count))
    chosen = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not m:
            raise ValueError(f"{input_name}: cannot read '{part}'; use indices and ranges such as '0-9, 20', or 'all'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ValueError(f"{input_name}: range '{part}' runs backwards; write the lower index first, e.g. '{hi}-{lo}'")
        if hi >= count:
            raise ValueError(f"{input_name}: layer {hi} does not exist; this model has {count} self-attention layers (0-{count - 1})")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)
