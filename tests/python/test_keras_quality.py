"""fp8xla.keras past round-to-nearest on a tiny random-weight Gemma3: GPTQ rounding and scale
search, per-row embedding scales, DynamicQuantConfig, white_list and autotune."""
import dataclasses
import os
import re

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

import fp8_reference as ref  # noqa: E402
from fp8xla import weight_rounding  # noqa: E402
from fp8xla.keras import (  # noqa: E402
    DynamicQuantConfig, StaticQuantConfig, logits, print_model, quantize_model)
from test_keras_tiny import fake_quantized_copy, prompts, tiny_gemma3  # noqa: E402


def calib(rng):
    batches = [prompts(rng, 4, length=12, filled=10) for _ in range(3)]

    def run(model):
        for b in batches:
            model.generate(b, max_length=12, stop_token_ids=None)

    return run


def float_logits(model, x):
    return np.asarray(logits(model, x), np.float64)


def test_gptq_lowers_the_logit_error_and_keeps_the_runtime_format(rng):
    x = prompts(np.random.default_rng(5), 8, length=12, filled=12)
    want = float_logits(tiny_gemma3(), x)
    errors = {}
    for rounding in ("rtn", "gptq", "gptq-act"):
        model = tiny_gemma3()
        config = StaticQuantConfig(activation_dtype=None, rounding=rounding.split("-")[0],
                                   gptq_act_order=rounding == "gptq-act")
        quantize_model(model, config, calib(np.random.default_rng(1)))
        emb = [q for q in model.fp8.weights.values() if "embedding" in q.path]
        assert len(emb) == 1 and emb[0].channel_dim == 0  # one scale per embedding row
        assert emb[0].w_scale.shape == (256,)
        got = float_logits(model, x)
        errors[rounding] = np.mean((got - want) ** 2)
        # the FP8 graph runs exactly the stored codes and scales: a float model holding
        # f32(codes) * scale gives the same logits
        fake = fake_quantized_copy(model, model)
        np.testing.assert_allclose(got, float_logits(fake, x), rtol=1e-4, atol=1e-4)
    assert errors["gptq"] < errors["rtn"], errors
    assert errors["gptq-act"] < errors["rtn"], errors


def _grams_given_to_gptq(monkeypatch, model, config, calib_function):
    """Quantizes ``model``; returns ``{weight path: the Gram matrix GPTQ rounded it with}``."""
    import fp8xla.keras as fk

    seen, stock = {}, fk._quantize_weight

    def spy(w, config, channel_dim, site, is_embedding, name):
        if site is not None:
            seen[name.split(" ", 1)[1]] = np.array(site.gram)
        return stock(w, config, channel_dim, site, is_embedding, name)

    monkeypatch.setattr(fk, "_quantize_weight", spy)
    quantize_model(model, config, calib_function)
    return seen


