"""Calibrate and quantize a Keras-Hub Gemma 3 to FP8 and save it as a preset (see
use_static.py to load it).

Mirrors Intel Neural Compressor's examples/jax/keras/gemma/prepare_static.py call for call; what
changed: `neural_compressor.jax` is `fp8xla.keras`, and the model defaults to fp8xla's default
model (Gemma 3 270M base, converted once into a cached Keras-Hub preset).

    python examples/inc_gemma/prepare_static.py [-m PRESET] [-q OUTPUT] [-p fp8_e4m3|fp8_e5m2]
"""
import os

os.environ["KERAS_BACKEND"] = "jax"

import cli_args  # noqa: E402  (this folder's options: -m, -q, -p)
from keras_hub.models import Gemma3CausalLM  # noqa: E402

from fp8xla.keras import StaticQuantConfig, quantize_model  # noqa: E402

args = cli_args.parse(__doc__, model=True, quantized=True, precision=True)

print("Loading the float model", args.model_path)
gemma_lm = Gemma3CausalLM.from_preset(args.model_path)
gemma_lm.summary()


def calib_function(model):
    model.generate({"prompts": "Describe the city of Moscow"}, max_length=100)
    model.generate({"prompts": "What is a monkey?"}, max_length=100)


config = StaticQuantConfig(weight_dtype=args.precision, activation_dtype=args.precision)
gemma_lm = quantize_model(gemma_lm, config, calib_function)
gemma_lm.summary()
print("Saving the FP8 preset to", args.quantized_path)
gemma_lm.save_to_preset(args.quantized_path)
