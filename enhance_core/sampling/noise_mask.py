"""A sampling run's noise mask (SetLatentNoiseMask, differential diffusion) applied to a branch's
own trajectory as ComfyUI's sampler applies it to the sampled latent.

Where the latent carries a noise mask, ComfyUI's KSamplerX0Inpaint evaluates the model at every step
on the latent blended, outside the mask, with the masked latent noised to the step's level, and
replaces the prediction there with the masked latent (so the result keeps it outside the mask). A
branch beside the sampler (editing's source) must see the same video outside the mask as the
target does, so it gets the same two blends, with the step's mask (after a denoise mask function).
"""

import torch


class NoiseMask:
    """The blends of one run: mask (prepared to the latent's shape), the noise and the masked latent
    KSamplerX0Inpaint holds, the guider and the run's sigmas its denoise mask function is given."""

    def __init__(self, mask, noise, latent_image, guider, sigmas, start):
        self.mask, self.noise, self.latent_image = mask, noise, latent_image
        self.guider, self.sigmas = guider, sigmas
        self.start = start  # the sampler's first latent (before the blend: the blend is the model's input)

    @classmethod
    def of_run(cls, sampler, guider, sigmas, extra_args, noise, latent_image, denoise_mask):
        """The run's blends as KSAMPLER.sample sets them up (its noise a seeded draw for samplers
        that inpaint with random noise: ddim); None without a mask."""
        if denoise_mask is None:
            return None
        sampling = guider.inner_model.model_sampling
        max_denoise = sampler.max_denoise(guider, sigmas) if hasattr(sampler, "max_denoise") else False
        start = sampling.noise_scaling(sigmas[0], noise, latent_image, max_denoise)
        if getattr(sampler, "inpaint_options", {}).get("random", False):
            generator = torch.manual_seed(extra_args.get("seed", 41) + 1)
            noise = torch.randn(noise.shape, generator=generator, device="cpu").to(noise.dtype).to(noise.device)
        return cls(denoise_mask, noise, latent_image, guider, sigmas, start)

    def at(self, sigma, model_options):
        """The mask at this step."""
        function = (model_options or {}).get("denoise_mask_function")
        if function is None:
            return self.mask
        return function(sigma, self.mask, extra_options={"model": self.guider, "sigmas": self.sigmas})

    def model_input(self, x, sigma, model_options):
        """x as the model sees it at level sigma: outside the mask, the masked latent noised there."""
        mask = self.at(sigma, model_options)
        noised = self.guider.inner_model.scale_latent_inpaint(x=x, sigma=sigma, noise=self.noise,
                                                              latent_image=self.latent_image, denoise_mask=mask)
        return x * mask + noised * (1. - mask)

    def prediction(self, denoised, sigma, model_options):
        """The clean-latent prediction as the sampler uses it: outside the mask, the masked latent."""
        mask = self.at(sigma, model_options)
        return denoised * mask + self.latent_image * (1. - mask)
