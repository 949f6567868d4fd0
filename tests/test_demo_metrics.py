"""The demo's metrics (scripts/demo_metrics.py) on the procedural renderer's own clips: the detector
reads every label back, and each metric moves the way its name says under a known corruption."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import demo_clips  # noqa: E402
import demo_metrics  # noqa: E402


def frames(colour="red", shape="square", direction="left", seed=3):
    return demo_clips.render_clip(colour, shape, direction, seed=seed)["video"].permute(1, 2, 3, 0)


@pytest.mark.parametrize("labels", demo_clips.all_labels())
def test_detector_reads_back_every_label(labels):
    seed = demo_clips.all_labels().index(labels)
    result = demo_metrics.video_metrics(frames(*labels, seed=seed), labels)
    assert (result["colour_ok"], result["shape_ok"], result["direction_ok"]) == (1.0, 1.0, 1.0), result["detected"]
    assert result["seen"] == 1.0


@pytest.mark.parametrize("shape", demo_clips.SHAPES)
def test_shapes_are_told_apart_through_blur(shape):
    """Rounded corners (a 5x5 box blur, twice: what a tiny VAE does to an outline) keep the outline's
    3rd / 4th harmonic above a quarter of its sharp value; circles stay below both thresholds."""
    for seed in range(4):
        video = frames("blue", shape, "up", seed=seed).permute(0, 3, 1, 2)
        for _ in range(2):
            video = torch.nn.functional.avg_pool2d(video, 5, stride=1, padding=2, count_include_pad=False)
        found = demo_metrics.detect(video.permute(0, 2, 3, 1))
        assert found["shape"] == shape, (seed, found["corners"])


def test_centroids_follow_the_renderer():
    clip = demo_clips.render_clip("blue", "circle", "down", seed=5)
    found = demo_metrics.detect(clip["video"].permute(1, 2, 3, 0))
    assert (found["centres"] - (clip["centre"] - 0.5)).abs().max() < 0.5


def test_flicker_sees_background_noise_only():
    clean = frames()
    g = torch.Generator().manual_seed(0)
    noisy = (clean + 0.02 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    assert demo_metrics.flicker(clean) < 0.1
    assert demo_metrics.flicker(noisy) > 3.0  # ~0.02 * 255 * 2 / sqrt(pi)
    still = clean[:1].repeat(len(clean), 1, 1, 1)  # a frozen shape: nothing changes anywhere
    assert demo_metrics.flicker(still) == 0.0


def test_jitter_and_area_change():
    smooth = torch.stack([torch.arange(10.0), torch.zeros(10)], dim=1)
    shaky = smooth.clone()
    shaky[::2, 1] += 2.0
    assert demo_metrics.jitter(smooth) == 0.0
    assert demo_metrics.jitter(shaky) == pytest.approx(4.0)
    assert demo_metrics.area_change(torch.full((5,), 100.0)) == 0.0
    assert demo_metrics.area_change(torch.tensor([100.0, 50.0, 100.0, 50.0])) > 0.3


def test_sharpness_drops_with_blur():
    clean = frames()
    blurred = torch.nn.functional.avg_pool2d(clean.permute(0, 3, 1, 2), 3, stride=1, padding=1, count_include_pad=False).permute(0, 2, 3, 1)
    assert demo_metrics.sharpness(blurred) < 0.75 * demo_metrics.sharpness(clean)


def test_no_shape_is_no_label():
    grey = torch.full((17, 64, 64, 3), 0.5)
    result = demo_metrics.video_metrics(grey, ("red", "circle", "left"))
    assert result["detected"] == (None, None, None)
    assert result["colour_ok"] == 0.0 and result["seen"] == 0.0


def test_summary_has_mean_and_spread():
    rows = [{"flicker": 1.0}, {"flicker": 3.0}, {"flicker": float("nan")}]
    mean, std, n = demo_metrics.summarise(rows)["flicker"]
    assert (mean, n) == (2.0, 2) and std == pytest.approx(2 ** 0.5)


def test_label_embedding_is_the_test_nodes():
    """The training script's conditioning is what FreeVideoTestTextConditioning gives each label."""
    from support import in_process
    in_process.setup()
    from comfy_test_nodes import TestTextConditioning
    node = TestTextConditioning.execute("red", demo_clips.LABEL_TOKENS, demo_clips.TEXT_DIM)
    assert torch.equal(node.result[0][0][0], demo_clips.label_embedding("red"))


def test_track_distance_measures_how_far_the_shape_moved_apart():
    track = lambda *labels: demo_metrics.detect(frames(*labels))["centres"]  # noqa: E731
    a = track("red", "circle", "right")
    same_path_other_colour = track("blue", "circle", "right")
    other_path = track("red", "circle", "left")
    assert demo_metrics.track_distance(a, a) == 0
    assert demo_metrics.track_distance(a, same_path_other_colour) < 1.0
    assert abs(demo_metrics.track_distance(a, other_path) - (a - other_path).norm(dim=-1).nanmean().item()) < 1e-5
    assert demo_metrics.track_distance(a, other_path) > 5.0
