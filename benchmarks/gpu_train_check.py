"""Stage `ddp` of `make gpu-check`, torch only: the trainer as torchrun starts it, one process.

    python -m benchmarks.gpu_train_check --out DIR [--device auto|cuda|cpu] [--json PATH]

Three runs of `python -m train` on synthetic crops with torchrun's environment (RANK=0,
WORLD_SIZE=1): a process group (NCCL on a GPU, gloo on the CPU), DDP, SyncBatchNorm, bf16 autocast,
channels_last, the SwAV queue filling in epoch 1 and used from epoch 2, prototype freezing:
  full:    6 steps;
  part:    the same, stopped after step 3 (checkpoint);
  resumed: `--resume auto` from that checkpoint to step 6.
The resumed run must equal the full one exactly (losses of steps 4-6, every parameter, the queue),
with --deterministic. If --deterministic is refused (a clear one-line error), the runs are repeated
without it and the differences are reported. Figures go to --json or $MEDSWAV_STAGE_JSON.
Exit codes: 0 exact resume (or --deterministic refused with a message and the runs ok), 1 a run
failed or the resume differs, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(flags: list[str], out: Path, log: Path) -> tuple[int, str, float]:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "train", *flags, "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    text = run.stdout + run.stderr
    with open(log, "a") as f:
        f.write(f"$ python -m train {' '.join(flags)} --out {out}\n{text}\n")
    return run.returncode, text, time.monotonic() - t0


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _last_row(out: Path) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def compare(full: Path, resumed: Path) -> dict:
    import torch
    a = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", map_location="cpu", weights_only=False)
    diffs = [float((x.float() - b["model"][k].float()).abs().max()) if x.is_floating_point()
             else float((x != b["model"][k]).any()) for k, x in a["model"].items()]
    same_params = all(torch.equal(x, b["model"][k]) for k, x in a["model"].items())
    same_queue = (a["queue"] is None and b["queue"] is None) or all(
        torch.equal(a["queue"][k], b["queue"][k]) for k in a["queue"])
    la, lb = _losses(full), _losses(resumed)
    steps = sorted(s for s in lb if s in la and s > 3)
    return {"exact": same_params and same_queue and all(la[s] == lb[s] for s in steps) and len(steps) == 3,
            "params_equal": same_params, "queue_equal": same_queue, "compared_steps": steps,
            "max_abs_param_diff": max(diffs), "max_abs_loss_diff": max(abs(la[s] - lb[s]) for s in steps) if steps else None,
            "step": b["step"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the three runs")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="where to run (default auto: cuda when visible)")
    p.add_argument("--arch", default=None, help="encoder (default resnet50 on a GPU, resnet18 on the CPU)")
    p.add_argument("--crop-sizes", default=None, help="crop sides, comma-separated (default 224,92 on a GPU, 32,16 on the CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 64 on a GPU, 4 on the CPU)")
    p.add_argument("--json", type=Path, default=os.environ.get("MEDSWAV_STAGE_JSON"), help="write the figures here (default $MEDSWAV_STAGE_JSON)")
    args = p.parse_args(argv)
    import torch
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    arch = args.arch or ("resnet50" if cuda else "resnet18")
    crops = args.crop_sizes or ("224,92" if cuda else "32,16")
    batch = args.batch_size or (64 if cuda else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.log"
    log.write_text("")
    # 2 steps per epoch, 3 epochs: the queue (2 batches long) fills in epoch 1 and is used in epoch 2.
    common = ["--synthetic", "--synthetic-steps", "2", "--epochs", "3", "--warmup-epochs", "1",
              "--arch", arch, "--crop-sizes", crops, "--num-crops", "2,6", "--batch-size", str(batch),
              "--num-prototypes", "3000", "--queue-length", str(2 * batch), "--epoch-queue-starts", "1",
              "--freeze-prototypes-steps", "2", "--checkpoint-every", "3", "--log-every", "1",
              "--device", "cuda" if cuda else "cpu", "--precision", "bf16", "--sync-bn", "--channels-last",
              "--no-tensorboard", "--seed", "3"]
    figures = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "arch": arch, "crop_sizes": crops,
               "batch_size": batch, "precision": "bf16" if cuda else "fp32 (CPU)"}
    deterministic = ["--deterministic"]
    code, text, seconds = _run(common + deterministic, args.out / "full", log)
    refusal = next((l for l in text.splitlines() if l.startswith("error:") and "deterministic" in l), None)
    if code and refusal:
        figures["deterministic"] = f"refused: {refusal}"
        deterministic = []
        code, text, seconds = _run(common, args.out / "full", log)
    else:
        figures["deterministic"] = "on" if code == 0 else "failed"
    setup = next((l for l in text.splitlines() if l.startswith("setup:")), "")
    figures.update(setup=setup.removeprefix("setup: "), full_run_s=round(seconds, 1))
    if code:
        figures["error"] = text.strip().splitlines()[-1] if text.strip() else f"exit code {code}"
        return _finish(args.json, figures, 1)
    figures["images_per_s_last_step"] = _last_row(args.out / "full").get("images_per_s")
    figures["queue_in_use_at_end"] = _last_row(args.out / "full").get("queue_in_use")
    for name, extra in (("part", ["--max-steps", "3"]), ("resumed", ["--resume", "auto"])):
        code, text, seconds = _run(common + deterministic + extra, args.out / "resumed", log)
        figures[f"{name}_run_s"] = round(seconds, 1)
        if code:
            figures["error"] = f"{name} run: " + (text.strip().splitlines()[-1] if text.strip() else f"exit {code}")
            return _finish(args.json, figures, 1)
    figures.update({f"resume_{k}": v for k, v in compare(args.out / "full", args.out / "resumed").items()})
    ok = figures["resume_exact"] or (not deterministic and figures["resume_step"] == 6)
    return _finish(args.json, figures, 0 if ok else 1)


def _finish(path, figures: dict, code: int) -> int:
    for k, v in figures.items():
        print(f"{k}: {v}")
    if path:
        Path(path).write_text(json.dumps(figures, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
