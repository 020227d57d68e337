"""The training loop: SwAV with per-modality prototypes, queue, prototype freezing and hybrid supervision.

    python -m train --synthetic --arch resnet18 --device cpu ...            # one process
    torchrun --nnodes=N --nproc-per-node=G ... -m train --config FILE      # many

Read top to bottom: setup, model, optimiser + schedule, resume, loop (data -> forward -> codes and
loss -> backward -> freeze -> step -> log -> checkpoint).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint as ckpt
from . import determinism
from .config import Config, ConfigError, load_config, to_dict
from .data import Prefetcher, build_source, gather_data_positions
from .errors import CheckpointError, DataError, RunError, TrainError
from .metrics import MetricsLogger
from .models import SwAVModel
from .optim import LARS, lr_schedule, param_groups
from .swav import FeatureQueue, code_stats, modality_losses, supervised_loss


class NonFiniteLoss(RuntimeError):
    pass


def setup_distributed(cfg: Config):
    """Process group from torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK); none for a plain run.

    Under torchrun the group exists even for one process, so that one GPU runs the DDP + SyncBatchNorm
    code of a multi-GPU job (SyncBatchNorm with one process normalises like BatchNorm)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RunError("--device cuda but no CUDA device is visible")
    rank, world, local = 0, 1, 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return rank, world, device


def _gather_queue(queue: FeatureQueue | None, world: int):
    """Every process's queue (they differ), so that a resume restores all of them."""
    if queue is None:
        return None
    state = queue.state_dict()
    if world > 1:
        feats = [torch.empty_like(queue.features) for _ in range(world)]
        dist.all_gather(feats, queue.features)
        filled = [torch.empty_like(queue.filled.to(queue.features.device)) for _ in range(world)]
        dist.all_gather(filled, queue.filled.to(queue.features.device))
        state = {"features": torch.stack(feats).cpu(), "filled": torch.stack(filled).cpu()}
    else:
        state = {k: v[None] for k, v in state.items()}
    return state


def _budget_spent(elapsed: float, budget: float, world: int, device: torch.device) -> bool:
    """Whether the wall-clock budget is spent; several processes stop together (at rank 0's clock reading
    or any other's, whichever runs out first) so that no one waits in a collective the others left."""
    spent = torch.tensor(float(elapsed >= budget), device=device)
    if world > 1:
        dist.all_reduce(spent, op=dist.ReduceOp.MAX)
    return bool(spent.item())


