from ._api import io

from ..enhance_core.feature_accumulation import DEFAULT_GATE, DEFAULT_GROUP_SIZE, MODES, apply_feature_accumulation
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
                "Experimental. Cross-layer feature accumulation from RepVideo (Si et al. 2025, 'RepVideo: Rethinking "
                "Cross-Layer Representation for Video Generation'): before each transformer block the hidden state is "
                "mixed with the mean of the outputs of the blocks since the last group boundary, "
                "h = gate x mean + (1 - gate) x h, so neighbouring layers see steadier features. The paper fine-tuned "
                "CogVideoX-2B with one learned gate per layer (VBench total 81.94 vs 80.91); this node applies the same "
                "mechanism without training, with fixed gates you choose, to models that never saw it: treat it as an "
                "experiment and compare with the plain model at the same seed. Video tokens only; the text tokens of "
                "joint attention pass through. Place it between the model loader (after LoRAs) and the sampler.\n"
                "gate: raise it for a stronger mix; lower it (or use 'attention input' mode) if the video loses detail, "
                "gets blurry or breaks up. The paper's gates are learned (initialised 0.5); 0.1 is our default for "
                "untuned weights, not a tuned value. group_size: the reference uses 6.\n"
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
                io.Int.Input("group_size", default=DEFAULT_GROUP_SIZE, min=1, max=200,
                             tooltip="Layers per accumulation group: after layer i the running mean restarts when i is a "
                                     "multiple of group_size. The reference uses 6. Larger groups average more layers."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="'attention input': the mixed features feed only what forms the self-attention's "
                                       "q, k, v; the residual stream keeps the block's own input (gentler for weights never "
                                       "tuned for it). 'block input': the reference rule, the block's whole input is replaced."),
                io.String.Input("layers", default="all",
                                tooltip="Blocks that get the mix: 'all', or indices and ranges such as '1-20, 25' "
                                        "(HunyuanVideo counts double-stream blocks first, then single-stream blocks). Layer 0 "
                                        "and each layer right after a group boundary average only their own input: no change."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run (0 = first step) where the accumulation starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run where the accumulation stops."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, gate, group_size, mode, layers, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(apply_feature_accumulation(model, gate, group_size, mode, layers, start_percent, end_percent))
