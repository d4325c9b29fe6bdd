"""The application on top of the library: the main job (`pipeline`), the evaluation sweep,
their shared stages and settings, reports, plots, the training loop and the launchers'
absl flags. The library (`tac_jax.quant`, `diffusion`, `models`, `compensation`,
`metrics`, `data`) never imports this package."""
