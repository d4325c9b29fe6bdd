from tac_jax.data.datasets import digit_labels, digits, load, shapes
