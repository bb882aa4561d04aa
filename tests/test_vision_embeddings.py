"""`PalmEVisionConfig.patch_norm_eps`: the epsilon of the LayerNorm over each raw patch. At its default (the
reference's 1e-5, `layer_norm_eps`) noise on a flat patch is scaled up to unit size; a larger one keeps it small."""

import json

import pytest
import torch

from palme_hf import PalmEConfig, PalmEForConditionalGeneration, PalmEVisionConfig

from helpers import tiny_model


def image_features(model, pixel_values):
    with torch.no_grad():
        return model.get_image_features(pixel_values=pixel_values).last_hidden_state


def flat_images_with_noise(sigma: float, size: int = 32):
    """A black image, and the same with Gaussian noise of `sigma` (at least 0, as pixel values are)."""
    generator = torch.Generator().manual_seed(0)
    black = torch.zeros(1, 3, size, size)
    return black, (black + sigma * torch.randn(black.shape, generator=generator)).clamp(0, 1)


def test_default_is_the_reference_epsilon_and_follows_layer_norm_eps():
    assert PalmEVisionConfig().patch_norm_eps == PalmEVisionConfig().layer_norm_eps == 1e-5
    assert PalmEVisionConfig(layer_norm_eps=1e-6).patch_norm_eps == 1e-6
    assert PalmEConfig.from_zeta_kwargs().vision_config.patch_norm_eps == 1e-5
    model = tiny_model()
    assert model.model.vision_model.embeddings.patch_norm.eps == 1e-5


def patch_norm_change(model, clean, noisy) -> float:
    """The root mean square of the change in the patch LayerNorm's output from `clean` to `noisy` (flattened
    patches): about 1 when the noise is scaled up to unit variance."""
    patch_norm = model.model.vision_model.embeddings.patch_norm
    with torch.no_grad():
        return (patch_norm(noisy) - patch_norm(clean)).pow(2).mean().sqrt().item()


def test_default_blows_up_noise_on_a_flat_patch_and_a_larger_epsilon_does_not():
    black, noisy = flat_images_with_noise(1 / 255)
    patch_dim = 3 * 8 * 8
    flat, flat_noisy = black.reshape(-1, patch_dim), noisy.reshape(-1, patch_dim)
    changes, feature_changes = {}, {}
    for eps in [None, 0.1]:
        torch.manual_seed(0)
        model = tiny_model(vision={"patch_norm_eps": eps} if eps else None)
        changes[eps] = patch_norm_change(model, flat, flat_noisy)
        # A trained projection has a bias, so a flat patch's projection is not near zero for the next LayerNorm.
        with torch.no_grad():
            model.model.vision_model.embeddings.patch_projection.bias.normal_()
        clean = image_features(model, black)
        feature_changes[eps] = ((image_features(model, noisy) - clean).norm() / clean.norm()).item()
    # One grey level of noise is scaled up to unit size by the default epsilon; an epsilon of 0.1 (the variance of a
    # patch with content) scales it by 1 / sqrt(0.1).
    assert changes[None] > 0.5, changes
    assert changes[0.1] < 0.02, changes
    assert feature_changes[None] > 0.1, feature_changes
    assert feature_changes[0.1] < 0.01, feature_changes


def test_a_larger_epsilon_leaves_patches_with_content_nearly_as_they_were():
    pixel_values = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # patch variance ~1/12
    torch.manual_seed(0)
    default = tiny_model()
    torch.manual_seed(0)
    larger = tiny_model(vision={"patch_norm_eps": 1e-3})
    reference = image_features(default, pixel_values)
    relative = ((image_features(larger, pixel_values) - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.02, relative


def test_round_trips_through_config_json(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(vision={"patch_norm_eps": 0.05})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision_config"]["patch_norm_eps"] == 0.05
    reloaded = PalmEForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.vision_config.patch_norm_eps == 0.05
    assert reloaded.model.vision_model.embeddings.patch_norm.eps == 0.05
    _, noisy = flat_images_with_noise(5 / 255)
    torch.testing.assert_close(image_features(reloaded, noisy), image_features(model, noisy))


def test_a_config_saved_without_it_takes_layer_norm_eps(tmp_path):
    model = tiny_model(vision={"layer_norm_eps": 1e-6})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["vision_config"]["patch_norm_eps"]  # as configs written before the option existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = PalmEForConditionalGeneration.from_pretrained(tmp_path)
    assert reloaded.config.vision_config.patch_norm_eps == 1e-6
    assert reloaded.model.vision_model.embeddings.patch_norm.eps == 1e-6


@pytest.mark.parametrize("value", [0, -0.1, "0.1", True, float("nan")])
def test_refuses_what_is_not_a_positive_number(value):
    with pytest.raises(ValueError, match=r"PalmEVisionConfig: `patch_norm_eps` must be a positive number"):
        PalmEVisionConfig(patch_norm_eps=value)
    with pytest.raises(ValueError, match="patch_norm_eps"):
        PalmEConfig(vision_config={"patch_norm_eps": value})
