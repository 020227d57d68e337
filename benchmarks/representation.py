"""Representation quality at equal compute: medswav's pretraining against lightly's SwAV and SimCLR and
random initialisation, on one frozen-feature linear-probe protocol.

    python -m benchmarks.representation [--data NPZ[:MODALITY],...] [--budget SECONDS] [--quick] [--json PATH]

Exit codes: 0 all arms measured; 1 an arm failed (the others' figures are still printed and written);
2 bad arguments or a missing peer environment.

For each MedMNIST-layout data set (default: PneumoniaMNIST and BreastMNIST from ../shared/data/medmnist),
one arm at a time on the same cores (`--threads`, default 2), each pretraining for the same wall-clock
budget on the train split's images (labels unused):

- medswav: `python -m ingest X.npz --modality M` -> `augment_dali.stats` -> `python -m train` with
  configs/medmnist_small.toml (the small-data defaults) and `--max-seconds BUDGET` (shards read and augmented by DALI)
  -> `python -m train.export`;
- lightly_swav, lightly_simclr: `benchmarks.peer_ssl` in the peer environment (`make bench-peer-env`);
- random: the seeded random initialisation of the same encoder.

Every arm yields the same encoder (`train.models.build_encoder("resnet18")`: 1-channel, 512 features), and
the probe feeds each encoder the 28-pixel images scaled to [0, 1] exactly as its own pretraining scaled
them: medswav's per-image robust window (`train.downstream.data.load_npz`: the NumPy twin of the DALI
operator, with the default normalisation the recipe keeps), uint8 / 255 for the lightly arms (their transforms
with `normalize=None`), the robust window for random initialisation. The probe: frozen features of
the labelled images, val and test; for each label fraction (10 %, 1 %, class-stratified and nested, `train.downstream.subsets`) and seed, scikit-learn's
LogisticRegression on features standardised by
the labelled subset's statistics at each C of a grid, the C with the best validation AUC kept; test AUC (binary, or
macro one-vs-rest) and accuracy. Pretraining time counts from the first step (setup, ingest and the peer
environment's start excluded); images/s = source images per second of pretraining; cpu_s = the CPU seconds
the arm's process spent pretraining (on a shared machine, the compute it really got).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shards.layout import DATASET_JSON
from train.errors import TrainError

from ._common import machine, parser, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSWAV_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_DATA = ("pneumoniamnist.npz", "breastmnist.npz")
# The modality each known MedMNIST set is ingested as (picks augment_dali's normalisation); others: NPZ:MOD.
MODALITY_OF = {"pneumoniamnist": "xr", "chestmnist": "xr", "breastmnist": "us", "organamnist": "ct",
               "organcmnist": "ct", "organsmnist": "ct"}
ARMS = ("medswav", "lightly_swav", "lightly_simclr", "random")
FRACTIONS = (0.1, 0.01)
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MEDSWAV_CONFIG = REPO / "configs" / "medmnist_small.toml"  # the small-data defaults
PEER_PYTHON = Path(os.environ.get("MEDSWAV_PEER_PYTHON", REPO / ".venv-peer" / "bin" / "python"))


# ---- the probe (same for every arm)

def extract_features(encoder, images, batch_size: int = 512) -> np.ndarray:
    """Frozen encoder (eval mode: BatchNorm running statistics) on [N, 1, H, W] images -> [N, F] float64."""
    import torch

    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]).double().numpy()


def probe(train_x, train_y, val_x, val_y, test_x, test_y, task: str, seed: int = 0, c_grid=C_GRID) -> dict:
    """Logistic regression on features standardised by the labelled training subset's mean and deviation;
    C chosen by validation AUC. Returns test auc and acc, the chosen C, and every C's validation AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from train.downstream import metrics

    if task not in ("binary", "multiclass"):
        raise ValueError(f"the linear probe takes binary or multi-class tasks, not {task}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the labelled subset holds a single class: use a larger label fraction")
    scaler = StandardScaler().fit(train_x)
    train_x, val_x, test_x = (scaler.transform(x) for x in (train_x, val_x, test_x))
    best, val_aucs = None, {}
    for c in c_grid:
        model = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(train_x, train_y)
        val_aucs[c] = metrics.auc(val_y, _scores(model, val_x, task), task)
        if best is None or val_aucs[c] > val_aucs[best[0]]:
            best = (c, model)
    c, model = best
    scores = _scores(model, test_x, task)
    accuracy = float(np.mean(model.predict(test_x) == test_y))
    return {"auc": metrics.auc(test_y, scores, task), "acc": accuracy, "C": c, "val_auc": val_aucs,
            "test_scores": scores}


