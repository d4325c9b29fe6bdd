from tac_jax.data.datasets import digits, load, shapes
