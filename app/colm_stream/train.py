"""`colm-train`: LoRA training on the selector's weighted coresets, one process or under torchrun.

    colm-train --model smollm2 --selector selector:50051 --steps 1000 --output-dir runs/a
    torchrun --nproc-per-node 8 -m colm_stream.train --model /models/llama --selector ... --steps 1000

Each rank pulls its own coreset stream; the loss is the coreset's weighted loss, normalised under DDP
by the step's total weight over all ranks (a rank's logged loss is then its share of the step's loss
times the world size: the mean over ranks is the step's weighted loss). Rank 0 saves
`checkpoint-<step>/` (adapter, optimizer, scheduler, step) and pushes the adapter to the selector.
Resume policy: a restart loads the latest complete checkpoint and rejoins the stream at its step + 1,
so steps trained after that checkpoint are trained again (the ledger then holds them twice; the last
entry per step is the one the final weights saw).
The model flags (--model, --num-layers, --lora-*) must give the selector's model settings: every
rank sends its model's settings when it joins, and the selector refuses one that differs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from colm_client import AdapterSync, CoresetStream, backward_micro_batches
from colm_client.channel import read_token
from colm_server.config import ServiceConfig
from colm_server.model.load import attach_lora, load_model
from colm_server.peak_memory import current_device_bytes, current_rss_bytes, peak_device_bytes, peak_rss_bytes
from colm_stream.model_flags import add_model_arguments
from colm_wire import contract

logger = logging.getLogger("colm_stream.train")


def parse_args(argv: list[str] | None = None, prog: str = "colm-train") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--selector", required=True, help="host:port of the selector service")
    p.add_argument("--job-id", default=ServiceConfig().job_id, help="the selector's service.job_id")
    p.add_argument("--token-file", default=None,
                   help="file holding the selector's shared token (default: $COLM_AUTH_TOKEN_FILE)")
    p.add_argument("--tls-ca", default=None,
                   help="CA certificate (PEM) of a TLS selector (default: $COLM_TLS_CA)")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="after warmup")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the frozen base model is loaded in bfloat16 and the forward runs under "
                   "bf16 autocast; the LoRA parameters, their gradients and the optimizer stay float32")
    p.add_argument("--micro-batch", type=int, default=0, metavar="M",
                   help="split each step's batch into micro-batches of at most M samples and accumulate the "
                   "gradient exactly (the memory of M, the gradient of the whole step)")
    p.add_argument("--output-dir", required=True, help="checkpoints and ledgers")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: end only)")
    p.add_argument("--push-every", type=int, default=0, help="push the adapter every N steps (0: never)")
    p.add_argument("--log-every", type=int, default=10, help="log every N steps")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the trainer's random streams (e.g. LoRA dropout); the LoRA initialisation "
                   "is attach_lora's seed 0, the selector's, so both start from the same adapter")
    p.add_argument("--rank", type=int, help="pull this rank's coresets as an independent process (no "
                   "process group; it keeps its own adapter and checkpoints); default: torchrun's")
    p.add_argument("--world-size", type=int, help="the job's ranks, with --rank")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="MINUTES",
                   help="timeout of the DDP process group's collectives (torchrun ranks): a rank waiting "
                   "this long for the others, e.g. while the selector restarts, fails the job (default 60)")
    args = p.parse_args(argv)
    if (args.rank is None) != (args.world_size is None):
        p.error("--rank and --world-size go together")
    if args.rank is not None and not 0 <= args.rank < args.world_size:
        p.error(f"--rank must be in [0, --world-size), got {args.rank} of {args.world_size}")
    if not args.dist_timeout > 0:
        p.error(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    if args.micro_batch < 0:
        p.error(f"--micro-batch must be >= 0 (0: the whole batch in one pass), got {args.micro_batch}")
    return args


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, ddp): from ``--rank/--world-size`` (an independent process, no
    process group) or from torchrun's environment (a process group when world > 1).

    Each process gets a GPU of its own when there are enough: under torchrun ``cuda:LOCAL_RANK``; with
    ``--rank`` ``cuda:LOCAL_RANK`` when a launcher sets it, else ``cuda:(rank mod the device count)``,
    so independent ranks on one machine spread over its GPUs (and share them when there are fewer).
    """
    cuda = torch.cuda.is_available()
    local = os.environ.get("LOCAL_RANK")
    if args.rank is not None:
        device = torch.device("cpu")
        if cuda:
            index = int(local) if local is not None else args.rank % torch.cuda.device_count()
            device = _cuda_device(index)
        return args.rank, args.world_size, device, False
    device = _cuda_device(int(local or 0)) if cuda else torch.device("cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=args.dist_timeout))
        return dist.get_rank(), dist.get_world_size(), device, True
    return 0, 1, device, False


def _cuda_device(index: int) -> torch.device:
    """``cuda:index``, made the current device (NCCL and the allocator default to it)."""
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"LOCAL_RANK {index} names no GPU: this machine has {count} "
                         "(run at most one rank per GPU under torchrun)")
    device = torch.device("cuda", index)
    torch.cuda.set_device(device)
    return device


