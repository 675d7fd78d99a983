"""Saving an fp8xla-quantized Keras-Hub Gemma3CausalLM as a preset and loading it back (also
in a fresh process, through Keras-Hub's own ``from_preset``)."""
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

import fp8xla.keras as fk  # noqa: E402
from fp8xla import saving  # noqa: E402
from test_keras_tiny import prompts, tiny_gemma3  # noqa: E402

GEN = dict(max_length=12, stop_token_ids=None)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized tiny model (per-channel weights, static activation scales), its tokens on
    a fixed batch, and its preset."""
    model = tiny_gemma3()
    rng = np.random.default_rng(7)
    batch = prompts(rng, 6)
    fk.quantize_model(model, fk.StaticQuantConfig(),
                      lambda m: m.generate(prompts(rng, 4), **GEN))
    tokens = np.asarray(model.generate(batch, **GEN)["token_ids"])
    path = tmp_path_factory.mktemp("presets") / "gemma3_fp8"
    model.save_to_preset(str(path))
    return model, batch, tokens, str(path)


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_preset_layout_and_one_byte_per_weight(saved):
    model, _, _, path = saved
    assert sorted(os.listdir(path)) == sorted(
        ["config.json", "metadata.json", "task.json", saving.INDEX_FILE, saving.WEIGHTS_FILE])
    with open(os.path.join(path, "task.json")) as f:
        assert json.load(f)["registered_name"] == "fp8xla>Fp8Gemma3CausalLM"
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["registered_name"] == "keras_hub>Gemma3Backbone"
    with saving.WeightsReader(os.path.join(path, saving.WEIGHTS_FILE)) as r:
        h = r.header
    assert h["format_version"] == saving.FORMAT_VERSION
    assert h["config"]["weight_dtype"] == "fp8_e4m3"
    n_quant = sum(int(np.prod(v.shape)) for i, v in enumerate(model.trainable_variables)
                  if i in model.fp8.weights)
    assert sum(q["codes"]["nbytes"] for q in h["quantized"]) == n_quant  # one byte per weight
    assert all(q["codes"]["dtype"] == "|u1" for q in h["quantized"])
    assert all(q["a_scale"] is not None for q in h["quantized"])
    n_float = sum(int(np.prod(v.shape)) for i, v in enumerate(model.trainable_variables)
                  if i not in model.fp8.weights)
    n_float += sum(int(np.prod(v.shape)) for v in model.non_trainable_variables)
    size = os.path.getsize(os.path.join(path, saving.WEIGHTS_FILE))
    scales = sum(q["w_scale"]["nbytes"] for q in h["quantized"] if isinstance(q["w_scale"], dict))
    overhead = size - n_quant - 4 * n_float - scales
    assert 0 < overhead < 64 * 1024, overhead  # header and alignment only


_FRESH = textwrap.dedent("""
    import sys
    import numpy as np
    import keras_hub
    import fp8xla.keras
    path, batch_file, out_file = sys.argv[1:]
    batch = dict(np.load(batch_file))
    out = {}
    for how in ("from_preset", "load"):
        if how == "from_preset":
            model = keras_hub.models.Gemma3CausalLM.from_preset(path)
        else:
            model = fp8xla.keras.load(path)
        assert type(model).__name__ == "Fp8Gemma3CausalLM" and model.fp8 is not None
        model.compile(sampler=keras_hub.samplers.GreedySampler())
        out[how] = np.asarray(model.generate(batch, max_length=12, stop_token_ids=None)
                              ["token_ids"])
    np.savez(out_file, **out)
