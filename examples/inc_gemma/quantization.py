"""Quantize a Keras-Hub Gemma 3 to FP8 in one process and compare its text before and after.

Mirrors Intel Neural Compressor's examples/jax/keras/gemma/quantization.py call for call; what
changed: `neural_compressor.jax` is `fp8xla.keras`, and the model defaults to fp8xla's default
model (Gemma 3 270M base, converted once into a cached Keras-Hub preset).

    python examples/inc_gemma/quantization.py [-m PRESET] [-p fp8_e4m3|fp8_e5m2]
"""
import os

os.environ["KERAS_BACKEND"] = "jax"

import cli_args  # noqa: E402  (this folder's options: -m, -q, -p)
from keras_hub.models import Gemma3CausalLM  # noqa: E402

from fp8xla.keras import StaticQuantConfig, quantize_model  # noqa: E402
from fp8xla.keras.utils.utility import print_model  # noqa: E402

args = cli_args.parse(__doc__, model=True, precision=True)

print("Loading the float model", args.model_path)
gemma_lm = Gemma3CausalLM.from_preset(args.model_path)
print_model(gemma_lm)
print("Before quantization:\n", gemma_lm.generate({"prompts": "Describe the city of Berlin?"},
                                                    max_length=100))


def calib_function(model):
    model.generate({"prompts": "Describe the city of Moscow"}, max_length=100)


config = StaticQuantConfig(weight_dtype=args.precision, activation_dtype=args.precision)
gemma_lm = quantize_model(gemma_lm, config, calib_function)
print_model(gemma_lm)
print("After quantization:\n", gemma_lm.generate({"prompts": "Describe the city of Berlin?"},
                                                   max_length=100))
