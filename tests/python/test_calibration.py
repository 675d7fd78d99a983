"""fp8xla.calibration on a tiny Gemma 3 with a tokenizer (converted from a GGUF): the texts the
model writes fill their windows, so GPTQ's Gram matrices get as many rows as asked for, and the
model's sampler is left as it was."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("keras_hub")
pytest.importorskip("gguf")

from fp8xla import calibration  # noqa: E402
from fp8xla.keras import _gram  # noqa: E402

PROMPTS = ["The capital of France is", "def f(x):", "Water boils at"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from test_models import write_tiny_gguf

    from fp8xla import models

    path = tmp_path_factory.mktemp("calibration") / "tiny.gguf"
    write_tiny_gguf(path)
    return models.convert_gguf(models.read_gguf(path))


def test_model_written_texts_are_long_and_leave_the_sampler(tiny_model):
    sampler, generate_function = tiny_model.sampler, tiny_model.generate_function
    texts = calibration.model_written_texts(tiny_model, PROMPTS, length=24, batch=2)
    assert tiny_model.sampler is sampler
    assert tiny_model.generate_function is generate_function
    assert len(texts) == len(PROMPTS)
    tokenizer = tiny_model.preprocessor.tokenizer
    for prompt, text in zip(PROMPTS, texts):
        assert text.startswith(prompt)
        # generated to the end (no stop token): longer than the window calibration uses
        assert len(np.asarray(tokenizer(text))) >= 21, text
    # the same seed writes the same texts
    assert calibration.model_written_texts(tiny_model, PROMPTS, length=24, batch=2) == texts


def test_corpus_calibration_fills_its_windows(tiny_model):
    calib = calibration.corpus_calibration(tiny_model, PROMPTS, length=24, window=20,
                                           batch=2, decode_length=8)
    index = next(i for i, v in enumerate(tiny_model.trainable_variables)
                 if v.path.endswith("ffw_linear/kernel"))
    sites = _gram.collect_grams(tiny_model, calib, [index])
    # every text fills a 20-token window (prefill only) and the prompts then decode up to 8:
    # at least 3 x 20 rows, at most that plus the decode batch's prefill and steps (2 x 8)
    assert len(PROMPTS) * 20 <= sites[index].rows <= len(PROMPTS) * 20 + 2 * 8 * 2


def test_corpus_calibration_refuses_a_window_the_texts_cannot_fill(tiny_model):
    for window in (0, 24, 30):
        with pytest.raises(ValueError, match="a text must fill its window"):
            calibration.corpus_calibration(tiny_model, PROMPTS, length=24, window=window)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        calibration.model_written_texts(tiny_model, PROMPTS, length=1)


def test_python_doc_passages_are_distinct_full_length_and_repeatable():
    passages = calibration.python_doc_passages(count=40, chars=1200)
    assert len(passages) == 40 and len(set(passages)) == 40
    assert all(len(p) == 1200 and "  " not in p for p in passages)
    assert calibration.python_doc_passages(count=40, chars=1200) == passages
    # the documentation of the first module opens the text
    import argparse
    import inspect

    assert passages[0].startswith(" ".join(inspect.getdoc(argparse).split())[:100])
    with pytest.raises(ValueError, match="fewer than 1000000"):
        calibration.python_doc_passages(count=10**6)


def test_text_calibration_on_python_docs_fills_its_windows(tiny_model):
    # what `fp8xla quantize --rounding gptq` calibrates on, with fewer and shorter windows
    texts = calibration.python_doc_passages(count=3, chars=400)
    calib = calibration.text_calibration(texts, window=16, batch=2, decode_length=6)
    index = next(i for i, v in enumerate(tiny_model.trainable_variables)
                 if v.path.endswith("attention/query/kernel"))
    rows = _gram.collect_grams(tiny_model, calib, [index])[index].rows
    assert 3 * 16 <= rows <= 3 * 16 + 2 * 6 * 2


class _Recorder:
    """Stands in for a model: records what calib_function asks generate for."""

    def __init__(self):
        self.calls = []

    def generate(self, inputs, max_length):
        self.calls.append((inputs, max_length))


def test_calibration_for_picks_by_config():
    from fp8xla.config import DynamicQuantConfig, StaticQuantConfig

    for config in (StaticQuantConfig(activation_dtype=None), DynamicQuantConfig()):
        assert calibration.calibration_for(config) is None  # nothing to calibrate
    model = _Recorder()
    calibration.calibration_for(StaticQuantConfig(), prompt_max_length=20)(model)
    assert model.calls == [(p, 20) for p in calibration.CALIBRATION_PROMPTS]
    for config in (StaticQuantConfig(rounding="gptq"),
                   DynamicQuantConfig(activation_dtype=None, rounding="gptq")):
        model = _Recorder()
        calibration.calibration_for(config, prompt_max_length=20, gptq_passages=6)(model)
        texts = [t for inputs, length in model.calls[:-1] for t in inputs]
        assert texts == calibration.python_doc_passages(count=6)
        assert {length for _, length in model.calls[:-1]} == {256}
        assert model.calls[-1] == (calibration.CALIBRATION_PROMPTS[:4], 20)  # decodes