""")


def test_fresh_process_load_generates_identical_tokens(saved, tmp_path):
    _, batch, tokens, path = saved
    np.savez(tmp_path / "batch.npz", **batch)
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    subprocess.run([sys.executable, str(script), path, str(tmp_path / "batch.npz"),
                    str(tmp_path / "out.npz")], check=True, env=dict(os.environ))
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(out["from_preset"], tokens)
    np.testing.assert_array_equal(out["load"], tokens)


def test_loaded_model_has_no_float_copies_of_quantized_weights(saved):
    model, batch, tokens, path = saved
    loaded = fk.load(path)
    assert isinstance(loaded, keras_hub.models.Gemma3CausalLM)
    assert set(loaded.fp8.weights) == set(model.fp8.weights)
    for i, v in enumerate(loaded.trainable_variables):
        if i in loaded.fp8.weights:
            assert v._value is None, v.path  # never materialized
            q, q0 = loaded.fp8.weights[i], model.fp8.weights[i]
            np.testing.assert_array_equal(q.codes.view(np.uint8), q0.codes.view(np.uint8))
            np.testing.assert_array_equal(q.w_scale, q0.w_scale)
            assert (q.channel_dim, q.a_scale) == (q0.channel_dim, q0.a_scale)
        else:
            np.testing.assert_array_equal(np.asarray(v.value),
                                          np.asarray(model.trainable_variables[i].value))
    with pytest.raises(RuntimeError, match="holds FP8 codes"):
        loaded.trainable_variables[next(iter(loaded.fp8.weights))].value
    want = np.asarray(fk.logits(model, batch))
    np.testing.assert_array_equal(np.asarray(fk.logits(loaded, batch)), want)
    # Keras' ways to score text run the FP8 graph too (Keras' own would read float values)
    np.testing.assert_array_equal(loaded.predict_on_batch(batch), want)
    np.testing.assert_array_equal(loaded.predict(batch, batch_size=4), want)
    loaded.compile(sampler=keras_hub.samplers.GreedySampler())  # stays FP8
    np.testing.assert_array_equal(np.asarray(loaded.generate(batch, **GEN)["token_ids"]),
                                  tokens)
    # nothing on the way materialized a float copy of a quantized weight
    assert all(loaded.trainable_variables[i]._value is None for i in loaded.fp8.weights)


def test_generic_causal_lm_from_preset_returns_the_fp8_model(saved):
    _, batch, _, path = saved
    loaded = keras_hub.models.CausalLM.from_preset(path)
    assert type(loaded).__name__ == "Fp8Gemma3CausalLM" and loaded.fp8 is not None
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # a plain directory, not 0700


def test_resave_of_loaded_model_is_identical(saved, tmp_path):
    _, _, _, path = saved
    loaded = fk.load(path)
    loaded.save_to_preset(str(tmp_path / "again"))
    a = open(os.path.join(path, saving.WEIGHTS_FILE), "rb").read()
    b = open(tmp_path / "again" / saving.WEIGHTS_FILE, "rb").read()
    assert a == b


def test_float_presets_still_load_as_stock_models(tmp_path):
    model = tiny_gemma3()
    model.save_to_preset(str(tmp_path / "float"))
    for cls in (keras_hub.models.CausalLM, keras_hub.models.Gemma3CausalLM):
        loaded = cls.from_preset(str(tmp_path / "float"))
        assert type(loaded) is keras_hub.models.Gemma3CausalLM
        assert getattr(loaded, "fp8", None) is None


# --- errors -----------------------------------------------------------------------------------


def test_missing_preset_and_missing_files(saved, tmp_path):
    _, _, _, path = saved
    with pytest.raises(saving.PresetError, match="preset directory .*nowhere does not exist"):
        fk.load(str(tmp_path / "nowhere"))
    broken = _copy(path, tmp_path / "p")
    os.remove(os.path.join(broken, saving.WEIGHTS_FILE))
    with pytest.raises(saving.PresetError,
                       match=r"model\.weights\.fp8xla is missing \(the fp8xla weights file\)"):
        fk.load(broken)
    with pytest.raises(FileNotFoundError, match="model.weights.fp8xla"):
        keras_hub.models.Gemma3CausalLM.from_preset(broken)


def _weights(path):
    return os.path.join(path, saving.WEIGHTS_FILE)


def test_truncated_weights_file(saved, tmp_path):
    _, _, _, path = saved
    for cut in (10, 200, -1000):
        broken = _copy(path, tmp_path / f"p{cut}")
        data = open(_weights(broken), "rb").read()
        open(_weights(broken), "wb").write(data[:cut])
        with pytest.raises(saving.PresetError, match=r"model\.weights\.fp8xla is truncated"):
            fk.load(broken)
        # the same through Keras-Hub's loader
        with pytest.raises(saving.PresetError, match="truncated"):
            keras_hub.models.Gemma3CausalLM.from_preset(broken)


def test_corrupt_weights_file(saved, tmp_path):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "data")
    data = bytearray(open(_weights(broken), "rb").read())
    data[-100] ^= 0x40  # in the last array
    open(_weights(broken), "wb").write(bytes(data))
    with pytest.raises(saving.PresetError, match=r"model\.weights\.fp8xla is corrupt: checksum"):
        fk.load(broken)
    broken = _copy(path, tmp_path / "head")
    data = bytearray(open(_weights(broken), "rb").read())
    data[saving._PREAMBLE.size + 5] ^= 0x01  # in the JSON header
    open(_weights(broken), "wb").write(bytes(data))
    with pytest.raises(saving.PresetError, match="corrupt \\(header checksum"):
        fk.load(broken)
    broken = _copy(path, tmp_path / "magic")
    data = bytearray(open(_weights(broken), "rb").read())
    data[:8] = b"PK\x03\x04xxxx"
    open(_weights(broken), "wb").write(bytes(data))
    with pytest.raises(saving.PresetError, match="is not an fp8xla weights file"):
        fk.load(broken)
    broken = _copy(path, tmp_path / "extra")
    with open(_weights(broken), "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(saving.PresetError, match="corrupt: .* bytes, the header describes"):
        fk.load(broken)


def test_other_format_version(saved, tmp_path):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "v2")
    data = bytearray(open(_weights(broken), "rb").read())
    data[8:12] = struct.pack("<I", saving.FORMAT_VERSION + 1)
    open(_weights(broken), "wb").write(bytes(data))
    with pytest.raises(saving.PresetError,
                       match=rf"model\.weights\.fp8xla has format version "
                             rf"{saving.FORMAT_VERSION + 1}; this fp8xla reads version "
                             rf"{saving.FORMAT_VERSION}"):
        fk.load(broken)


def test_failed_save_leaves_no_partial_preset(saved, tmp_path, monkeypatch):
    model, _, _, path = saved

    def fail(p, m):
        open(p, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(saving, "write_weights_file", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_to_preset(str(tmp_path / "new"))
    assert os.listdir(tmp_path) == []  # neither the preset nor a temporary directory
    # a failed save over an existing preset leaves the old one intact
    old = _copy(path, tmp_path / "old")
    before = {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)}
    with pytest.raises(OSError, match="disk full"):
        fk.save(model, old)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert {n: open(os.path.join(old, n), "rb").read() for n in os.listdir(old)} == before


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="not quantized by fp8xla"):
        fk.save(tiny_gemma3(), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    saved_model = tiny_gemma3()
    fk.quantize_model(saved_model, fk.StaticQuantConfig(activation_dtype=None))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        fk.save(saved_model, str(tmp_path / "file"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"not part of a Keras-Hub preset \(notes.txt\)"):
        fk.save(saved_model, str(tmp_path / "home"))
    assert sorted(os.listdir(tmp_path)) == ["file", "home"]
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep"


# --- every preset file is checked ---------------------------------------------------------


def _edit_json(preset, name, edit):
    path = os.path.join(preset, name)
    with open(path) as f:
        value = json.load(f)
    value = edit(value)
    with open(path, "w") as f:
        json.dump(value, f)


@pytest.mark.parametrize("name", ["config.json", "task.json", saving.INDEX_FILE])
def test_preset_json_file_that_is_not_json(saved, tmp_path, name):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "p")
    with open(os.path.join(broken, name), "a") as f:
        f.write("}{")  # what a botched edit or a truncated write leaves
    with pytest.raises(saving.PresetError,
                       match=rf"fp8xla.load: {re.escape(name)} of the preset "
                             rf"{re.escape(broken)} is not valid JSON \(Extra data: line"):
        fk.load(broken)
    open(os.path.join(broken, name), "w").write("[1, 2]")
    with pytest.raises(saving.PresetError, match=rf"{re.escape(name)} of the preset .* holds "
                                                 "a JSON list; expected an object"):
        fk.load(broken)


def test_index_of_another_format_version(saved, tmp_path):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "v999")

    def version_999(index):
        index["metadata"]["format_version"] = 999
        return index

    _edit_json(broken, saving.INDEX_FILE, version_999)
    message = (rf"{re.escape(os.path.join(broken, saving.INDEX_FILE))}: "
               rf"metadata.format_version is 999; expected {saving.FORMAT_VERSION} \(the "
               "version this fp8xla reads\\)")
    with pytest.raises(saving.PresetError, match=message):
        fk.load(broken)
    # Keras-Hub's own loader reaches fp8xla's weight loading, which checks the index too
    with pytest.raises(saving.PresetError, match=message):
        keras_hub.models.Gemma3CausalLM.from_preset(broken)


@pytest.mark.parametrize("edit, message", [
    (lambda i: {**i, "metadata": {**i["metadata"], "format_version": "1"}},
     r"metadata.format_version is '1'; expected 1"),
    (lambda i: {**i, "metadata": {**i["metadata"], "format_version": True}},
     r"metadata.format_version is True; expected 1"),
    (lambda i: {**i, "metadata": {"format": "h5"}}, r"metadata.format is 'h5'; expected "
                                                   r"'fp8xla weights' \(an fp8xla preset\)"),
    (lambda i: {"weight_map": i["weight_map"]}, r"metadata is None; expected dict"),
    (lambda i: {**i, "weight_map": {"*": "model.weights.h5"}},
     r"weight_map is \{'\*': 'model.weights.h5'\}; expected \{'\*': 'model.weights.fp8xla'\}"),
])
def test_index_with_wrong_fields(saved, tmp_path, edit, message):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "p")
    _edit_json(broken, saving.INDEX_FILE, edit)
    with pytest.raises(saving.PresetError, match=rf"model\.weights\.json: {message}"):
        fk.load(broken)


def test_task_and_config_with_wrong_fields(saved, tmp_path):
    _, _, _, path = saved
    broken = _copy(path, tmp_path / "task")
    _edit_json(broken, "task.json", lambda t: {**t, "registered_name": "keras_hub>Gemma3CausalLM"})
    with pytest.raises(saving.PresetError, match=r"task\.json names 'keras_hub>Gemma3CausalLM', "
                                                 r"not an fp8xla FP8 model"):
        fk.load(broken)
    broken = _copy(path, tmp_path / "config")
    _edit_json(broken, "config.json", lambda c: {**c, "config": "gemma"})
    with pytest.raises(saving.PresetError, match=r"config\.json: config is 'gemma'; expected "
                                                 "dict"):
        fk.load(broken)


def _rewrite_header(preset, edit):
    """Rewrites the JSON header of the preset's weights file (valid checksum and lengths)."""
    path = _weights(preset)
    data = open(path, "rb").read()
    magic, version, reserved, head_len, _ = saving._PREAMBLE.unpack_from(data)
    start = saving._PREAMBLE.size + head_len
    body = data[start + saving._pad(start):]
    head = json.dumps(edit(json.loads(data[saving._PREAMBLE.size:start]))).encode()
    pre = saving._PREAMBLE.pack(magic, version, reserved, len(head), saving.zlib.crc32(head))
    pad = b"\0" * saving._pad(len(pre) + len(head))
    open(path, "wb").write(pre + head + pad + body)


