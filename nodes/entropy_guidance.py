from ._api import EXPERT, io

from ..enhance_core.methods.entropy_guidance import BRANCHES, MAPS, apply_entropy_guidance
from ..enhance_core.models import supported_families


class EntropyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FreeVideoEntropyGuidance",
            display_name="IE-Adapt Entropy Guidance",
            category="FreeVideo",
            description=(
                "IE-Adapt quality guidance ('Understanding Attention Mechanism in Video Diffusion Models'): registers "
                "the self-attention layer(s) with the highest attention entropy and adds scale x (positive branch - "
                "negative branch) to the CFG result, where the branches replace those layers' attention map by the "
                "uniform map or the identity. Place it between the model loader (after LoRAs) and the sampler (it also "
                "guides distilled models sampled without CFG); the Attention Inspector shows which layer 'auto' picks. "
                "Supported: " + "; ".join(supported_families()) + "."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The video model to guide. It is cloned; the input stays untouched."),
                io.Float.Input("scale", default=1.0, min=0.0, max=100.0, step=0.01,
                               tooltip="Guidance weight lambda, independent of the CFG scale: guided = uncond + cfg x "
                                       "(cond - uncond) + lambda x (positive - negative). Raise for a stronger correction, "
                                       "lower if the video gets over-sharpened, saturated or flickers; 0 turns the node "
                                       "off. Our recommendation (the paper gives none for these models): 0.5-2, start at "
                                       "1, lower end at high CFG (Wan at 5-6)."),
                io.Combo.Input("positive_branch", options=list(BRANCHES), default="uniform",
                               tooltip="Attention map of the registered layers in the branch guided towards: 'uniform' "
                                       "(every query gets the mean value; highest entropy, best quality in the paper) or "
                                       "'original' (the unchanged conditional prediction, no extra pass). Each non-original "
                                       "branch costs one extra batch element per step."),
                io.Combo.Input("negative_branch", options=list(BRANCHES), default="identity",
                               tooltip="Attention map of the branch guided away from: 'identity' (each token keeps its own "
                                       "value; lowest entropy) or 'original'. Allowed pairs: uniform/identity (the paper's "
                                       "best average rank), original/identity (perturbed-attention guidance; the paper's "
                                       "best average score, and one extra pass instead of two), uniform/original."),
                io.String.Input("layers", default="auto", **EXPERT,
                                tooltip="'auto': register the top_k layers with the highest attention entropy at the first "
                                        "active step (logged; see the Attention Inspector node). Or a fixed list of "
                                        "self-attention layer indices such as '12' or '10-12, 20'."),
                io.Int.Input("top_k", default=1, min=1, max=200, **EXPERT,
                             tooltip="How many highest-entropy layers 'auto' registers (the paper uses 1). More layers "
                                     "perturb more of the model: a stronger, less targeted effect at the same scale. "
                                     "Ignored with a manual layer list; must not exceed the model's number of "
                                     "self-attention layers."),
                io.Int.Input("entropy_rows", default=0, min=0, max=65536, **EXPERT,
                             tooltip="0 (default): the registry measures the exact entropy, about one extra model call "
                                     "once per run. A number such as 512 estimates it from that many query rows per head "
                                     "(exact over all keys, within 1% in tests) for very long videos; close layers can "
                                     "then swap places."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run (0 = first step) where the guidance starts; the "
                                       "registry is measured at the first step inside the window."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, **EXPERT,
                               tooltip="Fraction of the sampling run where the guidance stops."),
                io.Combo.Input("attention_map", options=list(MAPS), default="video tokens", **EXPERT,
                               tooltip="Joint-attention models (HunyuanVideo, Mochi, CogVideoX) have text tokens in "
                                       "self-attention. 'video tokens': measure and replace only the video-to-video map; "
                                       "text keeps its attention and the uniform branch mixes no text into the video "
                                       "(ours; the paper's U-Net models have no text there). 'whole map': text rows and "
                                       "keys too. Same result either way for Wan, LTX-Video and Cosmos."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, positive_branch, negative_branch, layers, top_k, entropy_rows, start_percent, end_percent,
                attention_map="video tokens") -> io.NodeOutput:
        return io.NodeOutput(apply_entropy_guidance(model, scale, positive_branch, negative_branch, layers, top_k,
                                                    entropy_rows, start_percent, end_percent, attention_map))
