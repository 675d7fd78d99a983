"""An FP8 export made for 2 devices, run on 2 processes of 1 device each (`jax.distributed`).

    python distributed_worker.py export DIR        (JAX_NUM_CPU_DEVICES=2)
    python distributed_worker.py run DIR PORT ID   (one process of two; ID is 0 or 1)

`export` writes DIR/model.bin (the quantized, sharded export, serialized), the inputs and FP8
weights, and DIR/want.npy: the logits of the same FP8 model unsharded on one device. Each
`run` process loads only its own shards of the weights and writes DIR/got{ID}.npy."""
import sys
from pathlib import Path

import numpy as np


def model(jnp, jax):
    def f(x, w1, w2, w3):
        h = jax.nn.relu(jnp.dot(x, w1))          # w1 column parallel
        h = jnp.dot(h, w2)                       # w2 row parallel: one all-reduce
        return jnp.dot(h, w3)                    # w3 (the "vocab" projection) column parallel
    return f


SPECS = [(), (None, "model"), ("model", None), (None, "model")]


def export(out: Path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fp8xla import graph, ops

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 32)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((32, 64), (64, 32), (32, 50))]
    mesh = Mesh(np.array(jax.devices()), ("model",))
    f = model(jnp, jax)
    codes, opts = [], {"weights": []}
    for i, w in enumerate(ws):
        c, s = ops.quantize_weight(w, channel_axes=1)
        codes.append(c)
        opts["weights"].append({"arg": i + 1, "format": "e4m3fn",
                                "w_scale": [float(v) for v in s], "channel_dim": 1,
                                "a_scale": 0.05})
    args = [x] + ws
    sharded = jax.export.export(jax.jit(f))(*[
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P(*s)))
        for a, s in zip(args, SPECS)])
    q, report = graph.quantize_exported(sharded, opts)
    assert sum(h["kind"] == "shard" for h in report["handled"]) == 3, report["handled"]
    (out / "model.bin").write_bytes(q.serialize())
    single, _ = graph.quantize_exported(jax.export.export(jax.jit(f))(*args), opts)
    np.save(out / "want.npy", np.asarray(jax.jit(single.call)(x, *codes)))
    np.save(out / "x.npy", x)
    for i, c in enumerate(codes):
        np.save(out / f"w{i + 1}.npy", c.view(np.uint8))


def run(out: Path, port: int, pid: int):
    import jax
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fp8xla import graph  # noqa: F401  (registers the custom calls)

    assert jax.process_count() == 2 and len(jax.local_devices()) == 1
    exp = jax.export.deserialize(bytearray((out / "model.bin").read_bytes()))
    mesh = Mesh(np.array(jax.devices()), ("model",))
    x = np.load(out / "x.npy")
    loaded = {}

    def placed(i, spec):
        path = out / ("x.npy" if i == 0 else f"w{i}.npy")
        full = np.load(path, mmap_mode="r")   # only the shard this process needs is read
        aval = exp.in_avals[i]

        def shard(index):
            part = np.asarray(full[index])
            loaded[i] = part.shape
            return part if i == 0 else part.view(aval.dtype)

        return jax.make_array_from_callback(aval.shape, NamedSharding(mesh, P(*spec)), shard)

    args = [placed(i, s) for i, s in enumerate(SPECS)]
    assert loaded[1] == (32, 32) and loaded[2] == (32, 32), loaded
    got = jax.jit(exp.call)(*args)
    got = np.asarray(jax.experimental.multihost_utils.process_allgather(got, tiled=True))
    np.save(out / f"got{pid}.npy", got)
    jax.distributed.shutdown()
    del x


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]))
    else:
        import jax.experimental.multihost_utils  # noqa: F401
        run(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    print("ok", sys.argv[1])
