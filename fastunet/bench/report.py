"""Tables (terminal and markdown) and the optional PNG chart of a `fastunet bench` result."""

from __future__ import annotations

from fastunet.bench.parity import CPU_RULE_NOTE

BASELINES = ("eager_fp32_nchw", "eager_bf16_cl", "compile")


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _speedup(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def model_table(result: dict) -> tuple[list[str], list[list[str]]]:
    header = ["case", "mode", "fastunet ms"]
    for name in BASELINES:
        header += [f"{name} ms", "speedup"]
    header += ["peak MiB (fastunet / eager_bf16_cl)", "TFLOP/s (of peak)", "parity ratio out/grad",
               "layers fastunet/torch (layout)"]  # fmt: skip
    rows = []
    for row in result["model"]:
        line = [row["case"], row["mode"], _ms(row["time_ms"]["fastunet"])]
        for name in BASELINES:
            line += [_ms(row["time_ms"].get(name)), _speedup(row["speedup"].get(name))]
        memory = row["peak_memory_mb"]
        ours, theirs = memory.get("fastunet"), memory.get("eager_bf16_cl")
        line.append("-" if ours is None else f"{ours:.0f} / {theirs:.0f}")
        tflops = row["tflops"]
        line.append("-" if tflops is None else f"{tflops:.1f} ({_percent(row['tflops_fraction'])})")
        ratio = row["parity"]["ratio"]
        line.append(f"{_ratio(ratio['output'])} / {_ratio(ratio['grad_params'])}")
        line.append(_layers(row.get("layers")))
        rows.append(line)
    return header, rows


def _layers(layers: dict | None) -> str:
    """The layer calls as "fastunet / torch", and the layout chosen if one was."""
    if layers is None:  # results written before the per-layer choice have none
        return "-"
    layout = layers.get("layout")  # nor those written before the layout choice
    return f"{layers['fastunet']} / {layers['torch']}" + (f" ({layout})" if layout else "")


def op_table(result: dict) -> tuple[list[str], list[list[str]]]:
    header = ["op", "level", "pass", "backend", "fastunet ms", "eager ms", "speedup",
              "TFLOP/s (of peak)", "GB/s (of copy)", "parity ratio"]  # fmt: skip
    rows = []
    for row in result["ops"]:
        tflops, gbps = row["tflops"], row["gbps"]
        rows.append([
            row["op"], row["level"], row["pass"], row["backend"],
            _ms(row["time_ms"]["fastunet"]), _ms(row["time_ms"]["eager"]),
            _speedup(row["speedup"].get("eager")),
            "-" if not tflops else f"{tflops:.1f} ({_percent(row['tflops_fraction'])})",
            "-" if gbps is None else f"{gbps:.0f} ({_percent(row['gbps_fraction'])})",
            _ratio(row["parity"]["ratio"]),
        ])  # fmt: skip
    return header, rows


def _text(header, rows) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _heading(result: dict) -> str:
    meta = result["meta"]
    return (
        f"{meta['device_name']} ({meta['device']}), {meta['date']}, fastunet {meta['fastunet']}, "
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"driver {meta['driver']}"
    )


def _ceilings(result: dict) -> str:
    ceiling = result["meta"]["ceilings"]
    if ceiling.get("matmul_tflops") is None:
        return f"ceilings: none ({ceiling['reason']})"
    return (
        f"ceilings measured in this run: matmul {ceiling['matmul_tflops']:.0f} TFLOP/s "
        f"({ceiling['matmul']}), copy {ceiling['copy_gbps']:.0f} GB/s ({ceiling['copy']})"
    )


def text_report(result: dict) -> str:
    parts = [_heading(result), _ceilings(result)]
    if result["ops"]:
        parts += ["", "ops (speedup over eager PyTorch, same dtype, channels_last):"]
        parts.append(_text(*op_table(result)))
    if result["model"]:
        parts += ["", "model (speedup = baseline time / fastunet time):"]
        parts.append(_text(*model_table(result)))
        notes = {
            (r["case"], name, note) for r in result["model"] for name, note in r["notes"].items()
        }
        parts += [f"  {case}: {name}: {note}" for case, name, note in sorted(notes)]
        reasons = {
            (r["case"], r["mode"], str(r["layers"]["reasons"]))
            for r in result["model"]
            if "layers" in r
        }
        parts += [f"  {case} {mode}: layer choices: {why}" for case, mode, why in sorted(reasons)]
        if any(r.get("layers", {}).get("cpu_rule") for r in result["model"]):
            parts.append(f"  parity: {CPU_RULE_NOTE}")
    if result["meta"]["device"] == "cpu":
        parts += ["", "GPU speed figures need CUDA: this run timed the CPU paths only."]
    return "\n".join(parts)


def markdown_report(result: dict) -> str:
    parts = [f"Measured on {_heading(result)}.", "", _ceilings(result)]
    if result["model"]:
        parts += ["", "### Model", "", _markdown(*model_table(result))]
    if result["ops"]:
        parts += ["", "### Ops", "", _markdown(*op_table(result))]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: str) -> None:
    """A PNG bar chart of the speedups (needs matplotlib: `pip install fastunet[plot]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for row in result["model"]:
        for name, speedup in row["speedup"].items():
            labels.append(f"{row['case']} {row['mode']} vs {name}")
            values.append(speedup)
            colors.append("tab:blue")
    for row in result["ops"]:
        labels.append(f"{row['op']} {row['level']} {row['pass']} vs eager")
        values.append(row["speedup"]["eager"])
        colors.append("tab:orange")
    figure, axes = plt.subplots(figsize=(10, 0.25 * len(labels) + 1.5))
    axes.barh(range(len(labels)), values, color=colors)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.invert_yaxis()
    axes.set_xlabel("speedup (baseline time / fastunet time)")
    axes.set_title(_heading(result), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
