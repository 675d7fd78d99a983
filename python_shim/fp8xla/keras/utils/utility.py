"""``from fp8xla.keras.utils.utility import print_model``, as INC's examples import it from
``neural_compressor.jax.utils.utility``."""
from fp8xla.keras import print_model

__all__ = ["print_model"]
