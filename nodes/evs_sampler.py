import comfy.samplers
from ._api import EXPERT, io

from ..enhance_core.methods.evs.sampler import SFI_SETTINGS, Stage, evs_sample
from ..enhance_core.models import supported_families


class EVSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        samplers = comfy.samplers.KSampler.SAMPLERS
        schedulers = comfy.samplers.KSampler.SCHEDULERS
        return io.Schema(
            node_id="FreeVideoEVSSampler",
            display_name="EVS Sampler (T2I + [T2V] + T2I)",
            category="FreeVideo",
            description=(
                "EVS ('Encapsulated Composition of Text-to-Image and Text-to-Video Models for High-Quality Video "
                "Synthesis'): refines a video with an image model for imaging quality and a video model for motion, "
                "the image model denoising every frame around one block of video-model steps, the two meeting only "
                "through clean-latent predictions. Put it after the sampler that made the video (its LATENT in); "
                "latents pass directly when both models share a format, otherwise through pixels with both VAEs. "
                "Raise strength or t_T2V for more image-model detail, t_V to remove more flicker, and turn on sfi to "
                "keep the image model's style."
            ),
            inputs=[
                io.Latent.Input("latent", tooltip="The video to refine, in the video model's latent format "
                                "(native video latent [B,C,T,H,W], or frames as batch entries for AnimateDiff)."),
                io.Model.Input("image_model", tooltip="The text-to-image model that refines every frame (T2I)."),
                io.Conditioning.Input("image_positive", tooltip="Positive prompt encoded for the image model."),
                io.Conditioning.Input("image_negative", tooltip="Negative prompt encoded for the image model."),
                io.Model.Input("video_model", tooltip="The text-to-video model of the [T2V] block (e.g. AnimateDiff-"
                               "Lightning through AnimateDiff-Evolved, Wan 2.1). Not modified; cloned when SFI is on."),
                io.Conditioning.Input("video_positive", tooltip="Positive prompt encoded for the video model."),
                io.Conditioning.Input("video_negative", tooltip="Negative prompt encoded for the video model."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the three noisings (image start, [T2V] block, image re-entry) and of "
                                     "stochastic samplers."),
                io.Int.Input("image_steps", default=50, min=1, max=10000,
                             tooltip="Length of the image model's full schedule (paper: 50). strength picks its last "
                                     "strength x image_steps steps (rounded half up)."),
                io.Float.Input("image_cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance of the image model: its usual value (e.g. 7.5 for "
                                       "SD1.5 checkpoints, 2.5 for Qwen-Image in workflows/wan21_evs_refine.json)."),
                io.Combo.Input("image_sampler", options=samplers, default="euler",
                               tooltip="ComfyUI sampler of the image stages."),
                io.Combo.Input("image_scheduler", options=schedulers, default="normal",
                               tooltip="ComfyUI scheduler of the image schedule."),
                io.Float.Input("strength", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="SDEdit strength of the image run: the fraction of image_steps it runs "
                                       "(paper: 0.4, i.e. image steps 20..1 of 50). Higher = more image-model detail "
                                       "and change; lower = closer to the input. Must run at least one step."),
                io.Int.Input("t_T2V", default=10, min=1, max=10000,
                             tooltip="Image step (counted down to 1 like the paper's timesteps) where the [T2V] block "
                                     "is inserted; must lie in the image run (1..strength x image_steps). "
                                     "Larger = earlier = more image steps after it: better imaging, less consistency. "
                                     "Ours: 10, halfway through the paper's 20-step image run (it gives no value)."),
                io.Int.Input("video_steps", default=8, min=1, max=10000,
                             tooltip="Length of the video model's full schedule (paper: 8-step AnimateDiff-Lightning; "
                                     "our starting point with Wan 2.1: 20 steps at video_cfg 6)."),
                io.Float.Input("video_cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance of the video model (1.0 for AnimateDiff-Lightning)."),
                io.Combo.Input("video_sampler", options=samplers, default="euler",
                               tooltip="ComfyUI sampler of the [T2V] block."),
                io.Combo.Input("video_scheduler", options=schedulers, default="sgm_uniform",
                               tooltip="ComfyUI scheduler of the video schedule (sgm_uniform for AnimateDiff-Lightning)."),
                io.Int.Input("t_V", default=4, min=1, max=10000,
                             tooltip="Video step (counted down to 1) the block starts from: x0_I is noised (or "
                                     "DDIM-inverted) to it. Larger = more smoothing, drifts towards the video model's "
                                     "imaging. At most video_steps. Ours: 4 of 8 for AnimateDiff-Lightning, 3 of 20 "
                                     "for Wan 2.1; for other undistilled video models about 15-25% of video_steps."),
                io.Int.Input("n_V", default=4, min=1, max=10000,
                             tooltip="Video steps the block runs from t_V (at most t_V). Below t_V the block ends "
                                     "with one more call for the clean-latent prediction."),
                io.Boolean.Input("sfi", default=False,
                                 tooltip="Selective Feature Injection: DDIM-invert x0_I with the video model instead of "
                                         "noising it, recording Q, K, V of sfi_layers, and use Attn(gamma*Q_inv + "
                                         "(1-gamma)*Q, K_inv, V_inv) there in the block. Supported video models: "
                                         + "; ".join(supported_families()) + "."),
                io.Float.Input("sfi_gamma", default=0.8, min=0.0, max=1.0, step=0.01, **EXPERT,
                               tooltip="SFI query blend gamma, used with sfi_setting 'custom' (paper: 0.8 in deeper "
                                       "layers, 0.5 in shallower ones); 1 keeps the inversion's attention maps."),
                io.String.Input("sfi_layers", default="all", **EXPERT,
                                tooltip="SFI self-attention layers of the video model, used with sfi_setting 'custom': "
                                        "'all', or indices and ranges such as '10-19'. Memory: these layers x n_V x Q, K, "
                                        "V of the video's tokens."),
                io.Combo.Input("sfi_setting", options=list(SFI_SETTINGS), default=SFI_SETTINGS[0], **EXPERT,
                               tooltip="The paper's two balance points (its Fig. 8): deeper layers with gamma 0.8, or "
                                       "shallower layers with gamma 0.5; on these DiT models 'deeper' is the second half "
                                       "of the self-attention layers and 'shallower' the first half (our reading: a DiT "
                                       "has no U-Net depth). 'custom' uses sfi_layers and sfi_gamma."),
                io.Vae.Input("image_vae", optional=True,
                             tooltip="VAE of the image model. Needed (with video_vae) when the latents are bridged "
                                     "through pixels; in the direct case it decodes the output frames."),
                io.Vae.Input("video_vae", optional=True,
                             tooltip="VAE the input video belongs to. Needed (with image_vae) when the latents are "
                                     "bridged through pixels, e.g. a Wan or HunyuanVideo latent."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The refined video in the input's latent format."),
                io.Image.Output(display_name="frames", tooltip="The refined frames, decoded by the image model's VAE; not produced without a VAE."),
            ],
        )

    @classmethod
    def execute(cls, latent, image_model, image_positive, image_negative, video_model, video_positive,
                video_negative, seed, image_steps, image_cfg, image_sampler, image_scheduler, strength, t_T2V,
                video_steps, video_cfg, video_sampler, video_scheduler, t_V, n_V, sfi, sfi_gamma, sfi_layers,
                sfi_setting=SFI_SETTINGS[0], image_vae=None, video_vae=None) -> io.NodeOutput:
        image = Stage(image_model, image_positive, image_negative, image_cfg, image_sampler, image_scheduler, image_steps)
        video = Stage(video_model, video_positive, video_negative, video_cfg, video_sampler, video_scheduler, video_steps)
        out, frames = evs_sample(image, video, latent, strength, t_T2V, t_V, n_V, seed, image_vae=image_vae,
                                 video_vae=video_vae, sfi=sfi, sfi_gamma=sfi_gamma, sfi_layers=sfi_layers,
                                 sfi_setting=sfi_setting)
        return io.NodeOutput(out, frames)