def _scores(model, x, task: str) -> np.ndarray:
    proba = model.predict_proba(x)
    if task == "binary":
        return proba[:, list(model.classes_).index(1)]
    # Columns by class id, so that metrics.auc's column c is class c even if a class had no example.
    full = np.zeros((len(x), int(model.classes_.max()) + 1))
    full[:, model.classes_] = proba
    return full


def evaluate_encoder(encoder, data, seeds=(0, 1, 2), fractions=FRACTIONS) -> dict:
    """The probe over label fractions and seeds: means (auc_10, acc_10, auc_1, acc_1) and each run."""
    from train.downstream.subsets import stratified_nested_subsets

    subsets = {seed: stratified_nested_subsets(data["train"].labels, fractions, seed) for seed in seeds}
    # Features of the labelled images only (every seed's largest subset), not of the whole train split.
    used = np.unique(np.concatenate([s[max(fractions)] for s in subsets.values()]))
    row_of = np.full(len(data["train"].labels), -1)
    row_of[used] = np.arange(len(used))
    train_x = extract_features(encoder, data["train"].images[used])
    val_x, test_x = (extract_features(encoder, data[s].images) for s in ("val", "test"))
    runs = []
    for seed in seeds:
        for f in fractions:
            idx = subsets[seed][f]
            r = probe(train_x[row_of[idx]], data["train"].labels[idx], val_x, data["val"].labels, test_x,
                      data["test"].labels, data.task, seed)
            runs.append({"fraction": f, "seed": seed, "n": len(idx), "auc": r["auc"], "acc": r["acc"], "C": r["C"]})
    out = {}
    for f in fractions:
        key = f"{f * 100:g}".replace(".", "_")
        out[f"auc_{key}"] = float(np.mean([r["auc"] for r in runs if r["fraction"] == f]))
        out[f"acc_{key}"] = float(np.mean([r["acc"] for r in runs if r["fraction"] == f]))
        out[f"auc_{key}_std"] = float(np.std([r["auc"] for r in runs if r["fraction"] == f]))
    out["runs"] = runs
    return out


def neighbour_agreement(encoder, data, k: int = 5, gallery_size: int = 2000, seed: int = 0):
    """Each test image's k nearest training images (cosine similarity of frozen features, a seeded gallery
    of up to `gallery_size` training images): the fraction of neighbours with the query's label (chance:
    the classes' shares), and the neighbour indices for the picture."""
    rng = np.random.default_rng(seed)
    n = len(data["train"].labels)
    gallery = np.sort(rng.choice(n, min(n, gallery_size), replace=False))
    g = extract_features(encoder, data["train"].images[gallery])
    q = extract_features(encoder, data["test"].images)
    g /= np.linalg.norm(g, axis=1, keepdims=True) + 1e-12
    q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
    nearest = np.argsort(-(q @ g.T), axis=1)[:, :k]
    labels = data["train"].labels[gallery][nearest]
    agree = float(np.mean(labels == data["test"].labels[:, None]))
    return agree, gallery[nearest]