def test_weights_header_with_wrong_fields(saved, tmp_path):
    _, _, _, path = saved
    unchanged = _copy(path, tmp_path / "same")
    _rewrite_header(unchanged, lambda h: h)  # the helper itself keeps a valid file
    assert fk.load(unchanged).fp8 is not None
    for name, edit, message in [
        ("version", lambda h: {**h, "format_version": 2},
         r"the header's format_version is 2; expected 1 \(this fp8xla's version\)"),
        ("entry", lambda h: {**h, "variables": [{**h["variables"][0], "index": 10**6}]},
         r"variables\[0\]\.index is 1000000; expected < \d+"),
        ("dtype", lambda h: {**h, "quantized": [{**h["quantized"][0], "fp8_dtype": "int8"}]},
         r"quantized\[0\]\.fp8_dtype is 'int8'; expected one of"),
        ("config", lambda h: {**h, "config": {**h["config"], "weight_dtype": "int4"}},
         r"the header's config is not a valid StaticQuantConfig \(StaticQuantConfig: unknown "
         r"weight_dtype 'int4'"),
    ]:
        broken = _copy(path, tmp_path / name)
        _rewrite_header(broken, edit)
        with pytest.raises(saving.PresetError,
                           match=rf"{re.escape(_weights(broken))}: {message}"):
            fk.load(broken)


def test_loaded_model_summary_reports_what_it_holds(saved):
    from test_keras_tiny import fp8_model_holds, summary_totals
    model, _, _, path = saved
    loaded = fk.load(path)
    want_count, want_bytes = fp8_model_holds(model)  # the model it was saved from
    count, (low, high) = summary_totals(loaded)
    assert count == want_count and low <= want_bytes <= high
