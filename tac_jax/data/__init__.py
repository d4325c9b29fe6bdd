from tac_jax.data.datasets import DATASETS, LABELLED, digit_labels, digits, labels, load, shapes
