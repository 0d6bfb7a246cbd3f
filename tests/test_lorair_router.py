"""LoRA-IR's DG-Router (dod_jax.methods.lorair.router): its five views against transformers'
CLIPImageProcessor on the same PIL resizes, and its degradation embedding and logits against
transformers' CLIP tower with a PyTorch statement of the head (LORA_IR.md), same random weights
under the authors' names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dod_jax.data.demo import demo_photos
from dod_jax.methods.lorair.router import VIEWS, DGRouter, read_router, router_views
from dod_jax.models.clip import CLIPVisionConfig, CLIPVisionWithProjection
from dod_jax.models.layers import NumpyRngs
from dod_jax.weights.diffusers import WeightsMismatchError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8, projection_dim=16)
EMBED, CLASSES = 24, 3


def reference_router(seed: int = 0, tower_sizes: dict = TOWER, embed: int = EMBED, classes: int = CLASSES):
    """transformers' tower and a torch head (de_extractor: Linear, GELU, Linear, GELU; cls_head),
    random non-trivial weights, and their tensors under the authors' names."""
    torch.manual_seed(seed)
    tower = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**tower_sizes)).eval()
    width = tower_sizes["projection_dim"]
    head = torch.nn.ModuleDict({
        "de_extractor": torch.nn.Sequential(torch.nn.Linear(2 * width, width), torch.nn.GELU(),
                                            torch.nn.Linear(width, embed), torch.nn.GELU()),
        "cls_head": torch.nn.Linear(embed, classes)})
    with torch.no_grad():
        for p in list(tower.parameters()) + list(head.parameters()):
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    tensors = {f"clip_model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    tensors.update(head.state_dict())
    return tower, head, {k: v.detach().numpy() for k, v in tensors.items()}


def processor_views(image: np.ndarray, size: int) -> np.ndarray:
    """The authors' preprocessing: PIL resizes (default filter), then CLIPImageProcessor."""
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    picture = Image.fromarray(image)
    large = picture.resize((2 * size, 2 * size))
    crops = [picture.resize((size, size))] + [large.crop((x, y, x + size, y + size)) for y in (0, size)
                                               for x in (0, size)]
    return processor(images=crops, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def test_the_views_are_clips_preprocessing_of_the_authors_resizes():
    image = demo_photos()["chelsea"][:150, :210]
    np.testing.assert_allclose(router_views(image, 32), processor_views(image, 32), atol=1e-5)


def test_the_router_equals_the_reference_on_the_same_weights():
    tower, head, tensors = reference_router()
    ours = DGRouter(CLIPVisionWithProjection(CLIPVisionConfig.from_transformers(TOWER), rngs=NumpyRngs(0)),
                    classes=CLASSES, embed_dim=EMBED, rngs=NumpyRngs(1))
    read_router(ours, tensors, "the reference router")
    photos = demo_photos()
    images = [photos["chelsea"][:150, :210], photos["coffee"][:90, :120]]
    views = np.stack([router_views(image, 32) for image in images])
    with torch.no_grad():
        embeds = tower(pixel_values=torch.from_numpy(views.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2))).image_embeds
        embeds = embeds.reshape(2, VIEWS, -1)
        expected_e = head["de_extractor"](torch.cat([embeds[:, 0], embeds[:, 1:].mean(1)], dim=-1))
        expected_logits = head["cls_head"](expected_e)
    e_clip, logits = jax.jit(ours)(jnp.asarray(views))
    assert e_clip.shape == (2, EMBED) and logits.shape == (2, CLASSES)
    np.testing.assert_allclose(np.asarray(e_clip), expected_e.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), expected_logits.numpy(), atol=1e-5)
    assert np.abs(expected_logits.numpy()).max() > 0.05


def test_a_router_file_that_does_not_fit_is_named():
    _, _, tensors = reference_router()
    del tensors["cls_head.bias"]
    ours = DGRouter(CLIPVisionWithProjection(CLIPVisionConfig.from_transformers(TOWER), rngs=NumpyRngs(0)),
                    classes=CLASSES, embed_dim=EMBED, rngs=NumpyRngs(1))
    with pytest.raises(WeightsMismatchError, match="cls_head.bias"):
        read_router(ours, tensors, "a router file")
