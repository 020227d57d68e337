"""One picture of a run: losses against ln(K), code entropy per modality, learning rate, throughput.

    python -m train.plot RUN_DIR [--out RUN_DIR/metrics.png]

Reads RUN_DIR/metrics.jsonl (and K from RUN_DIR/checkpoint.pt's config when present). The dashed ln(K)
line is the loss of predictions that say nothing about the codes: every run starts there. Learning reads
as a per-modality loss falling below it while the code entropy stays high; a loss that stays on the line
means no learning yet (or collapse, when the code entropy also falls towards 0).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from .errors import RunFolderError, TrainError


SMOOTH = 5  # logged rows per trailing mean, when there are at least twice as many rows


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start), NaN (a modality missing
    from a row) left out; NaN only where the whole window is."""
    out = []
    for i in range(len(values)):
        seen = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(seen) / len(seen) if seen else math.nan)
    return out


def plot_run(run: Path, out: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TrainError("plotting needs matplotlib (pip install matplotlib)") from None
    path = run / "metrics.jsonl"
    if not path.exists():
        raise RunFolderError(f"{path} not found (is {run} a training run folder?)")
    from .metrics import read_metrics
    try:
        rows = read_metrics(path)  # a partial last line (run killed while writing) is left out
    except ValueError as e:
        raise RunFolderError(str(e)) from None
    if not rows:
        raise RunFolderError(f"{path} is empty")
    k = None
    cfg_path = run / "checkpoint.pt"
    if cfg_path.exists():
        from .checkpoint import load
        k = load(cfg_path)["config"]["num_prototypes"]
    steps = [r["step"] for r in rows]
    modalities = sorted({key.split("/", 1)[1] for r in rows for key in r if key.startswith("loss_ss/")})

    # A per-step loss of a few images per modality jumps by about +-0.1 ln K from step to step; with many
    # logged steps the trend is drawn as a trailing mean over SMOOTH rows, the raw values faint behind it.
    smooth = SMOOTH if len(rows) >= 2 * SMOOTH else 1
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0, 0]
    for i, m in enumerate(modalities):
        values = [r.get(f"loss_ss/{m}", math.nan) for r in rows]
        if smooth > 1:
            ax.plot(steps, values, color=f"C{i}", lw=0.8, alpha=0.3)
        ax.plot(steps, trailing_mean(values, smooth), color=f"C{i}", lw=2 if smooth > 1 else 1.5,
                label=f"L_ss {m}" + (f" (mean of {smooth} logged steps)" if smooth > 1 else ""))
    if any("loss_sup" in r for r in rows):
        ax.plot(steps, [r.get("loss_sup", math.nan) for r in rows], label="L_sup", color="black", lw=1)
    if k:
        ax.axhline(math.log(k), ls="--", color="grey",
                   label=f"ln K = {math.log(k):.2f}: uninformative\n(start; stuck here = not learning)")
    ax.set(title="losses (learning: per-modality L_ss below ln K)", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for i, m in enumerate(modalities):
        ax.plot(steps, trailing_mean([r.get(f"code_entropy/{m}", math.nan) for r in rows], smooth),
                color=f"C{i}", label=m)
        ax.plot(steps, trailing_mean([r.get(f"proto_usage/{m}", math.nan) for r in rows], smooth),
                color=f"C{i}", ls=":")
    ax.set(title="code entropy (solid), prototype usage (dotted)\n1 = spread, 0 = collapse"
                 + (f"; means of {smooth} logged steps" if smooth > 1 else ""),
           xlabel="step", ylim=(-0.05, 1.05))
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, [r["lr"] for r in rows])
    frozen = [s for s, r in zip(steps, rows) if r.get("prototypes_frozen")]
    if frozen:
        ax.axvspan(steps[0], frozen[-1], color="tab:blue", alpha=0.1, label="prototypes frozen")
    queue = [s for s, r in zip(steps, rows) if r.get("queue_in_use")]
    if queue:
        ax.axvline(queue[0], color="tab:green", ls="--", label="queue in use")
    ax.set(title="learning rate", xlabel="step")
    if frozen or queue:
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    ax.plot(steps, [r["images_per_s"] for r in rows], label="images/s")
    ax.set(title="throughput", xlabel="step", ylabel="images/s")
    twin = ax.twinx()
    twin.plot(steps, [100 * r["data_wait_fraction"] for r in rows], color="tab:red", lw=1)
    twin.set_ylabel("data wait %", color="tab:red")
    fig.suptitle(str(run))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG file (default RUN/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run, args.out or args.run / "metrics.png")
    except TrainError as e:  # no or a damaged metrics log, an unusable checkpoint: one line, exit status 1
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
