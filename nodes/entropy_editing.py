from ._api import io

from ..enhance_core.entropy_editing import apply_entropy_editing
from ..enhance_core.models import supported_families


class EntropyEditing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoEntropyEditing",
            display_name="IE-Adapt Video Editing",
            category="FreeVideo",
            description=(
                "IE-Adapt video editing, from 'Understanding Attention Mechanism in Video Diffusion Models' (section "
                "4.2): a text-to-video model edits a video from a prompt, no training. Put it between the model loader "
                "and any sampler; the sampler's positive prompt is the target (what the video should become), "
                "source_positive describes the source. A source branch runs beside the target in the same forward; "
                "at the first step the layers whose self-attention entropy (measured on the source) is in the lowest "
                "`ratio` are chosen, and there the target uses the source's attention map (its q and k) with its own "
                "values, so the layout and motion stay and the look follows the target prompt. Without "
                "source_latent the source is generated from the sampler's own noise (edit a generated video: use the "
                "seed that made it); with source_latent (a real video, VAE-encoded at the sampled size) it is "
                "DDIM-inverted with source_positive first and the target starts from the inverted latent (the sampler's "
                "seed and noise are then unused; use a sampler that adds no noise on the way, such as euler).\n"
                "ratio: raise it to keep more of the source's structure, lower it to let the prompt change more "
                "(paper: 0.5, and 0.5-0.65 balances text and frame consistency). Costs one extra batch element per "
                "cond (2x the forward at CFG 1), plus one source forward at the first step.\n"
                "Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model; cloned, the input stays untouched."),
                io.Conditioning.Input("source_positive", tooltip="The prompt that describes the source video (the "
                                      "prompt that generated it, or a caption of the real video)."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the self-attention layers (lowest source entropy first) whose "
                                       "attention map the target takes from the source. Paper: 0.5; 0.5-0.65 balances "
                                       "text alignment and consistency with the source. 0 turns the node off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run where the replacement starts; the layers are "
                                       "chosen at the first step inside the window."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling run where the replacement stops; lower it to let the "
                                       "last steps refine details freely."),
                io.Latent.Input("source_latent", optional=True,
                                tooltip="A real source video's latent (VAE Encode, same size as the sampled latent): "
                                        "it is DDIM-inverted with source_positive. Leave empty to edit a video "
                                        "generated with the sampler's seed."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, source_positive, ratio, start_percent, end_percent, source_latent=None) -> io.NodeOutput:
        return io.NodeOutput(apply_entropy_editing(model, source_positive, source_latent, ratio, start_percent, end_percent))