def train(cfg: Config) -> dict:
    if cfg.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        reason = determinism.refusal(cfg, "cuda" if wants_cuda else "cpu")
        if reason:
            raise RunError(reason)
        try:
            determinism.prepare_environment("cuda" if wants_cuda else "cpu")
        except determinism.DeterminismError as e:
            raise RunError(str(e)) from None
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    out = Path(cfg.out)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # same initial weights on every process (DDP also broadcasts rank 0's)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    on_gpu = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if on_gpu else None
    # Fixed crop sizes: let cuDNN pick its fastest kernels; NHWC suits tensor cores in bf16/fp16.
    torch.backends.cudnn.benchmark = on_gpu and not cfg.deterministic
    channels_last = on_gpu and cfg.channels_last and not cfg.crop_depths

    # ---- data and model
    source = build_source(cfg, rank, world, device.type)
    n_mod = len(source.modalities)
    if cfg.batch_size % n_mod:
        raise DataError(f"batch size {cfg.batch_size} must be a multiple of the {n_mod} modalities")
    sub_batch = cfg.batch_size // n_mod
    num_labels = source.num_labels if cfg.beta > 0 else 0
    if cfg.beta > 0 and num_labels == 0:
        raise DataError("beta > 0 needs labels, but the data set has no label columns")
    model = SwAVModel(cfg.arch, n_mod, cfg.num_prototypes, cfg.feat_dim, cfg.hidden_dim, num_labels,
                      assigned_views=len(cfg.crops_for_assign)).to(device)
    if on_gpu and dist.is_initialized() and cfg.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last:  # single-channel inputs are NHWC already; the weights carry the format onwards
        model = model.to(memory_format=torch.channels_last)
    prototype_params = [p for p in model.prototypes.parameters()]

    # ---- optimiser and per-step schedule (precomputed: a resumed run reads the same numbers)
    optimizer = LARS(param_groups(model), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     trust_coefficient=cfg.lars_trust)
    steps_per_epoch = source.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    scale = cfg.batch_size * world / cfg.lr_ref_batch if cfg.lr_ref_batch else 1.0
    lrs = lr_schedule(cfg.base_lr * scale, cfg.final_lr * scale, total_steps,
                      round(cfg.warmup_epochs * steps_per_epoch), cfg.start_warmup * scale)
    stop_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    # Queue: queue_length per modality over all processes, a multiple of the sub-batch per process.
    q_len = cfg.queue_length // world
    q_len -= q_len % sub_batch
    queue = FeatureQueue(n_mod, len(cfg.crops_for_assign), q_len, cfg.feat_dim, device) if q_len > 0 else None

    # ---- resume
    step = 0
    if is_main:  # a save killed before its rename left its temporary: no save of this run is under way yet
        for stale in ckpt.remove_stale_temporaries(out / ckpt.CHECKPOINT_NAME):
            print(f"removed {stale}, left by an interrupted save", file=sys.stderr)
    resume_path = ckpt.resolve_resume(cfg.resume, out)
    if resume_path is not None:
        state = ckpt.load(resume_path)
        if state["arch"] != cfg.arch:
            raise CheckpointError(f"checkpoint {resume_path} is {state['arch']}, config asks for {cfg.arch}")
        if list(state["modalities"]) != list(source.modalities):
            raise CheckpointError(f"checkpoint {resume_path} has modalities {state['modalities']}, "
                             f"the data gives {source.modalities}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if queue is not None and state.get("queue") is not None:
            if state["queue"]["features"].shape[0] == world and state["queue"]["features"].shape[1:] == queue.features.shape:
                queue.load_state_dict({k: v[rank] for k, v in state["queue"].items()})
            elif is_main:
                print(f"warning: queue saved by {state['queue']['features'].shape[0]} processes; "
                      f"starting an empty queue on {world}", file=sys.stderr)
        ckpt.set_rng_state(state["rng"])
        step = state["step"]
        positions = state.get("data_positions")  # per rank, saved mid-epoch: continue there, no replay
        restored = positions is not None and len(positions) == world and hasattr(source, "restore_position")
        if restored:
            source.restore_position(step // steps_per_epoch, step % steps_per_epoch,
                                    positions[rank].numpy().tobytes())
        if is_main:
            print(f"resumed from {resume_path} at step {step} (epoch {step // steps_per_epoch}"
                  f"{', data position restored' if restored else ''})", flush=True)

    ddp = DDP(model, device_ids=[device.index] if on_gpu else None) if dist.is_initialized() else model
    log = MetricsLogger(out, is_main, cfg.tensorboard, resume_step=step)
    sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    log.console(f"medswav train: {cfg.arch}, {world} process(es) on {device.type}, modalities "
                f"{source.modalities}, batch {cfg.batch_size}x{world}, {steps_per_epoch} steps/epoch, "
                f"steps {step} -> {stop_step} of {total_steps}, K={cfg.num_prototypes}, queue {q_len}/process")
    log.console(f"setup: {'DDP over ' + dist.get_backend() if dist.is_initialized() else 'no process group'}, "
                f"SyncBatchNorm layers {sync_bn}, autocast {amp_dtype or 'off'}, "
                f"{'channels_last' if channels_last else 'contiguous'}, "
                f"deterministic {'on' if cfg.deterministic else 'off'}")

    def save(step: int) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLoss(f"non-finite parameters after step {step}: not saving over the last good "
                                f"checkpoint {out / ckpt.CHECKPOINT_NAME}")
        queue_state = _gather_queue(queue, world)   # collective: every process takes part
        positions = gather_data_positions(source, world) if step % steps_per_epoch else None  # collective
        if is_main:
            ckpt.save_atomic({
                "version": 1, "arch": cfg.arch, "config": to_dict(cfg), "step": step,
                "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "world_size": world, "modalities": source.modalities, "num_labels": num_labels,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "queue": queue_state, "rng": ckpt.rng_state(),
                "data_positions": positions,
                "normalisation": getattr(source, "normalisation", None),  # exported for downstream inputs
            }, out / ckpt.CHECKPOINT_NAME)
        if world > 1:
            dist.barrier()

    # ---- loop
    history = []
    window = {"data": 0.0, "total": 0.0, "n": 0}
    loop_start = time.perf_counter()
    out_of_time = False
    try:
        while step < stop_step and not out_of_time:
            epoch = step // steps_per_epoch
            batches = source.epoch_iter(epoch, step % steps_per_epoch)
            if on_gpu and not getattr(source, "prefetches", False):
                batches = Prefetcher(batches)
            batches = iter(batches)
            while step < stop_step:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    if step % steps_per_epoch:
                        raise DataError(f"the data source ended after {step % steps_per_epoch} of its "
                                         f"{steps_per_epoch} steps in epoch {epoch}")
                    break
                t_data = time.perf_counter() - t0

                for group in optimizer.param_groups:
                    group["lr"] = float(lrs[step])
                model.normalize_prototypes()
                crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    outputs = ddp(crops)

                # Codes and losses per modality, over that modality's rows only (fp32, outside autocast).
                fill_queue = epoch >= cfg.epoch_queue_starts
                log_now = is_main and (step % cfg.log_every == 0 or step + 1 == stop_step)
                losses_ss, _ = modality_losses(
                    outputs["scores"], outputs["z"], [p.weight for p in model.prototypes],
                    temperature=cfg.temperature, eps=cfg.epsilon, iterations=cfg.sinkhorn_iterations,
                    assigned=cfg.crops_for_assign, queue=queue, fill_queue=fill_queue)
                stats = {}
                if log_now:
                    for m, name in enumerate(source.modalities):
                        for k, v in code_stats(outputs["scores"][m][list(cfg.crops_for_assign)]).items():
                            stats[f"{k}/{name}"] = v
                        stats[f"loss_ss/{name}"] = losses_ss[m].item()
                loss_ss = torch.stack(losses_ss).sum()
                loss = cfg.alpha * loss_ss
                loss_sup = None
                if outputs["sup_logits"] is not None:
                    loss_sup = supervised_loss(outputs["sup_logits"], batch["label"].to(device), cfg.sup_loss)
                    loss = loss + cfg.beta * loss_sup

                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                finite = torch.isfinite(loss.detach()).float()
                if world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    raise NonFiniteLoss(
                        f"non-finite loss ({loss.item()}) at step {step}, epoch {epoch}: stopping without "
                        f"updating; the last good checkpoint is {out / ckpt.CHECKPOINT_NAME}. Usual causes: "
                        f"learning rate too high, fp16 overflow (use bf16), unnormalised inputs.")
                if step < cfg.freeze_prototypes_steps:
                    for p in prototype_params:
                        p.grad = None  # frozen prototypes: gradient dropped, so no update, decay or momentum
                scaler.step(optimizer)
                scaler.update()
                step += 1

                loss_value = loss.item()
                history.append(loss_value)
                t_step = time.perf_counter() - t0
                window["data"] += t_data
                window["total"] += t_step
                window["n"] += 1
                if log_now:
                    row = {"epoch": epoch, "loss": loss_value, "loss_ss": loss_ss.item(),
                           "lr": float(lrs[step - 1]),
                           "images_per_s": window["n"] * cfg.batch_size * world / window["total"],
                           "data_wait_fraction": window["data"] / window["total"],
                           "prototypes_frozen": int(step - 1 < cfg.freeze_prototypes_steps),
                           "queue_in_use": int(queue is not None and queue.full(0, 0)), **stats}
                    if loss_sup is not None:
                        row["loss_sup"] = loss_sup.item()
                    log.log(step, row)
                    entropy = " ".join(f"H[{n}]={stats.get(f'code_entropy/{n}', float('nan')):.2f}"
                                       for n in source.modalities)
                    log.console(f"step {step}/{stop_step} ep {epoch} loss {loss_value:.4f} lr {row['lr']:.2e} "
                                f"{row['images_per_s']:.1f} img/s wait {100 * row['data_wait_fraction']:.0f}% "
                                f"{entropy}")
                    window = {"data": 0.0, "total": 0.0, "n": 0}
                if cfg.max_seconds:
                    out_of_time = _budget_spent(time.perf_counter() - loop_start, cfg.max_seconds, world, device)
                if (step % cfg.checkpoint_every == 0 or step % steps_per_epoch == 0 or step == stop_step
                        or out_of_time):
                    save(step)
                if out_of_time:
                    log.console(f"time budget of {cfg.max_seconds:g} s spent: stopped at step {step}/{stop_step}")
                    break
    except NonFiniteLoss as e:
        raise RunError(str(e)) from None
    finally:
        log.close()
        if hasattr(source, "close"):
            source.close()
    # seconds: the loop's wall-clock time (setup excluded), over the len(losses) steps this call ran
    return {"step": step, "losses": history, "model": model, "seconds": time.perf_counter() - loop_start,
            "batches_replayed": getattr(source, "batches_replayed", 0)}


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(argv)
    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli(argv: list[str] | None = None) -> int:
    """The command line: a bad configuration is one line on stderr and exit status 2; a run that cannot
    go on (train.errors: data, checkpoint, device) one line and exit status 1."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
