"""Load an FP8 preset saved by prepare_static.py with Keras-Hub's own from_preset and generate.

Mirrors Intel Neural Compressor's examples/jax/keras/gemma/use_static.py call for call; what
changed: `neural_compressor.jax` is `fp8xla.keras` (importing it registers the FP8 model class
that the preset names).

    python examples/inc_gemma/use_static.py [-q PRESET]
"""
import argparse
import os

os.environ["KERAS_BACKEND"] = "jax"

from keras_hub.models import Gemma3CausalLM  # noqa: E402

import fp8xla.keras  # noqa: E402, F401  (FP8 presets load once it is imported)

args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
args.add_argument("-q", "--quantized_path", default="gemma3_270m_fp8",
                  help="the FP8 preset saved by prepare_static.py")
args = args.parse_args()

print("Loading the FP8 preset", args.quantized_path)
gemma_lm = Gemma3CausalLM.from_preset(args.quantized_path)
gemma_lm.summary()
print("Output:\n", gemma_lm.generate({"prompts": "Describe the city of Berlin?"}, max_length=100))
