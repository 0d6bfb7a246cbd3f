"""LoRA-IR's degradation-guided router (DG-Router; ../shared/LORA_IR.md, sections 1 and 2):
CLIP image embeddings of a global view and of a 2x2 grid of tiles, an MLP to the degradation
embedding e_clip that the IR network's DAM heads read, and a linear head whose logits route the
experts.

    views: the image resized (PIL's default filter, as the authors' code) to S x S, and to
           2S x 2S cut into four S x S tiles (S = the tower's image_size: 336 for ViT-L/14-336),
           each scaled to [0, 1] and normalised with CLIP's mean and std
    e_clip = GELU(Linear(GELU(Linear([emb(global); mean(emb(tiles))]))))     (B, embed_dim)
    logits = cls_head(e_clip)                                                 (B, classes)

Attribute names follow the authors' router (`clip_model.vision_tower.vision_model.*`,
`de_extractor.0`, `cls_head`), so their `setting1_router.pth` reads by name
(`read_router`).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from PIL import Image

from dod_jax.models.clip import CLIPVisionWithProjection
from dod_jax.models.layers import Activation, Linear, gelu
from dod_jax.weights.diffusers import TensorSource, fill_parameters, from_torch_layout, param_table

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
VIEWS = 5  # the global view and the four tiles


def router_views(image: np.ndarray, size: int) -> np.ndarray:
    """(VIEWS, size, size, 3) normalised views of one uint8 RGB image (H, W, 3)."""
    picture = Image.fromarray(image)
    whole = np.asarray(picture.resize((size, size)))
    large = np.asarray(picture.resize((2 * size, 2 * size)))
    tiles = [large[y:y + size, x:x + size] for y in (0, size) for x in (0, size)]
    views = np.stack([whole] + tiles).astype(np.float32) / 255.0
    return (views - CLIP_MEAN) / CLIP_STD


class VisionTower(nnx.Module):
    """The authors' `clip_model` wrapper level, kept for the names."""

    def __init__(self, tower: CLIPVisionWithProjection):
        self.vision_tower = tower


class DGRouter(nnx.Module):
    """`__call__(views)` with views (B, VIEWS, S, S, 3) -> (e_clip (B, embed_dim), logits (B, classes))."""

    def __init__(self, tower: CLIPVisionWithProjection, *, classes: int = 3, embed_dim: int = 384, rngs):
        width = tower.config.projection_dim
        kw = dict(dtype=tower.dtype, rngs=rngs)
        self.clip_model = VisionTower(tower)
        self.de_extractor = nnx.List([Linear(2 * width, width, **kw), Activation(gelu),
                                      Linear(width, embed_dim, **kw), Activation(gelu)])
        self.cls_head = Linear(embed_dim, classes, **kw)

    def __call__(self, views):
        b = views.shape[0]
        embeddings = self.clip_model.vision_tower(views.reshape((-1,) + views.shape[2:]))
        embeddings = jax.lax.stop_gradient(embeddings.reshape(b, VIEWS, -1))  # CLIP is frozen
        x = jax.numpy.concatenate([embeddings[:, 0], embeddings[:, 1:].mean(axis=1)], axis=-1)
        for layer in self.de_extractor:
            x = layer(x)
        return x, self.cls_head(x)


def read_router(router: DGRouter, tensors: dict[str, np.ndarray], source: str) -> None:
    """Put the authors' router state dict (`params` of setting1_router.pth, as NumPy arrays; its
    CLIP in bfloat16) into `router`, every tensor by name and shape (WeightsMismatchError)."""
    table = param_table(router)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    fill_parameters(router, table, [e.name for e in table],
                    TensorSource(source, {k: v.shape for k, v in arrays.items()}, arrays.__getitem__),
                    lambda e, t: from_torch_layout(e.layout, t), lambda e: e.torch_shape)
