"""Writers of the end-to-end benchmark's results: JSON, a Markdown table and a PNG chart.

All three read the one results dictionary e2e.py builds (its layout is documented there). A
contender that did not run appears in each of them with its status and reason.
"""
from __future__ import annotations

import json

MIB = 2**20

#: The targets of fp8xla against float32 Keras: (field of "vs_float32", label, test).
TARGETS = [
    ("decode", "decode >= 3.5x", lambda x: x >= 3.5),
    ("prefill", "prefill >= 1.0x", lambda x: x >= 1.0),
    ("peak_rss", "peak RSS <= 0.4x", lambda x: x <= 0.4),
]


def write_all(results: dict, out) -> None:
    """results.json, results.md and results.png in the directory ``out``."""
    from pathlib import Path

    out = Path(out)
    write_json(results, out / "results.json")
    (out / "results.md").write_text(markdown(results))
    write_chart(results, out / "results.png")


def write_json(results: dict, path) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# numbers picked from a contender's results


def _median(c, name):
    m = (c.get("measure") or {}).get(name) or {}
    return m.get("median")


def prefill(c):
    return _median(c, "prefill_tokens_per_s")


def decode(c):
    return _median(c, "decode_tokens_per_s")


def spread(c, name):
    m = (c.get("measure") or {}).get(name) or {}
    return m.get("min"), m.get("max")


def _memory(c):
    return (c.get("measure") or {}).get("memory") or {}


def peak_rss(c):
    """Peak RSS of the measuring process while loading the contender and generating (bytes)."""
    mem = _memory(c)
    peaks = [(mem.get(phase) or {}).get("peak") for phase in ("load", "generate")]
    return None if None in peaks else max(peaks)


def rss_after_generate(c):
    """RSS of the measuring process once generation is over (bytes): the model at rest, with
    the compiled generate function and the runtime."""
    return (_memory(c).get("generate") or {}).get("rss")


def status_text(c) -> str:
    if c["status"] == "ok":
        return "ok"
    return f"{c['status']}: {c.get('reason') or 'no reason recorded'}"


# ---------------------------------------------------------------------------------------------
# Markdown


def _rate(c, name, value):
    if value is None:
        return "–"
    lo, hi = spread(c, name)
    digits = 0 if value >= 100 else 1
    if lo is None or hi is None or lo == hi:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def _mib(b):
    return "–" if b is None else f"{b / MIB:.0f}"


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def _load(c):
    """1-minute load average at the contender's first decode repetition → after its last, and
    the share of all cores that other processes used during its repetitions."""
    la = c.get("load_average") or {}
    before, after = la.get("before"), la.get("after")
    if not before or not after:
        return "–"
    text = f"{before[0]:.1f} → {after[0]:.1f}"
    if c.get("other_cpu") is not None:
        text += f", others {100 * c['other_cpu']:.0f} %"
    return text


