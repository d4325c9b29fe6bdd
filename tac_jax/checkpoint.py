"""Model checkpoints (kept for existing imports): see `tac_jax.models.checkpoint` for UNet
checkpoints and `tac_jax.files` for the model-agnostic file handling."""

from tac_jax.files import (META_JSON as MODEL_JSON, PARAMS_DIR, load_meta,  # noqa: F401
                           restore_params, write_json_atomic)
from tac_jax.models.checkpoint import default_model_dir, load_model, save_model  # noqa: F401