def load_trainer_model(args: argparse.Namespace, device: torch.device,
                       adapter: Path | None = None) -> torch.nn.Module:
    """The frozen base in the compute dtype (bfloat16 with ``--precision bf16``) plus LoRA in float32,
    new (seed 0, as the selector's) or from ``adapter``, on ``device`` in train mode."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    base = load_model(args.model, dtype=dtype, device=device, num_layers=args.num_layers)
    peft_model = attach_lora(base, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                             targets=args.lora_targets, adapter=adapter)
    return peft_model.to(device).train()


def lr_lambda(args: argparse.Namespace):
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        if args.schedule == "constant":
            return 1.0
        progress = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint with the highest step; temp folders and half-written ones are skipped."""
    done = [d for d in output_dir.glob("checkpoint-*") if (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name.rsplit("-", 1)[1]), default=None)


def save_checkpoint(output_dir: Path, step: int, peft_model, optimizer, scheduler) -> Path:
    """Write to a temp folder, then rename: a crash never leaves a checkpoint that looks complete."""
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp / "adapter")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               tmp / "optim.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)  # a step retrained after a resume is saved again
    os.replace(tmp, final)
    return final


def train(args: argparse.Namespace) -> dict:
    """Train until `args.steps` optimizer steps are done; returns (and saves) this rank's summary.

    ``summary-rank<r>.json`` in the output dir: its device, last step and its loss, steps, samples and tokens
    trained by this process, its wall time, peak memory, and the memory held when the loop began
    (model, adapter and optimizer loaded), which tells what training itself adds.
    """
    rank, world, device, ddp = setup_distributed(args)
    owner = rank == 0 or not ddp  # writes checkpoints (under DDP rank 0 speaks for all)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # same random streams on every rank (the LoRA init is seeded apart)

    # Model: the frozen base plus LoRA, fresh or from the latest checkpoint.
    ckpt = latest_checkpoint(out)
    peft_model = load_trainer_model(args, device, ckpt / "adapter" if ckpt else None)
    model = DDP(peft_model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp else peft_model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    start = 0
    if ckpt is not None:
        state = torch.load(ckpt / "optim.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = json.loads((ckpt / "trainer_state.json").read_text())["step"] + 1
        if owner:
            logger.info("resuming from %s at step %d", ckpt, start)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else None

    token = read_token(args.token_file) if args.token_file else None  # None: from the environment
    # What this rank trains, checked by the selector at every join (a resumed adapter's own r/alpha).
    expected = contract.settings(args.model, args.num_layers, peft_model)
    stream = CoresetStream(args.selector, args.job_id, rank, world, start_step=start, token=token,
                           tls_ca=args.tls_ca, expected=expected)
    sync = AdapterSync(args.selector, peft_model, args.push_every, args.job_id, rank, token=token,
                       tls_ca=args.tls_ca) if args.push_every > 0 else None
    ledger = open(out / f"ledger-rank{rank}.jsonl", "a")
    run_id = uuid.uuid4().hex[:12]  # tells this process's entries from a crashed predecessor's
    start_rss, start_device = current_rss_bytes(), current_device_bytes()
    step, loss_value, tokens, t0 = start - 1, float("nan"), 0, time.perf_counter()
    started, trained, samples, all_tokens = t0, 0, 0, 0
    try:
        for batch in itertools.islice(stream, max(args.steps - start, 0)):
            step = batch.step
            # Under DDP the step's total weight over all ranks normalises, so the averaged gradient
            # is the whole step's weighted mean; an independent rank trains on its own share.
            loss = backward_micro_batches(
                model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device),
                batch.weights.to(device), micro_batch=args.micro_batch or None,
                total_weight=batch.step_weight_sum if ddp else None, world_size=world, autocast=autocast)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            lr = scheduler.get_last_lr()[0]  # the rate this step is taken with
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value = loss.item()
            step_tokens = int(batch.attention_mask.sum())
            tokens, all_tokens = tokens + step_tokens, all_tokens + step_tokens
            trained, samples = trained + 1, samples + len(batch.ids)
            ledger.write(json.dumps({"step": step, "start": start, "run": run_id, "ids": batch.ids,
                                     "sources": batch.sources,
                                     "weights": batch.weights.tolist(), "loss": loss_value}) + "\n")
            ledger.flush()
            if owner and (step + 1) % args.log_every == 0:
                elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
                logger.info("step %d | loss %.4f | lr %.2e | %.0f tok/s | param_version %d", step,
                            loss_value, lr, tokens / elapsed, batch.param_version)
                tokens = 0
            if sync is not None:
                sync.maybe_push(step)
            last = step + 1 == args.steps
            if owner and ((args.save_every and (step + 1) % args.save_every == 0) or last):
                save_checkpoint(out, step, peft_model, optimizer, scheduler)
    finally:
        stream.close()
        ledger.close()
        if sync is not None:
            sync.close()
        if ddp:
            dist.destroy_process_group()
    summary = {"rank": rank, "world_size": world, "device": str(device), "first_step": start, "step": step,
               "loss": loss_value, "steps": trained, "samples": samples, "tokens": all_tokens,
               "wall_seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes(),
               "peak_device_bytes": peak_device_bytes(), "start_rss_bytes": start_rss,
               "start_device_bytes": start_device}
    (out / f"summary-rank{rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None, prog: str = "colm-train") -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    result = train(parse_args(argv, prog))
    logger.info("done: step %d, loss %.4f", result["step"], result["loss"])


if __name__ == "__main__":
    main()