def table(results: dict) -> str:
    """The per-contender Markdown table."""
    rows = [
        "| contender | prefill tokens/s | decode tokens/s | peak RSS MiB | RSS after generate "
        "MiB | vs float32: prefill / decode / peak RSS | GPL-3 perplexity | top-1 agreement | "
        "load avg (1 min), others' CPU | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["contenders"]:
        m = c.get("measure") or {}
        v = c.get("vs_float32") or {}
        ratios = " / ".join(_x(v.get(k)) for k in ("prefill", "decode", "peak_rss")) \
            if v else "–"
        ppl = m.get("perplexity")
        rows.append(
            f"| {c['label']} | {_rate(c, 'prefill_tokens_per_s', prefill(c))} | "
            f"{_rate(c, 'decode_tokens_per_s', decode(c))} | {_mib(peak_rss(c))} | "
            f"{_mib(rss_after_generate(c))} | {ratios} | "
            f"{'–' if ppl is None else f'{ppl:.3f}'} | {_pct(c.get('top1_agreement'))} | "
            f"{_load(c)} | {status_text(c)} |")
    return "\n".join(rows)


def targets_table(results: dict) -> str:
    """fp8xla's targets against float32, met or not, per fp8xla contender."""
    rows = ["| contender | " + " | ".join(label for _, label, _ in TARGETS) + " |",
            "|---|" + "---|" * len(TARGETS)]
    for t in results.get("targets", []):
        cells = []
        for key, _, _ in TARGETS:
            r = t["checks"].get(key)
            cells.append("not measured" if r is None or r["measured"] is None else
                         f"{r['measured']:.2f}x: {'met' if r['met'] else 'not met'}")
        rows.append(f"| {t['label']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown(results: dict) -> str:
    m, s, ver = results["machine"], results["settings"], results["versions"]
    la = results.get("load_average", {})
    lines = [
        f"Model {s['model']}, `{results['command']}`, {results['started']} "
        f"({results['wall_seconds'] / 60:.1f} min).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB, "
        f"{', '.join(m['isa_flags']) or 'no AVX2/AVX-512 flags'}; fp8xla kernels: "
        f"{m.get('fp8xla_kernels', '?')}. XLA_FLAGS={m.get('xla_flags') or '(unset)'}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()) + ".",
        f"Load average (1/5/15 min) at start {_triple(la.get('start'))}, at end "
        f"{_triple(la.get('end'))}. The benchmark itself keeps up to "
        f"{m['cores']} cores busy; the load column gives the 1-minute load average at a "
        "contender's first decode repetition and after its last, and the share of all cores "
        "that other processes used during its decode repetitions.",
        "",
        f"Prefill: forward pass over {s['ppl_chunk_tokens'] + 1} tokens (logits for every "
        f"position), timed on each of the {s['ppl_chunks']} GPL-3 chunks, median and min–max. "
        f"Decode: {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token prompt "
        "(generate time minus the same compiled generate with no decode step), median and "
        f"min–max of {s['reps']} repetitions, taken in rounds: every contender stays loaded "
        "and each round runs one repetition of each in turn. Compile time is excluded "
        "(every shape runs once "
        "untimed first). Peak RSS: the measuring process's high-water mark while loading the "
        "deployed model and generating (quantized contenders were prepared and saved by "
        "another process); RSS after generate: what stays resident. Perplexity and top-1 "
        f"agreement with float32: GPL-3, {s['ppl_chunks']} chunks of {s['ppl_chunk_tokens']} "
        "tokens.",
        "",
        table(results),
    ]
    if results.get("targets"):
        lines += ["", "Targets (fp8xla against float32 Keras):", "", targets_table(results)]
    return "\n".join(lines) + "\n"


def _triple(v):
    return "–" if not v else " / ".join(f"{x:.2f}" for x in v)


# ---------------------------------------------------------------------------------------------
# chart


def write_chart(results: dict, path) -> None:
    """Prefill tokens/s, decode tokens/s and RSS per contender, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    cs = results["contenders"]
    mib = lambda b: None if b is None else b / MIB  # noqa: E731
    panels = [  # title, value, spread (min, max) or None
        ("prefill tokens/s", prefill, lambda c: spread(c, "prefill_tokens_per_s")),
        ("decode tokens/s", decode, lambda c: spread(c, "decode_tokens_per_s")),
        ("RSS MiB: peak (light), after generate (solid)",
         lambda c: mib(peak_rss(c)), None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 0.55 * len(cs) + 1.9), sharey=True)
    ys = list(range(len(cs)))[::-1]
    for ax, (title, get, get_spread) in zip(axes, panels):
        values = [get(c) for c in cs]
        spreads = [get_spread(c) if get_spread else (None, None) for c in cs]
        top = max([v for v in values if v is not None]
                  + [hi for _, hi in spreads if hi is not None] or [1.0])
        for y, c, v, (lo, hi) in zip(ys, cs, values, spreads):
            if v is None:
                what = "not measured" if c["status"] == "ok" else c["status"]
                ax.text(0.01 * top, y, what, va="center", fontsize=8, color="0.4")
                continue
            color = "tab:orange" if c["key"].startswith("fp8xla") else \
                "tab:gray" if c["key"] == "float32" else "tab:blue"
            err = None if lo is None or hi is None else [[v - lo], [hi - v]]
            ax.barh(y, v, color=color, alpha=0.45 if get_spread is None else 1.0,
                    xerr=err, capsize=3)
            end = v if hi is None else max(v, hi)
            ax.text(end + 0.02 * top, y, f"{v:.1f}" if v < 100 else f"{v:.0f}",
                    va="center", fontsize=8)
            if get_spread is None:  # the RSS panel: what stays resident, as a solid bar
                rest = mib(rss_after_generate(c))
                if rest is not None:
                    ax.barh(y, rest, height=0.4, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, top * 1.25)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([c["label"] for c in cs], fontsize=9)
    m, s = results["machine"], results["settings"]
    fig.suptitle(f"{s['model']}: {m['cpu']}, {m['cores']} cores; decode: median of "
                 f"{s['reps']}, prefill: of {s['ppl_chunks']} chunks; bars: min–max",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":  # re-renders the Markdown and the chart of a results.json
    import sys
    from pathlib import Path

    if len(sys.argv) != 2:
        sys.exit("usage: python benches/e2e_report.py OUT/results.json")
    src = Path(sys.argv[1])
    write_all(json.loads(src.read_text()), src.parent)
