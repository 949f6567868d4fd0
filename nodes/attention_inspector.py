from ._api import EXPERT, io

from ..enhance_core.methods.attention_inspector import inspect_attention, render_chart
from ..enhance_core.methods.entropy_guidance import MAPS


class AttentionInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoAttentionInspector",
            display_name="Attention Inspector (entropy / CFI)",
            category="FreeVideo",
            description=(
                "Charts, for every self-attention layer, the attention entropy of 'Understanding Attention Mechanism "
                "in Video Diffusion Models' (in orange: the layers IE-Adapt Entropy Guidance would register) and the "
                "cross-frame intensity of 'Enhance-A-Video: Better Generated Video for Free', from one conditional "
                "model call. Connect the same model, latent and prompt as the sampler, with sigma at the schedule's "
                "first sigma to see what the guidance's 'auto' registers. Its 'layers' output is that choice (the top_k "
                "highest-entropy layers) as a list for FreeVideo nodes' 'layers' inputs; 'double_layers' and "
                "'single_layers' are the same layers as the blocks SkipLayerGuidanceDiT skips. Use it to choose layers "
                "for the guidance, to see which layers editing would replace, or for other layer-targeted guidance."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model to inspect (cloned; the input stays untouched)."),
                io.Latent.Input("latent", tooltip="The latent the sampler would start from (e.g. an empty video latent): "
                                                  "its size sets the token count and frame count."),
                io.Conditioning.Input("positive", tooltip="The positive (conditional) prompt; IE-Adapt's registry "
                                                          "measures the conditional pass."),
                io.Float.Input("sigma", default=1.0, min=0.0, max=1000.0, step=0.001,
                               tooltip="Noise level to evaluate at. The guidance registers at its first active step: with "
                                       "start_percent 0 that is the schedule's first sigma (1.0 for Wan and other flow models)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the noise added to the latent at sigma."),
                io.Int.Input("top_k", default=1, min=1, max=200, **EXPERT,
                             tooltip="How many highest-entropy layers to highlight and put in the layer lists (the "
                                     "guidance node's top_k; 1, as the paper registers one layer)."),
                io.Int.Input("entropy_rows", default=0, min=0, max=65536, **EXPERT,
                             tooltip="0 (default): exact entropy. A number such as 512: the estimate from that many query "
                                     "rows per head (as in the guidance node), for very long videos."),
                io.Combo.Input("attention_map", options=list(MAPS), default="video tokens", **EXPERT,
                               tooltip="What the entropy is measured over, as in the guidance node: the video-to-video map "
                                       "or the whole self-attention map (differs only where text is in self-attention: "
                                       "HunyuanVideo, Mochi, CogVideoX). The chart's title says which."),
            ],
            outputs=[
                io.Image.Output(display_name="chart", tooltip="Bar charts of entropy and CFI per self-attention layer."),
                io.String.Output(display_name="report", tooltip="The same values as a text table."),
                io.String.Output(display_name="layers",
                                 tooltip="The top_k highest-entropy layers, as the guidance registers them, as "
                                         "comma-separated indices (e.g. '3, 7'): wire it to a FreeVideo node's 'layers' "
                                         "input (convert the widget to an input). Layers are numbered as in the chart; "
                                         "for HunyuanVideo the double-stream blocks come first, then the single-stream ones."),
                io.String.Output(display_name="double_layers",
                                 tooltip="The same layers as SkipLayerGuidanceDiT numbers its double_layers: the "
                                         "('double_block', i) blocks holding them (Wan, LTX-Video, Mochi: every layer; "
                                         "HunyuanVideo: the double-stream blocks). Empty where none is such a block."),
                io.String.Output(display_name="single_layers",
                                 tooltip="The same layers as SkipLayerGuidanceDiT numbers its single_layers: the "
                                         "('single_block', i) blocks holding them (HunyuanVideo's single-stream blocks, "
                                         "counted from 0). Empty where none is such a block (Wan and most other families)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, positive, sigma, seed, top_k, entropy_rows, attention_map="video tokens") -> io.NodeOutput:
        report = inspect_attention(model, latent, positive, sigma, seed, entropy_rows, top_k, attention_map)
        return io.NodeOutput(render_chart(report), report.table(), report.layer_list(), *report.slg_layers())
