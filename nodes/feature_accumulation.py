from ._api import EXPERT, io

from ..enhance_core.methods.feature_accumulation import DEFAULT_GATE, DEFAULT_GROUP_SIZE, MODES, apply_feature_accumulation
from ..enhance_core.models import supported_families


class FeatureAccumulation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoFeatureAccumulation",
            display_name="Cross-layer feature accumulation (RepVideo)",
            category="FreeVideo",
            is_experimental=True,
            description=(
                "Experimental: cross-layer feature accumulation from RepVideo ('RepVideo: Rethinking Cross-Layer "
                "Representation for Video Generation'), mixing each block's input with the mean of its group's "
                "earlier outputs, h = gate x mean + (1 - gate) x h, on video tokens only. The paper learned its "
                "gates while fine-tuning; this node applies fixed gates to a model that never saw the mix, so compare "
                "with the plain model at the same seed, and lower gate (or use 'attention input' mode) if the video "
                "loses detail or blurs. "
                "Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model. It is cloned; the input stays untouched."),
                io.String.Input("gate", default=DEFAULT_GATE,
                                tooltip="Share of the group mean in each block's input, 0-1: one value for every layer "
                                        "('0.1'), or a comma-separated list with one value per model layer or per layer "
                                        "chosen in 'layers' ('0.1, 0.1, 0.2'). 0 leaves a layer unchanged. Our default "
                                        "0.1 is small because the model was never trained with the mix (the paper learned "
                                        "its gates while fine-tuning, starting at 0.5)."),
                io.Int.Input("group_size", default=DEFAULT_GROUP_SIZE, min=1, max=200, **EXPERT,
                             tooltip="Layers per accumulation group: after layer i the running mean restarts when i is a "
                                     "multiple of group_size. The reference uses 6. Larger groups average more layers."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0], **EXPERT,
                               tooltip="'attention input': the mixed features feed only what forms the self-attention's "
                                       "q, k, v; the residual stream keeps the block's own input (gentler for weights never "
                                       "tuned for it). 'block input': the reference rule, the block's whole input is replaced."),
                io.String.Input("layers", default="all", **EXPERT,
                                tooltip="Blocks that get the mix: 'all', or indices and ranges such as '1-20, 25' "
                                        "(HunyuanVideo counts double-stream blocks first, then single-stream blocks). Layer 0 "
                                        "and each layer right after a group boundary average only their own input: no change."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run (0 = first step) where the accumulation starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run where the accumulation stops."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, gate, group_size, mode, layers, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(apply_feature_accumulation(model, gate, group_size, mode, layers, start_percent, end_percent))