def test_sequential_gptq_fits_each_block_to_the_rounded_blocks_before_it(monkeypatch):
    want_logits = float_logits(tiny_gemma3(), x := prompts(np.random.default_rng(5), 8,
                                                           length=12, filled=12))
    batches = [prompts(np.random.default_rng(10 + i), 4, length=12, filled=7) for i in range(3)]

    def calib_function(model):
        for b in batches:
            model.generate(b, max_length=12, stop_token_ids=None)

    config = StaticQuantConfig(activation_dtype=None, rounding="gptq", gptq_sequential=True)
    model = tiny_gemma3()
    floats = [np.array(v.value) for v in model.trainable_variables]
    grams = _grams_given_to_gptq(monkeypatch, model, config, calib_function)
    # the float weights are the model's again afterwards (as with parallel GPTQ)
    for v, f in zip(model.trainable_variables, floats):
        np.testing.assert_array_equal(np.array(v.value), f)

    # Reference: the sequences the float model generates from the calibration prompts, block 0
    # holding its rounded weights, the embedding still float (it is rounded last); the input
    # of block 1's query projection, padding positions left out.
    from fp8xla.keras import float_generate_function
    reference = tiny_gemma3()
    reference.generate_function = float_generate_function(reference)
    for q in model.fp8.weights.values():
        if "decoder_block_0/" in q.path:
            reference.trainable_variables[q.index].assign(weight_rounding.dequantize(
                q.codes, q.w_scale, q.channel_dim))
    backbone = reference.backbone
    want = np.zeros((32, 32))
    for b in batches:
        out = reference.generate(b, max_length=12, stop_token_ids=None)
        ids, mask = np.asarray(out["token_ids"]), np.asarray(out["padding_mask"])
        h = np.asarray(backbone.token_embedding(ids)) * np.sqrt(32.0)
        h = backbone.transformer_layers[0](h, padding_mask=mask)
        rows = np.asarray(backbone.transformer_layers[1].pre_attention_norm(h), np.float64)
        rows = rows.reshape(-1, 32)[mask.reshape(-1).astype(bool)]
        want += rows.T @ rows
    got = grams["decoder_block_1/attention/query/kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # ... which is not the float model's (what parallel GPTQ uses)
    parallel = _grams_given_to_gptq(monkeypatch, tiny_gemma3(), dataclasses.replace(
        config, gptq_sequential=False), calib_function)
    assert np.abs(parallel["decoder_block_1/attention/query/kernel"] - want).max() > \
        1e-2 * np.abs(want).max()
    # the tied embedding: the final hidden states of the model with every block rounded
    assert grams["token_embedding/embeddings"].shape == (32, 32)
    # and it is a better rounding than to nearest, with codes on the FP8 grid
    rtn = tiny_gemma3()
    quantize_model(rtn, StaticQuantConfig(activation_dtype=None))
    err = {name: np.mean((float_logits(m, x) - want_logits) ** 2)
           for name, m in (("rtn", rtn), ("sequential", model))}
    assert err["sequential"] < err["rtn"], err
    np.testing.assert_allclose(float_logits(model, x), float_logits(
        fake_quantized_copy(model, model), x), rtol=1e-4, atol=1e-4)


def test_act_order_needs_gptq_and_a_bool():
    with pytest.raises(ValueError, match="gptq_act_order=True orders GPTQ's rounding; it "
                                         "needs rounding='gptq', got rounding='rtn'"):
        StaticQuantConfig(gptq_act_order=True)
    with pytest.raises(TypeError, match="gptq_act_order must be True or False, got 1"):
        StaticQuantConfig(rounding="gptq", gptq_act_order=1)
    with pytest.raises(ValueError, match="gptq_sequential=True changes where GPTQ's inputs "
                                         "come from; it needs rounding='gptq'"):
        DynamicQuantConfig(gptq_sequential=True)
    with pytest.raises(TypeError, match="gptq_sequential must be True or False, got 'yes'"):
        StaticQuantConfig(rounding="gptq", gptq_sequential="yes")


def test_search_scales_never_raise_the_weight_error():
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None, weight_scale="search"))
    base = tiny_gemma3()
    for q in model.fp8.weights.values():
        w = np.asarray(base.trainable_variables[q.index].value, np.float32)
        s = np.asarray(q.w_scale, np.float32)
        got = np.sum((w - weight_rounding.dequantize(q.codes, s, q.channel_dim)) ** 2)
        amax = weight_rounding.amax_scales(w, "e4m3fn", q.channel_dim)
        rtn = np.sum((w - weight_rounding.dequantize(
            ref.quantize(w / weight_rounding.broadcast_scale(amax, w.shape, q.channel_dim), 1.0,
                         "e4m3fn"), 1.0)) ** 2)
        assert got <= rtn * (1 + 1e-6)


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="rounding='gptq' needs a calib_function"):
        quantize_model(tiny_gemma3(), StaticQuantConfig(activation_dtype=None, rounding="gptq"))


def test_gptq_says_when_calibration_has_fewer_rows_than_inputs(capsys):
    # one prompt of 12 tokens: about 12 prefill rows and a few decode rows per weight, fewer
    # than the 32 inputs of the attention and gate weights and the 64 of the down projection
    one = prompts(np.random.default_rng(2), 1, length=12, filled=5)
    config = StaticQuantConfig(activation_dtype=None, rounding="gptq")
    quantize_model(tiny_gemma3(), config,
                   lambda m: m.generate(one, max_length=12, stop_token_ids=None))
    note = [line for line in capsys.readouterr().out.splitlines()
            if "GPTQ: calib_function gave fewer input rows than inputs for" in line]
    assert len(note) == 1 and "python_doc_passages()" in note[0], note
    listed = re.findall(r"(decoder_block_\d/\S+) \((\d+) rows, (\d+) inputs\)", note[0])
    assert listed, note
    inputs = {"query": 32, "key": 32, "value": 32, "attention_output": 32, "ffw_gating": 32,
              "ffw_gating_2": 32, "ffw_linear": 64}  # hidden 32, 2 x 16 heads, 64 FFW
    for path, rows, k in listed:
        assert int(k) == inputs[path.split("/")[-2]], (path, k)
        assert 0 < int(rows) < int(k), (path, rows, k)
    # enough rows (3 batches of 4 prompts, 12 positions): nothing to say
    quantize_model(tiny_gemma3(), config, calib(np.random.default_rng(1)))
    assert "fewer input rows" not in capsys.readouterr().out


