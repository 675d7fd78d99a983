"""fp8xla.keras on a tiny random-weight Keras-Hub Gemma3CausalLM: the FP8 generate step
gives the same tokens as stock generate() on fake-quantized weights."""
import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

from fp8xla import ops  # noqa: E402
from fp8xla.keras import (  # noqa: E402
    StaticQuantConfig, calibrate, float_generate_function, print_model, quantize_model)


def tiny_gemma3(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=256, image_size=16, num_layers=2, num_query_heads=2,
        num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16,
        use_post_ffw_norm=True, use_post_attention_norm=True,
        use_sliding_window_attention=True, sliding_window_size=8, vision_encoder=None)
    # Random weights are small: scale them up so logits differ clearly between tokens.
    for v in backbone.trainable_variables:
        if len(v.shape) >= 2:
            v.assign(v.value * 4)
    model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler=keras_hub.samplers.GreedySampler())
    return model


def prompts(rng, n, length=12, filled=5):
    token_ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), bool)
    token_ids[:, :filled] = rng.integers(3, 256, (n, filled))
    mask[:, :filled] = True
    return {"token_ids": token_ids, "padding_mask": mask}


def assign_dequantized_weights(ref, qmodel):
    """Sets each weight `qmodel` quantized to f32(codes) * scale in the float model `ref`."""
    for q in qmodel.fp8.weights.values():
        w = q.codes.astype(np.float32)
        if q.channel_dim is None:
            w = w * np.float32(q.w_scale)
        else:
            shape = [1] * w.ndim
            shape[q.channel_dim] = -1
            w = w * np.asarray(q.w_scale, np.float32).reshape(shape)
        ref.trainable_variables[q.index].assign(w)


def fake_quantized_copy(model, qmodel):
    """A stock model whose quantized weights hold f32(codes) * scale (the same scales)."""
    ref = tiny_gemma3()
    assign_dequantized_weights(ref, qmodel)
    # Stock generate() fails without a preprocessor (Keras-Hub 0.32 returns "images": None).
    ref.generate_function = float_generate_function(ref)
    return ref


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_weight_only_fp8_generate_equals_fake_quant(granularity, fmt, rng):
    model = tiny_gemma3()
    config = StaticQuantConfig(weight_dtype=fmt, activation_dtype=None, granularity=granularity)
    quantize_model(model, config)
    assert len(model.fp8.weights) >= 8
    ref = fake_quantized_copy(model, model)
    batch = prompts(rng, 24)
    got = model.generate(batch, max_length=12, stop_token_ids=None)
    want = ref.generate(batch, max_length=12, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(want["token_ids"]))
    # generation really happened past the prompt
    assert (np.asarray(got["padding_mask"]).sum(axis=1) > 5).all()


def test_calibration_and_activation_scales(rng):
    model = tiny_gemma3()
    batch = prompts(rng, 4)
    amax = calibrate(model, lambda m: m.generate(batch, max_length=12, stop_token_ids=None))
    assert amax and all(np.isfinite(a) and a > 0 for a in amax.values())
    config = StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3")
    quantize_model(model, config, lambda m: m.generate(batch, max_length=12, stop_token_ids=None))
    qs = [q.a_scale for q in model.fp8.weights.values() if q.a_scale is not None]
    assert len(qs) >= 8
    out = model.generate(prompts(rng, 3), max_length=12, stop_token_ids=None)
    assert np.asarray(out["token_ids"]).shape == (3, 12)


def test_print_model_lists_every_quantized_layer(rng, capsys):
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None))
    print_model(model)
    out = capsys.readouterr().out
    for q in model.fp8.weights.values():
        assert q.path in out
    from fp8xla.keras.utils.utility import print_model as inc_print_model  # INC's layout
    assert inc_print_model is print_model


def test_errors():
    with pytest.raises(ValueError, match="unknown weight_dtype 'fp8_e4m3fnuz'"):
        StaticQuantConfig(weight_dtype="fp8_e4m3fnuz")
    with pytest.raises(TypeError, match="expected a keras_hub.models.Gemma3CausalLM, got "
                                        "Sequential"):
        quantize_model(keras.Sequential([keras.layers.Dense(2)]), StaticQuantConfig(), lambda m: 0)
    frozen = tiny_gemma3()
    frozen.backbone.trainable = False
    with pytest.raises(ValueError, match="Gemma3CausalLM has no quantizable layers"):
        quantize_model(frozen, StaticQuantConfig(activation_dtype=None))
    assert not hasattr(frozen, "fp8")  # nothing installed half-way
    model = tiny_gemma3()
    with pytest.raises(RuntimeError, match="calib_function never ran the model's generate"):
        quantize_model(model, StaticQuantConfig(), lambda m: None)
    with pytest.raises(ValueError, match="needs a calib_function"):
        quantize_model(model, StaticQuantConfig())


