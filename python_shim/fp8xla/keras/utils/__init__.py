"""Intel Neural Compressor's ``neural_compressor.jax.utils`` layout, so that INC's examples run
with ``neural_compressor.jax`` replaced by ``fp8xla.keras``."""
