#!/usr/bin/env python3
"""Regenerates the StableHLO test modules of the graph rewrite (deterministic).

Run from anywhere with the project's venv:

    KERAS_BACKEND=jax python tests/data/export_modules.py [--check]

Writes, next to this script:

* ``dot.mlir``      -- ``x @ w`` (x: f32[4,16], w: f32[16,8]).
* ``mlp.mlir``      -- a 2-layer MLP whose weights and biases are arguments.
* ``lhs_weight.mlir`` -- ``w @ x``: the weight is the lhs of the dot.
* ``shared_call.mlir`` -- one private function called with a weight and with an activation.
* ``gemma3.mlir``   -- the generate step of a tiny random-weight Keras-Hub ``Gemma3CausalLM``
  (2 layers, vocabulary 256, hidden 32, preprocessor=None), exported the way Keras-Hub's
  ``make_generate_function`` jit-compiles it: ``compiled_generate_function(inputs,
  stop_token_ids, state)``, state = (sampler, trainable, non-trainable variables), every argument
  a ``jax.ShapeDtypeStruct`` (no weights are needed to export).
* ``<name>.pretty.mlir`` -- the same module as ``exp.mlir_module()`` returns it (pretty form),
  for reading only.
* ``<name>.args.json`` -- sidecar: flat argument index of ``main`` -> variable path, shape, dtype.

Every module is written as ``exp.mlir_module()`` printed by jaxlib's MLIR bindings in the
*generic* operation form with debug info (``loc(...)`` names such as ``loc("state[1][3]")``).
The generic form is what the Rust parser reads: it is one uniform grammar for every op
(``"dialect.op"(operands) <{properties}> ({regions}) {attributes} : (types) -> types``), so no
per-op pretty syntax has to be known, and XLA's ``serialize_portable_artifact`` accepts it.

``--check-files A.mlir B.mlir ...`` only checks the given (rewritten) modules.

``--check`` additionally re-parses every module with jaxlib's MLIR (stablehlo dialects loaded)
and serializes it as a portable artifact.
"""

import json
import os
import re
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def generic_text(exp):
    """The exported module in MLIR generic form with locations."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    with jax_mlir.make_ir_context():
        module = ir.Module.parse(exp.mlir_module())
        return module.operation.get_asm(
            enable_debug_info=True, print_generic_op_form=True
        )


_FILE_LOC = re.compile(r'loc\("(/[^"]*)":')


def _relative(match):
    """File locations without the machine's directories (deterministic across checkouts)."""
    path = match.group(1)
    for marker in ("site-packages/", "tests/data/"):
        at = path.rfind(marker)
        if at >= 0:
            keep = path[at:] if marker == "tests/data/" else path[at + len(marker):]
            return f'loc("{keep}":'
    return f'loc("{os.path.basename(path)}":'


# Positions inside this script change whenever it is edited: pin them, so that editing the
# script does not change the modules.
_SELF_LOC = re.compile(r'loc\("tests/data/export_modules\.py":\d+:\d+( to (\d+)?:\d+)?\)')


def normalize(text):
    text = _FILE_LOC.sub(_relative, text)
    return _SELF_LOC.sub('loc("tests/data/export_modules.py":1:1)', text)


def write(name, exp, args):
    text = normalize(generic_text(exp))
    with open(os.path.join(HERE, name + ".mlir"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, name + ".pretty.mlir"), "w") as f:
        f.write(normalize(exp.mlir_module()))
    with open(os.path.join(HERE, name + ".args.json"), "w") as f:
        json.dump({"module": name + ".mlir", "args": args}, f, indent=1)
        f.write("\n")
    print(f"{name}.mlir: {len(text)} bytes, {len(args)} arguments")


def arg(index, path, spec):
    return {
        "index": index,
        "path": path,
        "shape": list(spec.shape),
        "dtype": str(np.dtype(spec.dtype)),
    }


def export(f, specs):
    return jax.export.export(jax.jit(f), platforms=["cpu"])(*specs)


def export_dot():
    specs = [
        jax.ShapeDtypeStruct((4, 16), jnp.float32),
        jax.ShapeDtypeStruct((16, 8), jnp.float32),
    ]
    exp = export(lambda x, w: x @ w, specs)
    write("dot", exp, [arg(0, "x", specs[0]), arg(1, "w", specs[1])])


def export_mlp():
    def mlp(x, w1, b1, w2, b2):
        h = jax.nn.relu(x @ w1 + b1)
        return h @ w2 + b2

    names = ["x", "w1", "b1", "w2", "b2"]
    specs = [
        jax.ShapeDtypeStruct((2, 8, 16), jnp.float32),
        jax.ShapeDtypeStruct((16, 32), jnp.float32),
        jax.ShapeDtypeStruct((32,), jnp.float32),
        jax.ShapeDtypeStruct((32, 4), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.float32),
    ]
    exp = export(mlp, specs)
    write("mlp", exp, [arg(i, n, s) for i, (n, s) in enumerate(zip(names, specs))])