def test_dynamic_quant_config_generates_and_saves(rng, tmp_path):
    from fp8xla.keras import load, save

    model = tiny_gemma3()
    quantize_model(model, DynamicQuantConfig(weight_dtype="fp8_e4m3",
                                             activation_dtype="fp8_e4m3"))
    assert all(q.a_dynamic and q.a_scale is None for q in model.fp8.weights.values())
    x = prompts(rng, 4)
    out = model.generate(x, max_length=12, stop_token_ids=None)
    assert (np.asarray(out["padding_mask"]).sum(axis=1) > 5).all()
    # per-token scales track the float model more closely than one static scale per tensor
    # calibrated on other prompts
    want = float_logits(tiny_gemma3(), x)
    dyn = np.mean((float_logits(model, x) - want) ** 2)
    static = tiny_gemma3()
    quantize_model(static, StaticQuantConfig(), calib(np.random.default_rng(3)))
    assert dyn < np.mean((float_logits(static, x) - want) ** 2)
    lines = []
    print_model(model, file=type("F", (), {"write": lambda s, t: lines.append(t)})())
    assert "dynamic" in "".join(lines)
    save(model, str(tmp_path / "p"))
    loaded = load(str(tmp_path / "p"))
    assert loaded.fp8.config.dynamic and isinstance(loaded.fp8.config, DynamicQuantConfig)
    np.testing.assert_allclose(float_logits(loaded, x), float_logits(model, x), rtol=1e-5,
                               atol=1e-5)


def test_white_list_by_path_and_type(capsys):
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None, white_list=["ffw_"]))
    paths = [q.path for q in model.fp8.weights.values()]
    assert paths and all("ffw_" in p for p in paths)
    print_model(model)
    out = capsys.readouterr().out
    assert f"{len(paths)} weight matrices in FP8" in out and "kept in float" in out
    assert "attention/query/kernel" in out.split("kept in float")[1]
    model = tiny_gemma3()
    quantize_model(model, StaticQuantConfig(activation_dtype=None,
                                            white_list=[keras.layers.EinsumDense]))
    assert not any("embedding" in q.path for q in model.fp8.weights.values())
    assert len(model.fp8.weights) == 2 * 7  # q, k, v, o, gate, gate_2, linear per layer
    with pytest.raises(ValueError, match="white_list entry '\\(' is not a regular expression"):
        StaticQuantConfig(white_list=["("])
    with pytest.raises(ValueError, match="no quantizable layers"):
        quantize_model(tiny_gemma3(), StaticQuantConfig(activation_dtype=None,
                                                        white_list=["nothing-matches"]))


def closeness(x, want):
    """Higher is better, 1 for the float model: INC's eval_fn contract."""
    def eval_fn(model):
        return 1.0 / (1.0 + float(np.mean((float_logits(model, x) - want) ** 2)))
    return eval_fn


def test_autotune_falls_back_the_most_sensitive_weights(rng, capsys):
    from fp8xla.keras import TuningConfig, autotune

    x = prompts(np.random.default_rng(5), 4, length=12, filled=12)
    model = tiny_gemma3()
    eval_fn = closeness(x, float_logits(model, x))
    config = StaticQuantConfig(activation_dtype=None, weight_dtype="fp8_e5m2")
    # the loss of the all-FP8 e5m2 model, measured the same way
    probe = quantize_model(tiny_gemma3(), config)
    loss = 1 - eval_fn(probe)
    assert loss > 0
    autotune(model, TuningConfig(config_set=[config], tolerable_loss=loss / 3, max_trials=12),
             eval_fn, calib_function=calib(np.random.default_rng(1)))
    result = model.fp8.tuning
    assert result.best is not None and result.best.meets and result.best.float_weights
    assert result.trials[0].float_weights == ()  # the config alone was tried first
    counts = [len(t.float_weights) for t in result.trials[1:]]
    # doubling until one meets, then bisection down to the fewest that meet
    first_met = next(i for i, t in enumerate(result.trials[1:]) if t.meets)
    assert counts[:first_met + 1] == [min(2 ** n, 2 * 7) for n in range(first_met + 1)]
    best = len(result.best.float_weights)
    assert best == min(c for c, t in zip(counts, result.trials[1:]) if t.meets)
    assert best == 1 or any(c == best - 1 and not t.meets
                            for c, t in zip(counts, result.trials[1:]))
    # the model holds the chosen candidate: its score, those weights in float
    assert 1 - eval_fn(model) <= loss / 3
    kept = {q.path for q in model.fp8.weights.values()}
    assert not kept & set(result.best.float_weights)
    out = capsys.readouterr().out
    assert "kept in float: " + result.best.float_weights[0] in out
    print_model(model)
    assert "kept in float" in capsys.readouterr().out


