"""`make gpu-check`: every GPU path of medswav in one run on a bare GPU machine (docs/GPU.md).

    python -m benchmarks.gpu_check [--out DIR] [--budget 480] [--only KEY,KEY]

Stages, each a subprocess with its own time limit (killed with its process group when it runs over);
a failing or killed stage does not stop the run:

  env        nvidia-smi, Python, torch, CUDA, nvcc and DALI versions
  dali       install the staged kit offline (benchmarks.gpu_kit assemble), or find DALI installed
  plugin     build the operator plug-in with nvcc (python -m augment_dali.build)
  harness    the DALI-free kernel harness, then its GPU checks under compute-sanitizer memcheck and
             racecheck (python -m augment_dali.harness --sanitizer; pass/fail/skip counts)
  pytest     pytest -m gpu over the test files that have gpu tests
  augment    DALI pipeline samples/s, GPU against CPU, batch 32 to 256 (benchmarks.gpu_augment)
  train_step SwAV step fed by the GPU pipeline: ResNet-50, 2 x 224 + 6 x 92, bf16, channels_last,
             with the data-wait fraction (benchmarks.train_step)
  ddp        torch only: one-process NCCL DDP + SyncBatchNorm, bf16 SwAV steps with the queue,
             checkpoint, exact resume, --deterministic (benchmarks.gpu_train_check)

Everything lands under --out (default $OUT, else build/gpu-check): summary.md, gpu_check.json and
logs/KEY.log. gpu_check.json: {"format", "started", "seconds", "budget_s", "gpu", "dali", "counts",
"stages": [{"key", "title", "status", "reason", "seconds", "limit_s", "returncode", "figures",
"log", "log_tail"}]}; status is ok, failed, timeout or skipped. A stage writes its figures as JSON to
$MEDSWAV_STAGE_JSON. The run stops starting stages when the budget (seconds) is spent.
Standard library only. Exit codes: 0 every stage ok or skipped for want of a GPU, 1 a stage failed
or timed out, 2 usage error.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMAT = 1
TAIL_LINES = 30
STATUSES = ("ok", "failed", "timeout", "skipped")
STAGE_KEYS = ("key", "title", "status", "reason", "seconds", "limit_s", "returncode", "figures", "log", "log_tail")


@dataclass
class Stage:
    key: str
    title: str
    limit_s: float
    command: list[str] | None = None         # None: not available on this checkout (reason says why)
    needs_gpu: bool = False
    needs_dali: bool = False
    unavailable: str = ""
    env: dict = field(default_factory=dict)   # added to the run's environment


def _python() -> str:
    return os.environ.get("PYTHON", sys.executable)


def _gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def default_stages(work: Path) -> list[Stage]:
    py = _python()
    dataset = str(work / "dataset")
    # Not importlib.find_spec: importing augment_dali loads DALI and the plug-in.
    harness = (REPO / "augment_dali" / "harness.py").exists() or (REPO / "augment_dali" / "harness" / "__main__.py").exists()
    return [
        Stage("env", "versions: nvidia-smi, Python, torch, CUDA, nvcc, DALI", 30,
              [py, "-m", "benchmarks.gpu_check", "--env-report"]),
        Stage("dali", "DALI from the staged kit (offline install) or already installed", 150,
              [py, "-m", "benchmarks.gpu_check", "--install-kit"]),
        Stage("plugin", "operator plug-in built with nvcc", 180,
              [py, "-m", "benchmarks.gpu_check", "--build-plugin"], needs_gpu=True, needs_dali=True),
        Stage("harness", "DALI-free kernel harness + compute-sanitizer memcheck/racecheck", 180,
              [py, "-m", "benchmarks.gpu_check", "--run-harness", str(work / "harness")] if harness else None,
              needs_gpu=True, unavailable="not available: augment_dali.harness is not in this checkout"),
        Stage("pytest", "pytest -m gpu", 180,
              [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", *_gpu_test_files()],
              needs_gpu=True, needs_dali=True),
        Stage("augment", "DALI pipeline samples/s, GPU vs CPU, batch 32..256", 150,
              [py, "-m", "benchmarks.gpu_augment", "--dataset", dataset, "--batch-sizes", "32,64,128,256"],
              needs_gpu=True, needs_dali=True),
        Stage("train_step", "SwAV step fed by the GPU pipeline (ResNet-50, bf16, channels_last)", 150,
              [py, "-m", "benchmarks.gpu_augment", "--dataset", dataset, "--then", "train_step"],
              needs_gpu=True, needs_dali=True),
        Stage("ddp", "torch only: NCCL DDP + SyncBN, bf16 SwAV + queue, checkpoint, exact resume, deterministic",
              150, [py, "-m", "benchmarks.gpu_train_check", "--out", str(work / "ddp")], needs_gpu=True),
    ]


def has_gpu(env: dict) -> bool:
    """A CUDA device torch can use (the check runs torch's own probe in a subprocess)."""
    try:
        run = subprocess.run([_python(), "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120, env=env)
        return run.returncode == 0 and int(run.stdout.split()[-1]) > 0
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError):
        return False


def has_dali(env: dict) -> bool:
    run = subprocess.run([_python(), "-c", "import nvidia.dali"], capture_output=True, env=env)
    return run.returncode == 0


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_stage(stage: Stage, out: Path, env: dict, limit: float) -> dict:
    """One stage in its own process group, killed at ``limit`` seconds; its record."""
    log = out / "logs" / f"{stage.key}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    figures_path = out / "stages" / f"{stage.key}.json"
    figures_path.parent.mkdir(parents=True, exist_ok=True)
    if figures_path.exists():
        figures_path.unlink()
    run_env = {**env, **stage.env, "MEDSWAV_STAGE_JSON": str(figures_path), "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(stage.command)}\n")
        f.flush()
        proc = subprocess.Popen(stage.command, cwd=REPO, env=run_env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else "failed"
            reason = "" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the stage and everything it started
            rc = proc.wait()
            status, reason = "timeout", f"killed after its limit of {limit:.0f} s"
    figures = {}
    if figures_path.exists():
        try:
            figures = json.loads(figures_path.read_text())
        except ValueError:
            figures = {"unreadable": str(figures_path)}
    if stage.key == "pytest":
        figures.update(pytest_counts(log.read_text(errors="replace")))
    return {"key": stage.key, "title": stage.title, "status": status, "reason": reason,
            "seconds": round(time.monotonic() - start, 2), "limit_s": round(limit, 1), "returncode": rc,
            "figures": figures, "log": str(log.relative_to(out)), "log_tail": _tail(log)}


def pytest_counts(text: str) -> dict:
    """passed/failed/skipped/error counts from pytest's last summary line."""
    lines = [l for l in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|errors|deselected)\b", l)]
    counts = {}
    if lines:
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1]):
            counts["error" if word.startswith("error") else word] = int(n)
    return counts


def _skip(stage: Stage, reason: str) -> dict:
    return {"key": stage.key, "title": stage.title, "status": "skipped", "reason": reason, "seconds": 0.0,
            "limit_s": stage.limit_s, "returncode": None, "figures": {}, "log": None, "log_tail": ""}


def run_stages(stages: list[Stage], out: Path, budget: float, env: dict | None = None,
               gpu: bool | None = None) -> dict:
    """Run the stages in order within ``budget`` seconds; write gpu_check.json and summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    gpu = has_gpu(env) if gpu is None else gpu
    dali = None
    records = []
    for stage in stages:
        left = budget - (time.monotonic() - t0)
        if stage.command is None:
            rec = _skip(stage, stage.unavailable or "not available")
        elif stage.needs_gpu and not gpu:
            rec = _skip(stage, "skipped: no GPU")
        elif left < 5:
            rec = _skip(stage, f"skipped: the run's budget of {budget:.0f} s is spent")
        else:
            if stage.needs_dali:
                dali = has_dali(env) if dali is None else dali
            if stage.needs_dali and not dali:
                rec = _skip(stage, "skipped: DALI is not available (the dali stage failed?)")
            else:
                rec = run_stage(stage, out, env, min(stage.limit_s, left))
        if stage.key == "dali" and rec["status"] == "ok":
            # What the kit installed is visible to every later stage.
            site, data = rec["figures"].get("site"), rec["figures"].get("data")
            if site:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
            if data and not env.get("MEDSWAV_SHARED_DATA"):
                env["MEDSWAV_SHARED_DATA"] = data
            dali = None   # probe again
        records.append(rec)
        print(f"[{rec['status']:>7}] {stage.key:<10} {rec['seconds']:7.1f} s  {rec['reason']}", flush=True)
    counts = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    report = {"format": FORMAT, "started": started, "seconds": round(time.monotonic() - t0, 2),
              "budget_s": budget, "gpu": gpu, "dali": bool(has_dali(env)) if records else None,
              "counts": counts, "stages": records}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(report))
    return report


def _short(figures: dict, limit: int = 6) -> str:
    items = []
    for k, v in figures.items():
        if isinstance(v, float):
            items.append(f"{k}={v:.4g}")
        elif isinstance(v, (int, str, bool)) and len(str(v)) <= 40:
            items.append(f"{k}={v}")
        if len(items) == limit:
            break
    return ", ".join(items)


def summary_markdown(report: dict) -> str:
    lines = [f"# medswav gpu-check ({report['started']})", "",
             f"GPU: {report['gpu']}; DALI: {report['dali']}; {report['seconds']:.0f} s of a {report['budget_s']:.0f} s "
             f"budget; " + ", ".join(f"{n} {s}" for s, n in report["counts"].items() if n), "",
             "| stage | status | seconds | limit | figures / reason |", "|---|---|---|---|---|"]
    for r in report["stages"]:
        note = r["reason"] if r["status"] != "ok" else _short(r["figures"])
        lines.append(f"| {r['key']} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} | {note} |")
    for r in report["stages"]:
        if r["status"] in ("failed", "timeout") and r["log_tail"]:
            lines += ["", f"## {r['key']}: {r['status']} ({r['reason']})", "", "```", r["log_tail"], "```"]
    return "\n".join(lines) + "\n"


# ---- stage bodies that live here (stdlib only) ------------------------------------------------------

def _write_stage_json(figures: dict) -> None:
    path = os.environ.get("MEDSWAV_STAGE_JSON")
    if path:
        Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def _cmd_output(cmd: list[str]) -> str:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (run.stdout or run.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({type(e).__name__})"


def env_report() -> int:
    import platform
    info = {"python": platform.python_version(), "cores": os.cpu_count(),
            "nvidia_smi": _cmd_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                       "--format=csv,noheader"]),
            "nvcc": _cmd_output([shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "--version"]).splitlines()[-1:] or [""]}
    info["nvcc"] = info["nvcc"][0]
    for name, probe in (("torch", "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"),
                        ("dali", "import nvidia.dali as d; print(d.__version__)"),
                        ("numpy", "import numpy; print(numpy.__version__)")):
        info[name] = _cmd_output([sys.executable, "-c", probe]).splitlines()[-1]
    for k, v in info.items():
        print(f"{k}: {v}")
    _write_stage_json(info)
    return 0


def build_plugin() -> int:
    """Stage `plugin`: `python -m augment_dali.build`, which must find nvcc (a plug-in built without
    CUDA would leave every GPU test skipped)."""
    run = subprocess.run([sys.executable, "-m", "augment_dali.build"], cwd=REPO)
    if run.returncode:
        return run.returncode
    stamp = REPO / "augment_dali" / "_lib" / "build_stamp.json"
    info = json.loads(stamp.read_text()) if stamp.exists() else {}
    _write_stage_json({"cuda": bool(info.get("cuda")), "dali_version": info.get("dali_version")})
    if not info.get("cuda"):
        print("error: the plug-in was built without CUDA: nvcc not found (set NVCC or CUDA_HOME)", file=sys.stderr)
        return 1
    return 0


def run_harness(out: Path) -> int:
    """Stage `harness`: augment_dali.harness (helper module of the plug-in, DALI-free) with the
    sanitizer reruns; its harness.json summarised as the stage's figures. Exit code: the harness's
    (0 all passed, 1 a check failed, 2 not built or run, 3 no CUDA device)."""
    cmd = [sys.executable, "-m", "augment_dali.harness", "--out", str(out), "--sanitizer",
           "--sanitizer-timeout", "60"]
    rc = subprocess.run(cmd, cwd=REPO).returncode
    report_path = out / "harness.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        checks = report.get("checks", [])
        figures = {s: sum(c.get("status") == s for c in checks) for s in ("pass", "fail", "skip")}
        figures.update(device=report.get("device"), exit_code=report.get("exit_code"),
                       failed=[c["name"] for c in checks if c.get("status") == "fail"],
                       report=str(report_path))
        _write_stage_json(figures)
    return rc


def install_kit() -> int:
    """Stage `dali`: a staged kit is assembled and installed (it also brings the test data); without
    one, DALI already importable is fine."""
    from benchmarks import gpu_kit
    stage_dir = gpu_kit.default_stage_dir()
    if (stage_dir / gpu_kit.MANIFEST).exists():
        try:
            where = gpu_kit.assemble(stage_dir)
        except gpu_kit.KitError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        probe = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"],
                               capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([where["site"], os.environ.get("PYTHONPATH", "")])})
        if probe.returncode:
            print(f"error: the kit installed, but nvidia.dali does not import: {probe.stderr.strip()[-500:]}",
                  file=sys.stderr)
            return 1
        figures = {"source": "kit", "dali": probe.stdout.strip(), "site": where["site"], "data": where["data"],
                   "wheels": len(where["wheels"])}
    else:
        probe = subprocess.run([sys.executable, "-c", "import nvidia.dali as d; print(d.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode:
            print(f"error: DALI is not installed and no kit is staged in {stage_dir} "
                  f"(stage it: python -m benchmarks.gpu_kit plan)", file=sys.stderr)
            return 1
        figures = {"source": "already installed", "dali": probe.stdout.strip()}
    print(", ".join(f"{k}: {v}" for k, v in figures.items()))
    _write_stage_json(figures)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
                                epilog="Exit codes: 0 all ok (or skipped: no GPU), 1 a stage failed or timed "
                                       "out, 2 usage error. See docs/GPU.md.")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "build" / "gpu-check"),
                   help="result folder (default $OUT, else build/gpu-check)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--only", default="", help="comma-separated stage keys to run (default all)")
    p.add_argument("--env-report", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--install-kit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-plugin", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-harness", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.env_report:
        return env_report()
    if args.install_kit:
        return install_kit()
    if args.build_plugin:
        return build_plugin()
    if args.run_harness:
        return run_harness(args.run_harness)
    work = Path(os.environ.get("MEDSWAV_GPU_STAGE", "/tmp/medswav-gpu-kit")) / "work"
    stages = default_stages(work)
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        unknown = sorted(set(keys) - {s.key for s in stages})
        if unknown:
            p.error(f"unknown stage(s) {unknown}; choose from {[s.key for s in stages]}")
        stages = [s for s in stages if s.key in keys]
    report = run_stages(stages, args.out, args.budget)
    print(f"summary: {args.out / 'summary.md'}; JSON: {args.out / 'gpu_check.json'}")
    return 1 if report["counts"]["failed"] or report["counts"]["timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
