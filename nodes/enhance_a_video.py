from ._api import EXPERT, io

from ..enhance_core.methods.enhance_a_video import apply_enhance_a_video
from ..enhance_core.models import supported_families


class EnhanceAVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoEnhanceAVideo",
            display_name="Enhance-A-Video",
            category="FreeVideo",
            description=(
                "Enhance-A-Video ('Enhance-A-Video: Better Generated Video for Free'): scales each self-attention "
                "output by the cross-frame intensity of the model's own temporal attention, for smoother motion and "
                "more detail at almost no cost. Place it between the model loader (after LoRAs) and the sampler; "
                "raise weight for a stronger effect, lower it if frames look noisy or over-smoothed. "
                "Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model to enhance. It is cloned; the input stays untouched. With "
                                                "Wan 2.2's two experts, patch both models."),
                io.Float.Input("weight", default=4.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Enhance temperature tau: higher = stronger (smoother motion, detail shared across "
                                       "frames); lower it if frames look noisy or over-smoothed; 0 turns the node off. "
                                       "Official code: 4 for Wan, HunyuanVideo and LTX-Video (3.4 for CogVideoX), meant "
                                       "for long clips: with even temporal attention the scale is 1 + weight / latent "
                                       "frames. Our recommendation: about latent frames / 5 (Wan or HunyuanVideo: 81 "
                                       "frames 4, 33 frames 2, 17 frames 1; LTX-Video: 121 frames 3, 49 frames 1.5), or "
                                       "set reference_latent_frames to keep one weight's strength at any length."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run (0 = first step) where the enhancement starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run where the enhancement stops."),
                io.String.Input("layers", default="all", **EXPERT,
                                tooltip="Self-attention layers to enhance: 'all', or indices and ranges such as '0-9, 20' "
                                        "(HunyuanVideo counts double-stream blocks first, then single-stream blocks). "
                                        "Wan 1.3B and 5B: 0-29, Wan 14B: 0-39, HunyuanVideo 1.0: 0-59, LTX-Video 2B: "
                                        "0-27; the Attention Inspector charts every layer."),
                # Optional and last: graphs saved before it existed load with it off, their widget
                # values in place.
                io.Int.Input("reference_latent_frames", default=0, min=0, max=10000, optional=True,
                             tooltip="0 (default): weight acts as in the paper, so one weight is stronger on short "
                                     "clips (with evenly spread temporal attention the scale is 1 + weight / latent "
                                     "frames). N > 0: weight is the strength at N latent frames and is scaled with "
                                     "the clip's length (weight x frames / N), so the scale stays about 1 + weight / N "
                                     "at any length. 21 = 81 frames of Wan or HunyuanVideo (4 video frames per latent "
                                     "frame; LTX-Video: 8), where the official weight 4 suits."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, weight, start_percent, end_percent, layers, reference_latent_frames=0) -> io.NodeOutput:
        return io.NodeOutput(apply_enhance_a_video(model, weight, start_percent, end_percent, layers,
                                                   reference_latent_frames))