@pytest.mark.parametrize("act", [None, "fp8_e4m3"])
def test_fp8_logits_equal_fake_quant_reference(act, rng):
    """Next-token logits of the FP8 graph vs a float32 fake-quant reference (QDQ activations
    with the same static scales, dequantized weights, float32 math)."""
    from fp8xla.keras import logits
    model = tiny_gemma3()
    batch = prompts(rng, 20)
    quantize_model(model, StaticQuantConfig(activation_dtype=act),
                   lambda m: m.generate(batch, max_length=12, stop_token_ids=None))
    ref = fake_quantized_copy(model, model)
    got = np.asarray(logits(model, batch))
    if act is None:
        want = np.asarray(logits(ref, batch))
    else:
        want = np.asarray(_fake_quant_activation_logits(model, ref, batch))
    err = np.abs(got - want) / np.abs(want).max()
    if act is None:
        assert err.max() <= 1e-4, err.max()
    else:
        # Activation QDQ is a step function: a last-bit difference of accumulation order
        # before it can move a value to the neighbouring FP8 code (a 6 % step for e4m3),
        # which then spreads to the later positions of that prompt. Most positions must
        # still agree to 1e-4; the rest stay close.
        rows = err.max(axis=-1)
        assert np.mean(rows <= 1e-4) >= 0.8, np.round(rows, 5)
        assert err.max() <= 5e-2, err.max()
    # and through Keras' own predict()
    pred = np.asarray(model.predict_on_batch(batch))
    np.testing.assert_allclose(pred, got, rtol=1e-6, atol=1e-6 * np.abs(got).max())


def _fake_quant_activation_logits(qmodel, ref, batch):
    """The float32 fake-quant reference with activation QDQ: the reference model's float
    forward graph (dequantized weights) with `fp8xla_qdq` (itself checked against ml_dtypes)
    on the activation of every weight matmul. The sites come from the `instrument` pass: each
    `fp8xla_observe` is replaced by a QDQ with the static scale of the weight it feeds."""
    import re

    from fp8xla import graph
    from fp8xla.runtime import GraphCache

    fmt = qmodel.fp8.config.a_format
    a_scale = {q.index: q.a_scale for q in qmodel.fp8.weights.values()}

    def rewrite(exp, arg_of):
        var_of = {a: i for i, a in arg_of.items()}
        text, sites = graph.run_pass("instrument", graph.module_text(exp),
                                     {"weights": sorted(arg_of[i] for i in a_scale)})
        scale_of_site = {s["site"]: a_scale[var_of[s["arg"]]] for s in sites["sites"]}

        def qdq(m):
            return (f'backend_config = {{format = "{fmt}", scale = '
                    f'{scale_of_site[int(m.group(1))]:.9e} : f32}}, '
                    'call_target_name = "fp8xla_qdq"')

        text, n = re.subn(r'backend_config = \{site = (\d+) : i64\}, '
                          r'call_target_name = "fp8xla_observe", has_side_effect = true',
                          qdq, text)
        assert n == len(scale_of_site) > 0
        return graph.with_module(exp, text)

    cache = GraphCache(ref, rewrite, kind="forward")
    inputs = {k: np.asarray(v) for k, v in batch.items()}
    return cache.get(inputs)(inputs, [v.value for v in ref.trainable_variables],
                             [v.value for v in ref.non_trainable_variables])


def test_compile_after_quantize_keeps_fp8(rng):
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None))
    before = model.generate_function
    model.compile(sampler=keras_hub.samplers.GreedySampler())
    assert model.generate_function is not before  # reinstalled, not Keras-Hub's float one
    batch = prompts(rng, 3)
    ref = fake_quantized_copy(model, model)
    got = model.generate(batch, max_length=10, stop_token_ids=None)
    want = ref.generate(batch, max_length=10, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(want["token_ids"]))