def export_lhs_weight():
    """The weight on the lhs of the dot: w @ x."""
    specs = [
        jax.ShapeDtypeStruct((8, 16), jnp.float32),
        jax.ShapeDtypeStruct((16, 4), jnp.float32),
    ]
    exp = export(lambda w, x: w @ x, specs)
    write("lhs_weight", exp, [arg(0, "w", specs[0]), arg(1, "x", specs[1])])


def export_shared_call():
    """One private function called with a weight and with an activation."""

    @jax.jit
    def layer(x, w):
        return jnp.tanh(x @ w)

    def f(x, w, y):
        return layer(x, w) + layer(x, y)

    names = ["x", "w", "y"]
    specs = [jax.ShapeDtypeStruct((4, 16), jnp.float32)] + [
        jax.ShapeDtypeStruct((16, 16), jnp.float32)
    ] * 2
    exp = export(f, specs)
    write("shared_call", exp, [arg(i, n, s) for i, (n, s) in enumerate(zip(names, specs))])


def build_gemma3():
    """The tiny random-weight Gemma3CausalLM and its generate step, as exported.

    Returns (model, f, (inputs_specs, state_specs), groups) where ``f(inputs, state)`` is the
    jit-able generate step and ``groups`` the (sampler, trainable, non-trainable) variables."""
    import itertools

    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=256,
        image_size=16,
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=8,
        vision_encoder=None,
    )
    model = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler=keras_hub.samplers.GreedySampler())

    # The same function Keras-Hub's make_generate_function jit-compiles for the JAX backend.
    def compiled_generate_function(inputs, stop_token_ids, state):
        sampler_variables, trainable_variables, non_trainable_variables = state
        mapping = itertools.chain(
            zip(model.sampler.variables, sampler_variables),
            zip(model.trainable_variables, trainable_variables),
            zip(model.non_trainable_variables, non_trainable_variables),
        )
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = model.generate_step(inputs, stop_token_ids)
        # Keras-Hub 0.32.0 returns "images": None without a preprocessor.
        outputs = {k: v for k, v in outputs.items() if v is not None}
        sampler_variables = []
        for v in model.sampler.variables:
            new_v = scope.get_current_value(v)
            sampler_variables.append(new_v if new_v is not None else v)
        return outputs, sampler_variables

    batch, length = 1, 8
    inputs = {
        "token_ids": jax.ShapeDtypeStruct((batch, length), jnp.int32),
        "padding_mask": jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    }

    def spec(v):
        return jax.ShapeDtypeStruct(tuple(v.shape), jnp.dtype(v.dtype))

    groups = [model.sampler.variables, model.trainable_variables, model.non_trainable_variables]
    state = tuple([spec(v) for v in g] for g in groups)
    stop_token_ids = (1,)

    def f(inputs, state):
        return compiled_generate_function(inputs, stop_token_ids, state)

    return model, f, (inputs, state), groups


def export_gemma3():
    model, f, (inputs, state), groups = build_gemma3()
    exp = export(f, [inputs, state])

    args = []
    for key in sorted(inputs):
        args.append(arg(len(args), f"inputs['{key}']", inputs[key]))
    for g, (group, specs) in enumerate(zip(groups, state)):
        for i, (v, s) in enumerate(zip(group, specs)):
            entry = arg(len(args), v.path, s)
            entry["state"] = f"state[{g}][{i}]"
            args.append(entry)
    write("gemma3", exp, args)


def check_text(text):
    """Parses `text` with jaxlib's MLIR (stablehlo dialects loaded) and serializes it as a
    portable artifact, the way a rewritten module will be re-serialized."""
    import jax.extend
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.mlir.dialects import stablehlo

    with jax_mlir.make_ir_context():
        ir.Module.parse(text)
    version = stablehlo.get_current_version()
    return jax.extend.mlir.serialize_portable_artifact(text, version)


def check():
    for name in ["dot", "mlp", "lhs_weight", "shared_call", "gemma3"]:
        with open(os.path.join(HERE, name + ".mlir")) as f:
            check_text(f.read())
        print(f"{name}.mlir: parses and serializes")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--check-files":
        # Used by the Rust tests: every rewritten module must parse and serialize.
        for path in sys.argv[2:]:
            with open(path) as f:
                check_text(f.read())
            print(f"{path}: parses and serializes")
        sys.exit(0)
    export_dot()
    export_mlp()
    export_lhs_weight()
    export_shared_call()
    export_gemma3()
    if "--check" in sys.argv:
        check()