def test_tune_bisects_to_the_fewest_fallbacks_that_meet():
    from fp8xla import tuning

    names = [f"w{i}" for i in range(100)]
    # a candidate meets the 1 % tolerance with at least 37 of the most sensitive in float
    evaluate = lambda config, fallback: 1.0 - (0.0 if len(fallback) >= 37 else 0.02)  # noqa
    log = []
    result = tuning.tune(1.0, tuning.TuningConfig(config_set=["c"], tolerable_loss=0.01),
                         evaluate, lambda config: names, lambda fb: 10 * len(fb), 1000,
                         log=log.append)
    assert [len(t.float_weights) for t in result.trials] == [0, 1, 2, 4, 8, 16, 32, 64, 48,
                                                             40, 36, 38, 37]
    assert result.best.float_weights == tuple(names[:37]) and result.best.float_bytes == 370
    # a trial budget that ends the bisection keeps the fewest that met so far
    result = tuning.tune(1.0, tuning.TuningConfig(config_set=["c"], tolerable_loss=0.01,
                                                  max_trials=10), evaluate,
                         lambda config: names, lambda fb: 10 * len(fb), 1000, log=log.append)
    assert len(result.trials) == 10 and len(result.best.float_weights) == 40


def test_autotune_takes_the_first_config_that_meets_and_errors_when_none_does():
    from fp8xla.keras import TuningConfig, autotune
    from fp8xla.tuning import TuningError

    x = prompts(np.random.default_rng(5), 2, length=12, filled=12)
    model = tiny_gemma3()
    eval_fn = closeness(x, float_logits(model, x))
    configs = [StaticQuantConfig(activation_dtype=None, weight_dtype="fp8_e5m2"),
               StaticQuantConfig(activation_dtype=None)]
    autotune(model, TuningConfig(config_set=configs, tolerable_loss=1.0), eval_fn)
    assert len(model.fp8.tuning.trials) == 1 and model.fp8.config.weight_dtype == "fp8_e5m2"
    model = tiny_gemma3()
    with pytest.raises(TuningError, match="no config met tolerable_loss=0 .* within 2 trial"):
        autotune(model, TuningConfig(config_set=configs, tolerable_loss=0, max_trials=2),
                 eval_fn)
    assert getattr(model, "fp8", None) is None  # float again
    np.testing.assert_allclose(float_logits(model, x), float_logits(tiny_gemma3(), x))
    with pytest.raises(ValueError, match="TuningConfig: config_set is empty"):
        TuningConfig(config_set=[])


def test_cli_act_order_and_sequential_need_gptq(capsys):
    from fp8xla import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "-q", "unused", "--act-order"])
    assert e.value.code == 2
    assert "--act-order orders GPTQ's rounding: it needs --rounding gptq" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", "-q", "unused", "--sequential"])
    assert e.value.code == 2
    assert "--sequential changes where GPTQ's inputs come from: it needs --rounding gptq" in \
        capsys.readouterr().err


def test_sequential_gptq_needs_generate_calls():
    config = StaticQuantConfig(activation_dtype=None, rounding="gptq", gptq_sequential=True)
    with pytest.raises(RuntimeError, match="calib_function never called model.generate, so "
                                           "GPTQ has no calibration input"):
        quantize_model(tiny_gemma3(), config, lambda model: None)


def test_gptq_refuses_several_processes(monkeypatch):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for sequential in (False, True):
        config = StaticQuantConfig(activation_dtype=None, rounding="gptq",
                                   gptq_sequential=sequential)
        with pytest.raises(ValueError, match=r"rounding='gptq' runs in one process; this is "
                                             r"process 0 of 2 \(jax.distributed\)"):
            quantize_model(tiny_gemma3(), config, calib(np.random.default_rng(1)))
