from comfy_api.latest import io

from ..enhance_core.enhance_a_video import apply_enhance_a_video
from ..enhance_core.models import supported_families


class EnhanceAVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoEnhanceAVideo",
            display_name="Enhance-A-Video",
            category="FreeVideo",
            description=(
                "Enhance-A-Video (cross-frame intensity): scales each self-attention output by "
                "clamp((frames + weight) x mean cross-frame attention, 1), measured per layer, step and "
                "batch element from the model's own temporal attention. Training-free; the frame count "
                "comes from the latent at run time. Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model to enhance. It is cloned; the input stays untouched."),
                io.Float.Input("weight", default=4.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Enhance temperature tau. The official settings use 4 for Wan, HunyuanVideo and "
                                       "LTX-Video. Higher strengthens the effect; 0 turns the node off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run (0 = first step) where the enhancement starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run where the enhancement stops."),
                io.String.Input("layers", default="all",
                                tooltip="Self-attention layers to enhance: 'all', or indices and ranges such as '0-9, 20' "
                                        "(HunyuanVideo counts double-stream blocks first, then single-stream blocks)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, weight, start_percent, end_percent, layers) -> io.NodeOutput:
        return io.NodeOutput(apply_enhance_a_video(model, weight, start_percent, end_percent, layers))
