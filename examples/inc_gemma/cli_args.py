"""The command-line options of the three example scripts (INC's names: -m, -q, -p)."""
import argparse


def parse(doc, model=False, quantized=False, precision=False):
    """Parses the options the calling script takes; the model defaults to fp8xla's default
    model (Gemma 3 270M base), converted once into a cached Keras-Hub preset."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if precision:
        parser.add_argument("-p", "--precision", default="fp8_e4m3",
                            choices=["fp8_e4m3", "fp8_e5m2"],
                            help="FP8 format of weights and activations")
    if model:
        parser.add_argument("-m", "--model_path", default=None,
                            help="Keras-Hub preset (directory or name); default: fp8xla's "
                                 "default model")
    if quantized:
        parser.add_argument("-q", "--quantized_path", default="gemma3_270m_fp8",
                            help="directory of the FP8 preset")
    args = parser.parse_args()
    if model and args.model_path is None:
        from fp8xla import models
        args.model_path = str(models.gemma3_270m_preset())
    return args
