import chex
import jax
import jax.numpy as jnp
import numpy as np

from salun_jax.data.augment import random_crop_flip, to_float


class AugmentTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_crop_is_a_shifted_window_of_the_padded_image(self):
        images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
        fn = self.variant(lambda r, x: random_crop_flip(r, x, padding=2, flip=False))
        out = fn(jax.random.key(0), images)
        chex.assert_shape(out, images.shape)
        padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
        for b in range(2):
            matches = [
                (i, j)
                for i in range(5)
                for j in range(5)
                if np.array_equal(padded[b, i : i + 6, j : j + 6], np.asarray(out[b]))
            ]
            assert matches, "output is not a crop of the padded image"

    @chex.variants(with_jit=True, without_jit=True)
    def test_flip_only(self):
        images = jax.random.uniform(jax.random.key(1), (64, 4, 4, 3))
        out = self.variant(lambda r, x: random_crop_flip(r, x, padding=0, flip=True))(
            jax.random.key(2), images
        )
        flipped = np.all(np.isclose(out, images[:, :, ::-1]), axis=(1, 2, 3))
        same = np.all(np.isclose(out, images), axis=(1, 2, 3))
        assert np.all(flipped | same)
        assert 10 < flipped.sum() < 54  # about half, per example

    def test_uint8_input_and_determinism(self):
        images = jnp.full((3, 4, 4, 1), 255, jnp.uint8)
        a = random_crop_flip(jax.random.key(3), images)
        b = random_crop_flip(jax.random.key(3), images)
        chex.assert_trees_all_equal(a, b)
        assert a.dtype == jnp.float32 and float(a.max()) == 1.0
        np.testing.assert_allclose(to_float(jnp.array([0, 51, 255], jnp.uint8)), [0, 0.2, 1])
