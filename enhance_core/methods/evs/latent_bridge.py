"""Moving clean (x0) latents between a video model's latent and an image model's batch of frames.

EVS hands only clean latents between its two models, so a bridge never sees noise:
- direct: both models share the latent format and the video's frames are batch entries
  ([F, C, H, W], SD1.5 + AnimateDiff): the same tensor serves both models.
- pixels: anything else. Native video latents ([B, C, T, H, W]: Wan, HunyuanVideo, LTX, ...) are
  temporally compressed, so one latent frame is not an image an image model can refine. Decode with
  the video VAE, encode each frame with the image VAE, and the same way back.

ComfyUI's VAE.encode crops every axis of a 5-D pixel input to the spatial grid (the frame axis
too), so videos go in as [T, H, W, C] one at a time, and frames for a 3-D (video-style) image VAE
one at a time as [1, H, W, C].
"""

import torch


class BridgeError(ValueError):
    pass


def _format_name(latent_format) -> str:
    return type(latent_format).__name__


def check_video_latent(video_model, samples) -> None:
    """A clear error when `samples` is not a video latent of the video model's format."""
    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        raise BridgeError("latent: EVS needs a plain video latent tensor (nested audio/video latents are not supported)")
    fmt = video_model.get_model_object("latent_format")
    dims = getattr(fmt, "latent_dimensions", 2)
    shape = tuple(samples.shape)
    if samples.ndim not in (4, 5):
        raise BridgeError(f"latent: shape {shape} is not a video latent; expected [frames, C, H, W] "
                          "(frames as batch entries, AnimateDiff) or [B, C, T, H, W] (native video models)")
    if samples.ndim - 2 != dims:
        want = "[B, C, T, H, W]" if dims == 3 else "[frames, C, H, W]"
        raise BridgeError(f"latent: shape {shape} does not fit the video model, whose latent format "
                          f"({_format_name(fmt)}) takes {want} latents")
    if samples.shape[1] != fmt.latent_channels:
        raise BridgeError(f"latent: has {samples.shape[1]} channels; the video model's latent format "
                          f"({_format_name(fmt)}) has {fmt.latent_channels}")
    frames = samples.shape[2] if samples.ndim == 5 else samples.shape[0]
    if frames < 2:
        where = "latent frame" if samples.ndim == 5 else "batch entry (frames are batch entries here)"
        raise BridgeError(f"latent: shape {shape} holds a single {where}; EVS refines videos of 2 or more frames")


def make_bridge(image_model, video_model, samples, image_vae=None, video_vae=None):
    """Validate the pairing and return the bridge for it (before anything runs)."""
    check_video_latent(video_model, samples)
    image_fmt = image_model.get_model_object("latent_format")
    video_fmt = video_model.get_model_object("latent_format")
    if (samples.ndim == 4 and type(image_fmt) is type(video_fmt)
            and image_fmt.latent_channels == video_fmt.latent_channels
            and getattr(image_fmt, "latent_dimensions", 2) == 2):
        return DirectBridge(image_vae if image_vae is not None else video_vae)

    if samples.ndim == 5:
        why = (f"the video latent {tuple(samples.shape)} is temporally compressed, so its frames must "
               "go through pixels")
    else:
        why = (f"the image model's latent format ({_format_name(image_fmt)}) differs from the video "
               f"model's ({_format_name(video_fmt)})")
    missing = [name for name, vae in (("video_vae", video_vae), ("image_vae", image_vae)) if vae is None]
    if missing:
        raise BridgeError(f"{' and '.join(missing)}: required because {why}. Connect the VAE of each model "
                          "(video_vae decodes the input latent, image_vae encodes frames for the image model).")
    if video_vae.latent_channels != samples.shape[1] or video_vae.latent_dim != samples.ndim - 2:
        raise BridgeError(f"video_vae: makes {video_vae.latent_channels}-channel {video_vae.latent_dim + 2}-D latents, "
                          f"but the video latent is {tuple(samples.shape)}; connect the VAE the video belongs to")
    if image_vae.latent_channels != image_fmt.latent_channels:
        raise BridgeError(f"image_vae: makes {image_vae.latent_channels}-channel latents; the image model's latent "
                          f"format ({_format_name(image_fmt)}) has {image_fmt.latent_channels}")
    up = video_vae.spacial_compression_decode()
    down = image_vae.spacial_compression_encode()
    height, width = samples.shape[-2] * up, samples.shape[-1] * up
    if height % down or width % down:
        raise BridgeError(f"image_vae: decoded frames are {width}x{height} pixels, not a multiple of the image VAE's "
                          f"{down}-pixel grid; resize the video")
    return PixelBridge(image_vae, video_vae, samples.shape, getattr(image_fmt, "latent_dimensions", 2))


class DirectBridge:
    kind = "direct"

    def __init__(self, vae=None):
        self.vae = vae

    def to_image(self, latent):
        return latent

    def to_video(self, latent):
        return latent

    def finish(self, latent):
        """(latent in the video's format, decoded frames [N, H, W, 3] or None)."""
        frames = None if self.vae is None else _frames(self.vae.decode(latent))
        return latent, frames


def _frames(pixels):
    """VAE output as a flat batch of frames [N, H, W, C]."""
    return pixels.reshape(-1, *pixels.shape[-3:]).float()


class PixelBridge:
    kind = "pixels"

    def __init__(self, image_vae, video_vae, video_shape, image_dims: int):
        self.image_vae = image_vae
        self.video_vae = video_vae
        self.video_shape = tuple(video_shape)
        self.image_dims = image_dims

    def to_image(self, latent):
        frames = _frames(self.video_vae.decode(latent))
        return self._encode_frames(frames)

    def to_video(self, latent):
        return self._encode_video(self._decode_frames(latent))

    def finish(self, latent):
        frames = self._decode_frames(latent)
        return self._encode_video(frames), frames

    def _encode_frames(self, frames):
        if self.image_vae.latent_dim == 3:
            # A video-style image VAE (Qwen-Image uses the Wan 2.1 VAE) would read a batch of frames as
            # one clip: encode each frame on its own.
            out = torch.cat([self.image_vae.encode(frames[i:i + 1]) for i in range(frames.shape[0])])
        else:
            out = self.image_vae.encode(frames)
        if self.image_dims == 3 and out.ndim == 4:
            out = out.unsqueeze(2)
        elif self.image_dims == 2 and out.ndim == 5:
            out = out[:, :, 0]
        return out

    def _decode_frames(self, latent):
        return _frames(self.image_vae.decode(latent))

    def _encode_video(self, frames):
        if len(self.video_shape) == 5:
            batch = self.video_shape[0]
            per_video = frames.shape[0] // batch
            out = torch.cat([self.video_vae.encode(frames[b * per_video:(b + 1) * per_video]) for b in range(batch)])
        else:
            out = self.video_vae.encode(frames)
        if tuple(out.shape) != self.video_shape:
            raise BridgeError(f"video_vae: re-encoding {frames.shape[0]} frames gave a latent of shape {tuple(out.shape)}, "
                              f"not the video's {self.video_shape}")
        return out
