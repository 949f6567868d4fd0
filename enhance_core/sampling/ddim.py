"""The DDIM inversion step on ComfyUI's model sampling (EVS's feature injection, editing a real video)."""

import torch


def input_scale(model_sampling, sigma) -> float:
    """The factor ComfyUI's model sampling scales a latent at level sigma by before the network
    (calculate_input: 1 / sqrt(sigma^2 + sigma_data^2) for epsilon, v and EDM models, 1 / (sigma + 1)
    for Cosmos-Predict2's rectified flow, 1 for flow models)."""
    one = torch.ones(1)
    return float(model_sampling.calculate_input(torch.full((1,), float(sigma)), one))


def ddim_inversion_step(predict, x, sigma, sigma_next, model_sampling):
    """One DDIM inversion step of x from level sigma up to sigma_next; predict(x, level) is the
    model's clean-latent prediction through ComfyUI's model sampling. Returns (x at sigma_next, the
    prediction).

    DDIM inversion (as diffusers' DDIMInverseScheduler): the network gets the current latent, at its
    own level, with the timestep of the next level; its noise estimate then moves the latent up with
    the deterministic first-order step. ComfyUI scales a model's input for the level it is called at,
    so the latent is handed over as x * c_in(sigma) / c_in(sigma_next): the network sees
    c_in(sigma) * x, the latent as it is, and the noise estimate is (handed - prediction) /
    sigma_next. (For flow models, c_in is 1: nothing is rescaled.)"""
    handed = x * (input_scale(model_sampling, sigma) / input_scale(model_sampling, sigma_next))
    denoised = predict(handed, sigma_next)
    return x + (handed - denoised) * ((sigma_next - sigma) / sigma_next), denoised
