"""Load an FP8 preset saved by prepare_static.py with Keras-Hub's own from_preset and generate.

Mirrors Intel Neural Compressor's examples/jax/keras/gemma/use_static.py call for call; what
changed: `neural_compressor.jax` is `fp8xla.keras` (importing it registers the FP8 model class
that the preset names).

    python examples/inc_gemma/use_static.py [-q PRESET]
"""
import os

os.environ["KERAS_BACKEND"] = "jax"

import cli_args  # noqa: E402  (this folder's options: -m, -q, -p)
from keras_hub.models import Gemma3CausalLM  # noqa: E402

import fp8xla.keras  # noqa: E402, F401  (FP8 presets load once it is imported)

args = cli_args.parse(__doc__, quantized=True)

print("Loading the FP8 preset", args.quantized_path)
gemma_lm = Gemma3CausalLM.from_preset(args.quantized_path)
gemma_lm.summary()
print("Output:\n", gemma_lm.generate({"prompts": "Describe the city of Berlin?"}, max_length=100))
