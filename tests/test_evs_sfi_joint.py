"""EVS Selective Feature Injection on every family, joint text-video attention included, with video
CFG > 1: the kernel of an injected layer gets the inversion's video K, V and the blended video Q in
both the conditional and the unconditional element, and each element's own text tokens."""

import pytest
import torch

from freevideo.enhance_core.patching.layer_routing import SelfAttentionLayers
from freevideo.enhance_core.methods.evs.sampler import SFI_SETTINGS, SelectiveFeatureInjection, sfi_layers_and_gamma
from freevideo.enhance_core.models import adapter_for
from support.families import FAMILIES, conditioning, load, latent as family_latent
from support.sampling import ksample

GAMMA = 0.7


@pytest.mark.families
@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.id)
def test_injects_video_tokens_and_keeps_each_branchs_text(fam):
    model = load(fam)
    clone = model.clone()
    seen = []

    def record(call):
        seen.append(dict(q=call.q.clone(), k=call.k.clone(), v=call.v.clone(), axis=call.token_axis,
                         groups=list(call.options["cond_or_uncond"]), video=(call.video.start, call.video.stop)))
        return call.run()
    # Inside the injection (registered first): it sees what the kernel gets.
    SelfAttentionLayers(clone, adapter_for(clone), "test_recorder", "test recorder").route([0], record)
    sfi = SelectiveFeatureInjection(clone, "0", GAMMA)
    sigma = float(model.get_model_object("model_sampling").sigma_max)
    sfi.keep_levels([sigma])
    sfi.sigma = sigma
    latent = family_latent(fam)

    def run(mode, cfg, seed):
        """{cond index: what layer 0's kernel got for its batch rows}: cond and uncond in one
        forward, or in one each where the model takes one batch element per call (MiniMax H3)."""
        sfi.mode = mode
        seen.clear()
        ksample(clone, latent, conditioning(fam, 1), conditioning(fam, 2), steps=1, cfg=cfg, seed=seed)
        rows = {}
        for call in seen:
            per = call["q"].shape[0] // len(call["groups"])
            for i, c in enumerate(call["groups"]):
                assert c not in rows
                rows[c] = dict(call, **{n: call[n][i * per:(i + 1) * per] for n in ("q", "k", "v")})
        return rows

    recorded = run("record", 1.0, seed=5)  # the inversion: positive prompt only
    assert list(recorded) == [0]
    recorded = recorded[0]
    plain = run(None, 3.0, seed=9)
    injected = run("inject", 3.0, seed=9)
    assert sorted(plain) == [0, 1] and sorted(injected) == [0, 1]
    axis, (start, stop) = plain[0]["axis"], plain[0]["video"]
    for name in ("q", "k", "v"):
        inv = recorded[name].narrow(axis, start, stop - start)
        for g in range(2):  # cond and uncond elements
            got = injected[g][name]
            own = plain[g][name]
            video = got.narrow(axis, start, stop - start)
            expected = GAMMA * inv + (1 - GAMMA) * own.narrow(axis, start, stop - start) if name == "q" else inv
            torch.testing.assert_close(video, expected.to(video.dtype), rtol=1e-5, atol=1e-6)
            for a, b in ((0, start), (stop, got.shape[axis])):  # text tokens: the element's own
                if b > a:
                    assert torch.equal(got.narrow(axis, a, b - a), own.narrow(axis, a, b - a)), (name, g)


def test_paper_settings_pick_layer_halves_and_gamma():
    assert sfi_layers_and_gamma(SFI_SETTINGS[0], "all", 0.3, 30) == ("15-29", 0.8)
    assert sfi_layers_and_gamma(SFI_SETTINGS[1], "all", 0.3, 30) == ("0-14", 0.5)
    assert sfi_layers_and_gamma(SFI_SETTINGS[2], "3-4", 0.3, 30) == ("3-4", 0.3)
    with pytest.raises(ValueError, match="sfi_setting"):
        sfi_layers_and_gamma("deep", "all", 0.3, 30)