def compiled_generate_hlo(model, batch):
    """The optimized HLO of the FP8 generate step `model.generate(batch)` compiled."""
    from fp8xla.runtime import GraphCache

    cache = next(c.cell_contents for c in model.generate_function.__closure__
                 if isinstance(c.cell_contents, GraphCache))
    (run,) = cache.compiled.values()
    state = ([v.value for v in model.sampler.variables],
             [model.fp8.codes.get(i, v.value) for i, v in enumerate(model.trainable_variables)],
             [v.value for v in model.non_trainable_variables])
    inputs = {k: keras.ops.convert_to_tensor(v) for k, v in batch.items()}
    return run.lower(inputs, state).compile().as_text()


def test_compiled_generate_never_holds_a_float_copy_of_the_embedding_table(rng):
    """XLA turns `convert(gather(table))` into `gather(convert(table))` and hoists the convert
    out of the decode loop; the row dequantization must stay where the rewrite put it."""
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None))
    batch = prompts(rng, 2)
    model.generate(batch, max_length=12, stop_token_ids=None)
    hlo = compiled_generate_hlo(model, batch)
    assert "f8e4m3fn[256,32]" in hlo  # the table, as an argument
    for float_type in ("f16", "bf16", "f32", "f64", "u8"):  # nor a byte copy
        assert f" {float_type}[256,32]" not in hlo, [ln for ln in hlo.splitlines() if "[256,32]" in ln][:6]


def _while_body_copies(hlo, shape):
    """`copy` instructions of a `shape` buffer in the bodies of the compiled module's loops."""
    bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo))
    count = 0
    for comp in re.split(r"\n(?=\S)", hlo):
        name = re.match(r"%?([\w.\-]+)", comp)
        if name and name.group(1) in bodies:
            count += len(re.findall(rf"= f32\[{shape}\]\{{[\d,]*\}} copy\(", comp))
    return count


def _generate_with_options(rng, monkeypatch, options):
    """A weight-only FP8 tiny model quantized with extra rewrite `options`: (model, batch,
    generated, compiled HLO of its generate step)."""
    from fp8xla import graph

    quantize_exported = graph.quantize_exported
    monkeypatch.setattr(graph, "quantize_exported",
                        lambda exp, opts: quantize_exported(exp, {**opts, **options}))
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None))
    batch = prompts(rng, 2)
    got = model.generate(batch, max_length=12, stop_token_ids=None)
    return model, batch, got, compiled_generate_hlo(model, batch)


@pytest.mark.parametrize("in_place", [True, False])
def test_decode_loop_updates_the_kv_cache_in_place(rng, monkeypatch, in_place):
    """Without fp8xla_update_slice XLA's CPU backend copies every KV cache several times per
    decode step (it fuses the row update into two consumers, each needing its own buffer).
    The `in_place=False` case pins that behaviour of this jaxlib (0.10.2): it documents why
    the rewrite exists and may need updating when XLA changes."""
    model, batch, got, hlo = _generate_with_options(
        rng, monkeypatch, {"update_slices_in_place": in_place})
    copies = _while_body_copies(hlo, "2,12,1,16")  # [batch, length, kv heads, head dim]
    if in_place:
        # 2 layers x (key, value) caches and the generated token ids
        assert hlo.count('custom_call_target="fp8xla_update_slice"') == 5
        assert copies == 0
        # and it generates what stock Keras-Hub does on the fake-quantized weights
        ref = fake_quantized_copy(model, model)
        want = ref.generate(batch, max_length=12, stop_token_ids=None)
        np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(want["token_ids"]))
    else:
        assert copies >= 4


@pytest.mark.parametrize("min_bytes", [0, None])
def test_decode_attention_runs_on_the_gemv_kernels(rng, monkeypatch, min_bytes):
    """The decode step's attention products over the KV cache become fp8xla_dot_f32 when the
    cache is large enough (the tiny model's are not, so the threshold is set to 0 to see them
    rewritten): 2 layers x (scores, weighted sum). Generation is unchanged."""
    model, batch, got, hlo = _generate_with_options(
        rng, monkeypatch, {"decode_dots_min_bytes": min_bytes})
    assert hlo.count('custom_call_target="fp8xla_dot_f32"') == (4 if min_bytes == 0 else 0)
    ref = fake_quantized_copy(model, model)
    want = ref.generate(batch, max_length=12, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(want["token_ids"]))


