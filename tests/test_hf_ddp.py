"""`ColmTrainer` under DDP: 2 ranks (gloo on CPU) against a real selector serving a 2-rank job.

One spawn of 2 processes runs, on each rank: `colm-train` for 6 steps, `ColmTrainer` replaying the
same journaled job for 6 steps (both pushing every 2 steps), then one `ColmTrainer` step whose
gradient (after DDP's all-reduce) rank 0 saves. The test then compares them.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colm_client.loss import weighted_loss
from colm_client.stream import CoresetStream
from colm_server.model.load import attach_lora, load_model
from colm_server.service.server import SelectorServer
from conftest import spawn_ranks
from test_service import make_config, take, take_all, target

W, STEPS, LR = 2, 6, 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peft_model():
    return attach_lora(load_model("tiny:llama"), r=4, alpha=16.0)


def run_rank(rank: int, selector: str, out: str, ports: list[int]) -> None:
    """One rank's three runs; what the test checks goes to files under ``out``."""
    from transformers import TrainerCallback, TrainingArguments

    from colm_client.hf import ColmArguments, ColmTrainer
    from colm_client.status import status
    from colm_stream.train import parse_args, train

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(W), LOCAL_WORLD_SIZE=str(W),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    out = Path(out)
    train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", selector, "--steps", str(STEPS),
                      "--lr", str(LR), "--schedule", "constant", "--output-dir", str(out / "colm-train"),
                      "--push-every", "2", "--log-every", "100"]))  # its own process group, destroyed after
    versions = [int(status(selector)["param_version"])]

    os.environ["MASTER_PORT"] = str(ports[1])  # the Trainer's process group (accelerate) is a new one
    colm = ColmArguments(selector=selector, model_source="tiny:llama", push_every=2)
    args = dict(max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch",
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to="none",
                disable_tqdm=True, use_cpu=True)  # use_cpu: accelerate's multi-process CPU mode (gloo)
    model = peft_model()
    trainer = ColmTrainer(model=model, args=TrainingArguments(output_dir=str(out / "hf"), **args), colm=colm)
    trainer.train()
    versions.append(int(status(selector)["param_version"]))
    if rank == 0:
        trainer.save_model(str(out / "hf" / "final"))
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (out / "rank0.json").write_text(json.dumps({"versions": versions, "logged": logged}))

    class SaveGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if rank == 0 and state.global_step == 1:  # step 1: the ranks' weight sums differ there
                torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                           out / "gradient.pt")

    # Two steps at learning rate 0: step 1's gradient is taken at the initial adapter, unclipped.
    unclipped = args | {"max_steps": 2, "max_grad_norm": 0.0, "learning_rate": 0.0}
    at_init = TrainingArguments(output_dir=str(out / "at-init"), **unclipped)
    no_push = ColmArguments(selector=selector, model_source="tiny:llama")
    ColmTrainer(model=peft_model(), args=at_init, colm=no_push, callbacks=[SaveGradient()]).train()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The selector (world size 2) and the ranks' output folder, after the runs."""
    tmp = tmp_path_factory.mktemp("ddp")
    srv = SelectorServer(make_config(tmp))
    srv.start()
    try:
        ports = [free_port(), free_port()]
        spawn_ranks(run_rank, (target(srv), str(tmp / "out"), ports), nprocs=W, timeout=240)
        yield srv, tmp / "out"
    finally:
        srv.stop(grace=1)


def ledger(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"ledger-rank{rank}.jsonl").read_text().splitlines()]


def test_each_rank_trains_exactly_its_journaled_ids_none_twice(job):
    srv, out = job
    journaled = [take(CoresetStream(target(srv), rank=r, world_size=W, payload=False), STEPS)
                 for r in range(W)]
    trained = []
    for rank in range(W):
        entries = ledger(out / "hf", rank)
        assert [e["step"] for e in entries] == list(range(STEPS))
        assert [e["ids"] for e in entries] == [b.ids for b in journaled[rank]]
        trained += [i for e in entries for i in e["ids"]]
    assert len(trained) == len(set(trained)) == W * STEPS * len(journaled[0][0].ids)


def test_colm_trainer_matches_colm_train_at_two_ranks(job):
    _, out = job
    for rank in range(W):
        ours, theirs = ledger(out / "hf", rank), ledger(out / "colm-train", rank)
        assert [e["ids"] for e in ours] == [e["ids"] for e in theirs]
        assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    # The Trainer logs the mean over ranks: each rank's loss is its share times the world size.
    ranks = [ledger(out / "colm-train", r) for r in range(W)]
    step_loss = [sum(e["loss"] for e in step) / W for step in zip(*ranks)]
    assert json.loads((out / "rank0.json").read_text())["logged"] == pytest.approx(step_loss, abs=1e-5)
    ours = load_file(out / "hf" / "final" / "adapter_model.safetensors")
    last = out / "colm-train" / f"checkpoint-{STEPS - 1}"
    theirs = load_file(last / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5)


def test_rank_0_alone_pushes_every_2_steps(job):
    _, out = job
    before, after = json.loads((out / "rank0.json").read_text())["versions"]
    assert before == 3  # colm-train's pushes after steps 1, 3, 5
    assert after - before == 3  # the Trainer's: 3 more, not 6 (rank 1 pushes nothing)


def test_ddp_gradient_is_exactly_the_whole_steps_weighted_gradient_with_unequal_rank_weights(job):
    srv, out = job
    step1 = [ranks[1] for ranks in take_all(srv, 2)]
    sums = [float(b.weights.sum()) for b in step1]
    total = step1[0].step_weight_sum
    assert total == pytest.approx(sum(sums), rel=1e-6)
    assert abs(sums[0] - sums[1]) > 0.05 * total  # unequal: normalising each rank by its own sum would differ

    def gradient(per_rank_normalised: bool) -> dict[str, torch.Tensor]:
        model = peft_model().train()
        for b in step1:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            norm = None if per_rank_normalised else total
            loss = weighted_loss(logits, b.labels, b.weights, total_weight=norm, world_size=1)
            (loss / W if per_rank_normalised else loss).backward()  # DDP's mean over ranks
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ddp, exact, biased = torch.load(out / "gradient.pt"), gradient(False), gradient(True)
    assert ddp.keys() == exact.keys() and ddp
    for name in ddp:
        torch.testing.assert_close(ddp[name], exact[name], atol=1e-6, rtol=1e-5)
    assert max((exact[n] - biased[n]).abs().max() for n in exact) > 1e-3
