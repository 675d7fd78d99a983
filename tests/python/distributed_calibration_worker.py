"""One of two processes (`jax.distributed`, 1 CPU device each) that calibrate the same tiny
Keras-Hub Gemma3 on different prompts and quantize it with static activation scales.

    python distributed_calibration_worker.py DIR PORT ID   (ID is 0 or 1)

Writes DIR/calib{ID}.json: per trainable variable path, the maximum |activation| this process
observed alone (calibration with the maximum over processes switched off) and the activation
scale `quantize_model` gave; the token ids whose embeddings fed the first decoder block during
generate (prompt and fed tokens); and DIR/embeddings{ID}.npy, DIR/norm{ID}.npy: the token
embedding and the first block's pre-attention norm scale, from which the test computes the
first block's q/k/v input range with numpy."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import numpy as np  # noqa: E402

LENGTH = 16


def tiny_gemma3():
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)  # the same weights in both processes
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=256, image_size=16, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=32, intermediate_dim=64, head_dim=16,
        use_post_ffw_norm=True, use_post_attention_norm=True,
        use_sliding_window_attention=True, sliding_window_size=8, vision_encoder=None)
    model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler=keras_hub.samplers.GreedySampler())
    return model


def prompts(pid):
    """Different prompts (and lengths) in each process."""
    rng = np.random.default_rng(100 + pid)
    n = 5 + 2 * pid
    ids = np.zeros((1, LENGTH), np.int32)
    mask = np.zeros((1, LENGTH), bool)
    ids[:, :n] = rng.integers(3, 256, (1, n))
    mask[:, :n] = True
    return {"token_ids": ids, "padding_mask": mask}


def main(out: Path, port: int, pid: int):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    assert jax.process_count() == 2 and len(jax.local_devices()) == 1

    import fp8xla.keras as fk
    from fp8xla.keras import distribution

    model = tiny_gemma3()
    fed = []

    def calib(m):
        p = prompts(pid)
        out_ids = np.asarray(m.generate(p, stop_token_ids=None)["token_ids"])
        # Prefill feeds the whole prompt array (padding included); each decode step feeds
        # the token before the one it samples: positions up to LENGTH - 2.
        fed.append(np.concatenate([p["token_ids"][0], out_ids[0, :LENGTH - 1]]))

    # This process's own maxima: calibrate with the maximum over processes switched off.
    over_processes = distribution.max_over_processes
    distribution.max_over_processes = lambda amax: amax
    try:
        local = fk.calibrate(model, calib)
    finally:
        distribution.max_over_processes = over_processes
    paths = [v.path for v in model.trainable_variables]
    backbone = model.backbone
    np.save(out / f"embeddings{pid}.npy",
            np.asarray(backbone.token_embedding.embeddings.value, np.float32))
    np.save(out / f"norm{pid}.npy", np.asarray(
        backbone.get_layer("decoder_block_0").pre_attention_norm.scale.value, np.float32))
    config = fk.StaticQuantConfig(weight_dtype="fp8_e4m3", activation_dtype="fp8_e4m3",
                                  granularity="per_channel")
    fk.quantize_model(model, config, calib_function=calib)
    a_scales = {q.path: q.a_scale for q in model.fp8.weights.values()}
    (out / f"calib{pid}.json").write_text(json.dumps({
        "local_amax": {paths[i]: a for i, a in local.items()},
        "a_scale": a_scales,
        "fed_tokens": sorted({int(t) for t in fed[0]}),
        "hidden_dim": backbone.hidden_dim,
        "epsilon": backbone.layer_norm_epsilon,
    }))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
    print("ok", sys.argv[3])
