"""On-device, jitted data augmentation: per-example random crop (zero padding) + horizontal flip."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def random_crop_flip(
    rng: jax.Array, images: jax.Array, padding: int = 4, flip: bool = True
) -> jax.Array:
    """RandomCrop(H, padding) + RandomHorizontalFlip, independently per example.

    Args:
      rng: a key.
      images: [B, H, W, C], uint8 or float.
      padding: zero padding on each side before the crop (0 disables cropping).
      flip: flip each example left-right with probability 1/2.

    Returns:
      float32 images in [0, 1] (if uint8 came in), [B, H, W, C].
    """
    if images.dtype == jnp.uint8:
        images = to_float(images)
    batch, height, width, _ = images.shape
    crop_rng, flip_rng = jax.random.split(rng)
    if padding:
        padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        offsets = jax.random.randint(crop_rng, (batch, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(
                image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
            )

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        images = random_flip(flip_rng, images)
    return images


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Flips each image of [B, H, W, C] left-right with probability 1/2."""
    do_flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    return jnp.where(do_flip[:, None, None, None], images[:, :, ::-1, :], images)
