from ._api import EXPERT, io

from ..enhance_core.methods.entropy_editing import apply_entropy_editing
from ..enhance_core.models import supported_families


class EntropyEditing(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoEntropyEditing",
            display_name="IE-Adapt Video Editing",
            category="FreeVideo",
            description=(
                "IE-Adapt video editing ('Understanding Attention Mechanism in Video Diffusion Models'): the sampler "
                "re-makes a source video following its own positive prompt, while in the self-attention layers of "
                "lowest entropy the target takes the source's attention map, so layout and motion stay and the look "
                "follows the prompt. Put it between the model loader and a euler sampler; source_positive describes "
                "the source, a real video goes in source_latent, and without it the source is generated from the "
                "sampler's own noise. With a masked latent (SetLatentNoiseMask, also with Differential Diffusion) it edits "
                "inside the mask and the sampler keeps the latent outside it; the source sees the same kept background. "
                "Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model; cloned, the input stays untouched."),
                io.Conditioning.Input("source_positive", tooltip="The prompt that describes the source video (the "
                                      "prompt that generated it, or a caption of the real video). The source runs as "
                                      "one extra batch element per cond beside the target (about 2x the forward), "
                                      "plus one source forward at the first step to choose the layers; where ComfyUI "
                                      "cannot batch them (a prompt of another length) it runs first, on its own."),
                io.Float.Input("ratio", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Fraction of the self-attention layers (lowest source entropy first) whose "
                                       "attention map the target takes from the source. Paper: 0.5; 0.5-0.65 balances "
                                       "text alignment and consistency with the source. Raise it to keep more of the "
                                       "source's structure, lower it to let the prompt change more; 0 turns the node off."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run where the replacement starts; the layers are "
                                       "chosen at the first step inside the window."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run where the replacement stops; lower it to let the "
                                       "last steps refine details freely."),
                io.Latent.Input("source_latent", optional=True,
                                tooltip="A real source video's latent (VAE Encode, same size as the sampled latent): "
                                        "it is DDIM-inverted with source_positive and a run from the top of the "
                                        "schedule starts from the inverted latent (the sampler's seed and noise are "
                                        "then unused); a later sampler stage continues from its input. Leave empty to "
                                        "edit a video generated with the sampler's seed, steps and scheduler (exact with "
                                        "euler and no CFG modifier such as CFGZeroStar or a post-CFG guidance)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, source_positive, ratio, start_percent, end_percent, source_latent=None) -> io.NodeOutput:
        return io.NodeOutput(apply_entropy_editing(model, source_positive, source_latent, ratio, start_percent, end_percent))