def draw_neighbours(path: Path, name: str, data, neighbours: dict, queries: int = 6) -> Path:
    """One row per (query, arm): a test image, then its nearest training images; a neighbour's frame is
    green when its label is the query's, red when not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(1)
    picks = np.sort(rng.choice(len(data["test"].labels), queries, replace=False))
    arms = list(neighbours)
    k = next(iter(neighbours.values()))[1].shape[1]
    fig, axes = plt.subplots(queries * len(arms), k + 1, figsize=(1.1 * (k + 1), 1.1 * queries * len(arms)),
                             squeeze=False)
    for qi, query in enumerate(picks):
        for ai, arm in enumerate(arms):
            row = axes[qi * len(arms) + ai]
            row[0].imshow(data["test"].images[query, 0], cmap="gray", vmin=0, vmax=1)
            row[0].set_ylabel(f"{arm}\nagree {neighbours[arm][0]:.2f}" if qi == 0 else arm, fontsize=6)
            row[0].set_title(f"test {query}, y={data['test'].labels[query]}" if ai == 0 else "", fontsize=6)
            for j, idx in enumerate(neighbours[arm][1][query]):
                ax = row[j + 1]
                ax.imshow(data["train"].images[idx, 0], cmap="gray", vmin=0, vmax=1)
                same = data["train"].labels[idx] == data["test"].labels[query]
                for spine in ax.spines.values():
                    spine.set_color("tab:green" if same else "tab:red")
                    spine.set_linewidth(2)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"{name}: each arm's {k} nearest training images\n(frozen features, cosine); agree = share of\n"
                 f"neighbours with the query's label over all test images", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the pretraining arms

def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return proc.stdout


def pretrain_medswav(npz: Path, modality: str, budget: float, work: Path, threads: int,
                     flags: tuple[str, ...] = ()) -> dict:
    import torch

    from train.config import load_config
    from train.export import export_backbone, load_backbone
    from train.main import main as train_main

    dataset = work / "dataset"
    args = ["--config", str(MEDSWAV_CONFIG), "--data", str(dataset), "--out", str(work / "pretrain"),
            "--max-seconds", str(budget), "--resume", "", "--no-tensorboard", "--num-workers", str(threads), *flags]
    config = load_config(args)
    if not (dataset / DATASET_JSON).exists():
        _run([sys.executable, "-m", "ingest", str(npz), "--modality", modality, "--out", str(dataset),
              "--workers", str(threads), "--no-progress", "--salt", "medswav-representation-benchmark"], "ingest")
        # Band energies measured at the sizes the recipe rescales to (they depend on the image size).
        lo, hi = config.augment.size_range
        _run([sys.executable, "-m", "augment_dali.stats", str(dataset), "--min-size", str(lo), "--max-size", str(hi),
              "--samples", "1000"], "augment_dali.stats")
    batch = config.batch_size
    torch.set_num_threads(threads)
    cpu_start = time.process_time()
    result = train_main(args)
    cpu_s = time.process_time() - cpu_start  # DALI's threads included; so is the loader's setup
    export_backbone(work / "pretrain" / "checkpoint.pt", work / "backbone.pt")
    steps = len(result["losses"])
    return {"encoder": load_backbone(work / "backbone.pt", "resnet18"), "steps": steps,
            "seconds": result["seconds"], "images_per_s": steps * batch / result["seconds"], "cpu_s": cpu_s,
            "first_loss": result["losses"][0], "last_loss": float(np.mean(result["losses"][-10:])),
            **code_health(work / "pretrain" / "metrics.jsonl")}


def code_health(metrics_jsonl: Path, last: int = 3) -> dict:
    """Mean code entropy and prototype usage (train.swav.code_statistics, per modality, averaged) over the
    last `last` logged rows of a run: near 0 is collapse onto few prototypes."""
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()][-last:]
    out = {}
    for key in ("code_entropy", "proto_usage"):
        values = [v for r in rows for k, v in r.items() if k.startswith(key + "/")]
        out[key] = float(np.mean(values)) if values else None
    return out


def check_peer_env() -> Path:
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"the peer environment {PEER_PYTHON} is missing: run `make bench-peer-env` (it holds "
                           f"torch 2.14.1 + torchvision 0.29.1 + lightly; medswav's own torch has no matching "
                           f"torchvision) or set MEDSWAV_PEER_PYTHON")
    return PEER_PYTHON


def pretrain_peer(method: str, npz: Path, budget: float, work: Path, threads: int) -> dict:
    from train.export import load_backbone

    out = work / f"{method}_backbone.pt"
    stdout = _run([str(check_peer_env()), "-m", "benchmarks.peer_ssl", method, "--data", str(npz), "--budget",
                   str(budget), "--out", str(out), "--threads", str(threads)], f"lightly {method}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"encoder": load_backbone(out, "resnet18"), **{k: summary[k] for k in
            ("steps", "seconds", "images_per_s", "cpu_s", "first_loss", "last_loss")}, "peer_torch": summary["torch"]}


def random_encoder(seed: int = 0):
    from train.downstream.finetune import build_encoder

    return build_encoder("resnet18", None, seed)


def parse_data(spec: str | None) -> list[tuple[Path, str]]:
    items = spec.split(",") if spec else [str(SHARED / "medmnist" / n) for n in DEFAULT_DATA]
    out = []
    for item in items:
        path, _, modality = item.partition(":")
        path = Path(path)
        modality = modality or MODALITY_OF.get(path.stem.lower())
        if modality is None:
            raise ValueError(f"{path}: unknown MedMNIST set, give its modality as {path}:ct|mr|xr|us")
        if not path.exists():
            raise ValueError(f"{path}: no such file (set MEDSWAV_SHARED_DATA or give --data)")
        out.append((path, modality))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.epilog = ("exit codes: 0 all arms measured; 1 an arm failed (the others' figures are still written); "
                "2 bad arguments or no peer environment (make bench-peer-env)")
    p.add_argument("--data", help="comma-separated MedMNIST-layout .npz files, each optionally :MODALITY "
                                  "(default: pneumoniamnist, breastmnist from ../shared/data/medmnist)")
    p.add_argument("--budget", type=float, help="wall-clock seconds of pretraining per arm and data set "
                                                "(default 240; --quick: 15)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"arms to run, comma-separated (default all: {','.join(ARMS)})")
    p.add_argument("--seeds", type=int, help="probe seeds (label subsets) per fraction (default 20: BreastMNIST's 1 %% "
                                             "is 5 labelled images, and a mean of 3 moves by +-0.035 AUC; --quick: 1)")
    p.add_argument("--threads", type=int, default=2, help="cores each arm may use: torch threads, DALI threads (default 2)")
    p.add_argument("--medswav-flags", default="", metavar="FLAGS",
                   help="extra `python -m train` flags for the medswav arm, for ablations, e.g. "
                        "\"--augment.num-crops 2,6 --base-lr 0.3\"; one flag alone needs the = form, "
                        "--medswav-flags=--no-augment.energy-bands (default: none, the config as it is)")
    p.add_argument("--pictures", type=Path, metavar="DIR",
                   help="also draw each data set's nearest neighbours per arm to DIR/neighbours_NAME.png")
    p.add_argument("--work", type=Path, help="folder for datasets, runs and backbones, kept (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    budget = args.budget or (15.0 if args.quick else 240.0)
    seeds = tuple(range(args.seeds or (1 if args.quick else 20)))
    arms = [a for a in args.arms.split(",") if a]
    medswav_flags = tuple(shlex.split(args.medswav_flags))
    unknown = set(arms) - set(ARMS)
    try:
        if unknown:
            raise ValueError(f"unknown arms {sorted(unknown)}: choose from {','.join(ARMS)}")
        data_sets = parse_data(args.data)
        if args.quick and not args.data:
            data_sets = data_sets[-1:]  # BreastMNIST: the smallest
        if any(a.startswith("lightly") for a in arms):
            check_peer_env()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from train.downstream.data import load_npz

    torch.set_num_threads(args.threads)
    work_root = args.work or Path(tempfile.mkdtemp(prefix="medswav-repr-"))
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}; budget {budget:g} s per arm", flush=True)
    figures, rows, failed = {}, [], []
    for npz, modality in data_sets:
        name = npz.stem
        data = load_npz(npz)  # medswav's scaling (the default normalisation, which the recipe keeps)
        # the lightly arms' scaling: uint8 / 255
        data_255 = load_npz(npz, window=(0, 255)) if any(a.startswith("lightly") for a in arms) else None
        figures[name], neighbours = {}, {}
        for arm in arms:
            work = work_root / name
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            print(f"[{name}] {arm}: pretraining for {budget:g} s ...", flush=True)
            try:
                if arm == "medswav":
                    pre = pretrain_medswav(npz, modality, budget, work, args.threads, medswav_flags)
                elif arm == "random":
                    pre = {"encoder": random_encoder(0), "steps": 0, "seconds": 0.0, "images_per_s": None}
                else:
                    pre = pretrain_peer(arm.split("_", 1)[1], npz, budget, work, args.threads)
            except (RuntimeError, TrainError, SystemExit) as e:  # one arm's failure leaves the others' figures
                print(f"error: [{name}] {arm}: {e}", file=sys.stderr, flush=True)
                figures[name][arm] = {"error": str(e)[:2000]}
                failed.append(f"{name}/{arm}")
                continue
            encoder = pre.pop("encoder")
            inputs = data_255 if arm.startswith("lightly") else data
            result = {**evaluate_encoder(encoder, inputs, seeds), **pre, "wall_s": time.perf_counter() - t0}
            if data.task != "multilabel":
                neighbours[arm] = neighbour_agreement(encoder, inputs)
                result["knn5_agree"] = neighbours[arm][0]
            figures[name][arm] = result
            rows.append({"data": name, "arm": arm, **{k: result.get(k) for k in
                         ("auc_10", "auc_1", "acc_10", "acc_1", "knn5_agree", "images_per_s", "steps", "cpu_s")}})
            print(f"[{name}] {arm}: auc_10 {result['auc_10']:.3f} auc_1 {result['auc_1']:.3f} "
                  f"acc_10 {result['acc_10']:.3f} acc_1 {result['acc_1']:.3f}", flush=True)
        if args.pictures and neighbours:
            print(f"picture: {draw_neighbours(args.pictures / f'neighbours_{name}.png', name, data, neighbours)}")
    print_table(f"Linear probe, frozen features, {len(seeds)} seed(s); pretraining {budget:g} s per arm",
                rows, ["data", "arm", "auc_10", "auc_1", "acc_10", "acc_1", "knn5_agree", "images_per_s", "steps", "cpu_s"])
    settings = {"budget_s": budget, "seeds": len(seeds), "threads": args.threads, "fractions": list(FRACTIONS),
                "c_grid": list(C_GRID), "medswav_config": str(MEDSWAV_CONFIG.relative_to(REPO)),
                "medswav_flags": list(medswav_flags),
                "data": [str(p) for p, _ in data_sets], "load_average": list(os.getloadavg())}
    write_json(args.json, "representation", {**figures, "machine_detail": machine()}, settings)
    if args.work is None:  # the temporary folder holds the ingested datasets and runs: hundreds of MB
        shutil.rmtree(work_root, ignore_errors=True)
    if failed:
        print(f"error: arms that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