def test_greedy_sampler_argmax_runs_on_the_custom_call(monkeypatch):
    """The sampler's argmax over the vocabulary becomes fp8xla_argmax when the vocabulary is
    large enough (the tiny model's 256 is not, so the threshold is set to it): one call in the
    decode loop. The greedy tokens are those of the same FP8 graph without the rewrite and
    those of stock Keras-Hub on the fake-quantized weights."""
    _, _, plain, plain_hlo = _generate_with_options(
        np.random.default_rng(7), monkeypatch, {"sampler_argmax": False})
    assert "fp8xla_argmax" not in plain_hlo
    monkeypatch.undo()
    model, batch, got, hlo = _generate_with_options(
        np.random.default_rng(7), monkeypatch, {"sampler_argmax_min_size": 256})
    assert hlo.count('custom_call_target="fp8xla_argmax"') == 1
    np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(plain["token_ids"]))
    ref = fake_quantized_copy(model, model)
    want = ref.generate(batch, max_length=12, stop_token_ids=None)
    np.testing.assert_array_equal(np.asarray(got["token_ids"]), np.asarray(want["token_ids"]))


def summary_totals(model):
    """(count, bytes) of each "Total params: N (X UNIT)" line of ``model.summary()``; bytes
    to the 2 decimals of UNIT that Keras prints, as (low, high)."""
    out = []
    model.summary(print_fn=out.append)
    units = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
    totals = []
    for count, size, unit in re.findall(r"Total params: ([\d,]+) \(([\d.]+) (B|KB|MB|GB)\)",
                                        "\n".join(out)):
        scale = units[unit]
        totals.append((int(count.replace(",", "")),
                       ((float(size) - 0.005) * scale, (float(size) + 0.005) * scale)))
    assert len(totals) == 1, out
    return totals[0]


def fp8_model_holds(model):
    """(count, bytes) of what an FP8 model holds, from its arrays: FP8 codes one byte each,
    weight and activation scales float32, every other variable as it is."""
    q = model.fp8.weights
    count = nbytes = 0
    for i, v in enumerate(model.trainable_variables):
        if i in q:
            codes = np.asarray(q[i].codes)
            assert codes.dtype.itemsize == 1
            scales = np.size(q[i].w_scale) + (q[i].a_scale is not None)
            count += codes.size + scales
            nbytes += codes.nbytes + 4 * scales
        else:
            count += int(np.prod(v.shape))
            nbytes += np.asarray(v.value).nbytes
    for v in model.non_trainable_variables:
        count += int(np.prod(v.shape))
        nbytes += np.asarray(v.value).nbytes
    return count, nbytes


def test_summary_reports_the_bytes_an_fp8_model_holds(rng):
    model = tiny_gemma3()
    count, (low, high) = summary_totals(model)
    assert low <= 4 * count <= high  # float32
    batch = prompts(rng, 2)
    quantize_model(model, StaticQuantConfig(),
                   lambda m: m.generate(batch, max_length=8, stop_token_ids=None))
    want_count, want_bytes = fp8_model_holds(model)
    got_count, (low, high) = summary_totals(model)
    assert got_count == want_count and low <= want_bytes <= high, (got_count, low, high,
                                                                    want_count, want_bytes)
    assert high < 0.5 * 4 * count  # the FP8 model is far smaller than the float one
    # summary() leaves nothing behind that would change what Keras sees of the model
    assert not hasattr(model, "_collected_trainable_weights")
    assert summary_totals(model)[0] == want_count


def test_print_model_of_a_float_model_lists_its_float_weights(capsys):
    """INC's example prints the model before quantizing it too."""
    model = tiny_gemma3()
    print_model(model)
    out = capsys.readouterr().out
    matrices = [v for v in model.trainable_variables if len(v.shape) >= 2]
    assert matrices
    for v in matrices:
        (line,) = [ln for ln in out.splitlines() if ln.startswith(v.path + " ")]
        assert "float32" in line
    assert "float8" not in out
    quantize_model(model, StaticQuantConfig(activation_dtype=None))
    print_model(model)
    out = capsys.readouterr().out
    assert out.count("float8_e4m3fn") == len(model.fp8.weights)
