"""results.json, PNG plots and a Markdown report for the downstream protocols."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path: Path, title: str, legend: bool = True) -> None:
    plt = _plt()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_label_efficiency(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    fractions = [s["fraction"] for s in result["settings"]]
    for init, color in (("pretrained", "tab:blue"), ("random", "tab:gray")):
        mean = np.array([s[init]["mean"] for s in result["settings"]])
        low = np.array([s[init]["ci_low"] for s in result["settings"]])
        high = np.array([s[init]["ci_high"] for s in result["settings"]])
        ax.errorbar(fractions, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=init, color=color)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test AUC (mean, 95% CI)")
    _finish(fig, ax, path, "Label efficiency")


def plot_convergence(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for init, color in (("pretrained", "tab:blue"), ("random", "tab:gray")):
        curves = np.array(result["runs"][init]["val_auc_per_epoch"])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker=".", color=color, label=f"{init} (98% at epoch {result['runs'][init]['mean_epochs_to_98']:.1f})")
        ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC")
    _finish(fig, ax, path, f"Convergence (speed-up {result['speedup']:.0%})")


def plot_robustness(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    inits = list(result["runs"])
    ax.boxplot([result["runs"][i]["per_image_mean"] for i in inits], tick_labels=inits)
    ax.set_ylabel("relative change of p (mean over transforms)")
    _finish(fig, ax, path, "Robustness to gamma, rotation, scaling", legend=False)


def write_report(out: Path, header: dict, results: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": header, **results}, indent=2, default=float) + "\n")
    lines = [f"# Downstream evaluation: {header['data']}", "",
             "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in header.items()] + [""]
    if "label-efficiency" in results:
        r = results["label-efficiency"]
        plot_label_efficiency(r, out / "label_efficiency.png")
        lines += ["## Label efficiency", "", "Mean test AUC over repeats, standard deviation, bootstrap 95% CI of the mean.", "",
                  "| labels | n | pretrained | random |", "|---|---|---|---|"]
        for s in r["settings"]:
            cells = [f"{s[i]['mean']:.3f} ± {s[i]['std']:.3f} [{s[i]['ci_low']:.3f}, {s[i]['ci_high']:.3f}]" for i in ("pretrained", "random")]
            lines.append(f"| {s['fraction']:.0%} | {s['pretrained']['n_train']} | {cells[0]} | {cells[1]} |")
        lines += ["", "![label efficiency](label_efficiency.png)", ""]
    if "convergence" in results:
        r = results["convergence"]
        plot_convergence(r, out / "convergence.png")
        lines += ["## Convergence", "", f"Earliest epoch reaching 98% of the run's best validation AUC "
                  f"({r.get('train_fraction', 1.0):.0%} of the training labels).", "",
                  "| init | epochs to 98% (per repeat) | mean |", "|---|---|---|"]
        for i in ("pretrained", "random"):
            lines.append(f"| {i} | {r['runs'][i]['epochs_to_98']} | {r['runs'][i]['mean_epochs_to_98']:.1f} |")
        lines += ["", f"Speed-up of the pretrained initialisation: {r['speedup']:.0%}.", "", "![convergence](convergence.png)", ""]
    if "robustness" in results:
        r = results["robustness"]
        plot_robustness(r, out / "robustness.png")
        lines += ["## Robustness", "", "Relative change |p(T x) - p(x)| / p(x) of the probability of the class predicted for x.", "",
                  "| init | median | mean | IQR |", "|---|---|---|---|"]
        for i, v in r["runs"].items():
            lines.append(f"| {i} | {v['median']:.3f} | {v['mean']:.3f} | {v['q25']:.3f} to {v['q75']:.3f} |")
        lines += ["", "![robustness](robustness.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
