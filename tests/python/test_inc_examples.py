"""Intel Neural Compressor's Gemma flow (examples/jax/keras/gemma/{quantization,
prepare_static,use_static}.py in intel/neural-compressor) run by our own scripts that make the
same calls (examples/inc_gemma/), on a tiny Gemma 3 converted from GGUF and saved as a float
Keras-Hub preset, as the default model's cached preset is: load with from_preset, the dict
form of generate, print_model, quantize, summary, save, and a fresh process that loads the FP8
preset with Keras-Hub's from_preset and generates."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
pytest.importorskip("keras_hub")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")

from fp8xla import models, saving  # noqa: E402
from test_models import write_tiny_gguf  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "inc_gemma"
PROMPT = "Describe the city of Berlin?"


@pytest.fixture(scope="module")
def float_preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("inc")
    write_tiny_gguf(root / "tiny.gguf")
    model = models.convert_gguf(models.read_gguf(root / "tiny.gguf"))
    model.save_to_preset(str(root / "float"))
    return root / "float"


def run(script, *args):
    """Runs an example script in its own process, as INC's flow does; returns its stdout."""
    r = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "KERAS_BACKEND": "jax"})
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def totals(text):
    """(count, bytes low, bytes high) of every "Total params" line of Keras' summary."""
    units = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
    return [(int(n.replace(",", "")), (float(x) - 0.005) * units[u], (float(x) + 0.005) * units[u])
            for n, x, u in re.findall(r"Total params: ([\d,]+) \(([\d.]+) (B|KB|MB|GB)\)", text)]


def held_by_fp8_preset(preset):
    """(count, bytes) of the arrays an FP8 preset holds, from its weights file: FP8 codes one
    byte each, scales float32, every other variable as saved."""
    with saving.WeightsReader(os.path.join(preset, saving.WEIGHTS_FILE)) as r:
        h = r.header
    count = nbytes = 0
    for e in h["variables"]:
        count += int(np.prod(e["shape"]))
        nbytes += e["nbytes"]
    for q in h["quantized"]:
        scales = (np.prod(q["w_scale"]["shape"]) if isinstance(q["w_scale"], dict) else 1)
        scales += q["a_scale"] is not None
        count += int(np.prod(q["codes"]["shape"])) + int(scales)
        nbytes += q["codes"]["nbytes"] + 4 * int(scales)
    return count, nbytes


def test_quantization_script(float_preset):
    out = run("quantization.py", "-m", str(float_preset))
    head, rest = out.split("Before quantization:")
    before, after = rest.split("After quantization:")
    assert before.strip().startswith(PROMPT) and after.strip().startswith(PROMPT), out[-2000:]
    # print_model of the float model first, then of the FP8 one (between the two texts)
    assert "float32" in head and "float8" not in head
    assert "float8_e4m3fn" in before


def test_prepare_static_then_use_static_in_a_fresh_process(float_preset, tmp_path):
    quantized = tmp_path / "quantized"
    out = run("prepare_static.py", "-m", str(float_preset), "-q", str(quantized),
              "-p", "fp8_e5m2")  # quantization.py runs the default, fp8_e4m3
    (float_count, low, high), (fp8_count, fp8_low, fp8_high) = totals(out)
    assert low <= 4 * float_count <= high  # the float32 model
    count, nbytes = held_by_fp8_preset(quantized)
    assert (fp8_count, True) == (count, fp8_low <= nbytes <= fp8_high), (out[-3000:], nbytes)
    assert fp8_high < 0.5 * low

    out = run("use_static.py", "-q", str(quantized))
    ((loaded_count, loaded_low, loaded_high),) = totals(out)
    assert loaded_count == count and loaded_low <= nbytes <= loaded_high
    assert out.split("Output:")[1].strip().startswith(PROMPT)
