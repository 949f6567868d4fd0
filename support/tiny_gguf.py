"""A tiny Wan 2.1 as a GGUF file laid out like the quantized Wan files users download, for tests
with ComfyUI-GGUF's loader.

Layout of those files (ComfyUI-GGUF's conversion tool, then its patched llama-quantize):
- architecture string "wan" (`general.architecture`), tensor names = the safetensors key names;
- the transformer blocks' matrices quantized (here Q8_0: blocks of 32 int8 values with one fp16
  scale), the embeddings, the time projection and the head kept in F16;
- vectors, the modulation tables and the 5-D patch-embedding kernel in F32 (GGML tensors have at
  most 4 dimensions to quantize; the kernel is added back unquantized).
The reader takes the logical shape from the reversed GGML shape, so no shape metadata is needed
for these tensors.
"""

from pathlib import Path

import torch

from support.tiny_models import partial_path

# Non-block parts that real Wan files keep unquantized.
UNQUANTIZED_PREFIXES = ("patch_embedding.", "text_embedding.", "time_embedding.", "time_projection.", "head.", "img_emb.")


def _tensor_type(gguf, key: str, tensor: torch.Tensor, qtype):
    if tensor.ndim <= 1 or tensor.ndim > 4 or ".modulation" in key or key.startswith("patch_embedding."):
        return gguf.GGMLQuantizationType.F32
    if key.startswith(UNQUANTIZED_PREFIXES):
        return gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if tensor.shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def wan_to_gguf(src: Path, dst: Path, qtype_name: str = "Q8_0") -> dict[str, int]:
    """Convert a Wan safetensors file to GGUF; returns how many tensors got each type."""
    import gguf
    from safetensors.torch import load_file

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    state_dict = load_file(str(src))
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{qtype_name}"))
    counts: dict[str, int] = {}
    for key, tensor in state_dict.items():
        kind = _tensor_type(gguf, key, tensor, qtype)
        data = gguf.quants.quantize(tensor.float().contiguous().numpy(), kind)
        writer.add_tensor(key, data, raw_dtype=kind)
        counts[kind.name] = counts.get(kind.name, 0) + 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(dst)
    writer.write_header_to_file(path=str(tmp))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return counts
