"""`ColmTrainer` and `ColmSFTTrainer`: Hugging Face trainers on a real selector, one process.

One selector (world size 1) serves every test of this file: the first run selects and journals the
steps, every later run replays the same batches, so runs compare step by step with `colm-train`.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from colm_client.hf import ColmArguments, ColmTrainer
from colm_client.stream import CoresetStream, CoresetStreamError
from colm_server.model.load import attach_lora, load_model
from colm_server.model.tiny import build_tokenizer
from colm_server.service.server import SelectorServer
from colm_stream.train import parse_args, train
from test_service import make_config, take, target

STEPS, LR = 6, 1e-3
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def selector(tmp_path_factory):
    srv = SelectorServer(make_config(tmp_path_factory.mktemp("selector"), **{"service.world_size": 1}))
    srv.start()
    yield srv
    srv.stop(grace=1)


@pytest.fixture(scope="module")
def reference(selector, tmp_path_factory) -> Path:
    """`colm-train` on the job: fp32, constant LR, AdamW, clipping at 1; its output folder."""
    out = tmp_path_factory.mktemp("colm-train")
    train(parse_args(["--model", "tiny:llama", "--lora-r", "4", "--selector", target(selector),
                      "--steps", str(STEPS), "--lr", str(LR), "--schedule", "constant",
                      "--output-dir", str(out), "--log-every", "100"]))
    return out


def ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger-rank0.jsonl").read_text().splitlines()]


def final_adapter(out: Path) -> Path:
    """colm-train's adapter after its last step."""
    return out / f"checkpoint-{STEPS - 1}" / "adapter" / "adapter_model.safetensors"


def training_args(out: Path, cls=TrainingArguments, **extra):
    """The same optimisation as `colm-train`'s defaults above: AdamW (not fused), constant LR, clip 1."""
    settings = dict(output_dir=str(out), max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant",
                    optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                    save_strategy="no", report_to="none", disable_tqdm=True,
                    dataloader_pin_memory=False) | extra
    if cls is not TrainingArguments:  # TRL's configs default to bf16
        settings.setdefault("bf16", False)
    return cls(**settings)


def peft_model(alpha: float = 16.0):
    """The selector's model and LoRA: tiny llama, r=4, and the selector's initial adapter."""
    return attach_lora(load_model("tiny:llama"), r=4, alpha=alpha)


def colm(selector, **extra) -> ColmArguments:
    return ColmArguments(selector=target(selector), model_source="tiny:llama", **extra)


def assert_same_adapter(path: Path, model, atol: float = 1e-6) -> None:
    saved = load_file(path)
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(trained) > 0
    for name, value in saved.items():
        ours = trained[name.replace(".weight", ".default.weight")]
        torch.testing.assert_close(ours, value, atol=atol, rtol=1e-5)


def test_colm_trainer_matches_colm_train_step_by_step(selector, reference, tmp_path):
    model = peft_model()
    trainer = ColmTrainer(model=model, args=training_args(tmp_path), colm=colm(selector))
    trainer.train()
    ours, theirs = ledger(tmp_path), ledger(reference)
    assert [e["step"] for e in ours] == list(range(STEPS))
    assert [e["ids"] for e in ours] == [e["ids"] for e in theirs]
    assert [e["loss"] for e in ours] == pytest.approx([e["loss"] for e in theirs], abs=1e-5)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([e["loss"] for e in theirs], abs=1e-5)  # the Trainer did not rescale it
    assert_same_adapter(final_adapter(reference), model)


def test_sft_trainer_gives_the_same_losses_without_tokenising(selector, reference, tmp_path, monkeypatch):
    from trl import SFTConfig

    from colm_client.hf import ColmSFTTrainer

    tokenizer = build_tokenizer()
    trainer = ColmSFTTrainer(model=peft_model(), args=training_args(tmp_path, SFTConfig), colm=colm(selector),
                             processing_class=tokenizer)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the stream's batches come tokenised: nothing is tokenised while training")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenising)
    monkeypatch.setattr(type(tokenizer), "apply_chat_template", no_tokenising)
    trainer.train()
    assert [e["loss"] for e in ledger(tmp_path)] == pytest.approx([e["loss"] for e in ledger(reference)],
                                                                  abs=1e-5)


def test_micro_batches_give_the_one_pass_losses(selector, reference, tmp_path):
    model = peft_model()
    ColmTrainer(model=model, args=training_args(tmp_path), colm=colm(selector, micro_batch=3)).train()
    assert [e["loss"] for e in ledger(tmp_path)] == pytest.approx([e["loss"] for e in ledger(reference)],
                                                                  abs=1e-5)
    assert_same_adapter(final_adapter(reference), model, atol=1e-5)


class CrashAfter(TrainerCallback):
    """Stop the process-to-be after `steps` optimizer steps, as a killed trainer would."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.steps:
            raise RuntimeError("crash")


def test_resume_continues_with_the_next_steps_batch_and_reads_nothing_twice(selector, reference, tmp_path,
                                                                             monkeypatch):
    args = training_args(tmp_path, save_strategy="steps", save_steps=4)
    crashing = ColmTrainer(model=peft_model(), args=args, colm=colm(selector), callbacks=[CrashAfter(5)])
    with pytest.raises(RuntimeError, match="crash"):
        crashing.train()  # steps 0-4 trained, checkpoint-4 holds steps 0-3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]

    joins = []
    opened = CoresetStream._open
    monkeypatch.setattr(CoresetStream, "_open", lambda self, deadline: joins.append(self.next_step)
                        or opened(self, deadline))
    resumed = ColmTrainer(model=peft_model(), args=args, colm=colm(selector))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert joins == [4]  # rejoined at the checkpoint's step: no skipped batch was read
    entries, uninterrupted = ledger(tmp_path), ledger(reference)
    assert [e["step"] for e in entries] == [0, 1, 2, 3, 4, 4, 5]
    assert entries[5]["ids"] == entries[4]["ids"] == uninterrupted[4]["ids"]
    assert entries[6]["ids"] == uninterrupted[5]["ids"]
    # The same weights (checkpoint-4) on the same batch: the same loss as before the crash.
    assert entries[5]["loss"] == pytest.approx(entries[4]["loss"], abs=1e-5)
    assert [e["loss"] for e in entries[5:]] == pytest.approx([e["loss"] for e in uninterrupted[4:]], abs=1e-5)

    done = ColmTrainer(model=peft_model(), args=args, colm=colm(selector))
    done.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{STEPS}"))
    assert joins == [4] and len(ledger(tmp_path)) == 7  # nothing requested, nothing trained
    assert done.state.global_step == STEPS


def test_evaluation_is_the_trainers_own(selector, tmp_path):
    from colm_server.data.collate import Collator
    from conftest import make_records

    batch = Collator(build_tokenizer(), max_length=48)(make_records({"held-out": 4}, seed=9))
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}
    rows = [{k: v[i] for k, v in tensors.items()} for i in range(len(batch.ids))]
    model = peft_model()
    trainer = ColmTrainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=4),
                          colm=colm(selector), eval_dataset=rows)
    with torch.no_grad():  # the model's own token-mean loss over the batch
        expected = model(**tensors).loss
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_a_trainer_whose_lora_differs_from_the_selectors_is_refused_before_step_0(selector, tmp_path):
    trainer = ColmTrainer(model=peft_model(alpha=8.0), args=training_args(tmp_path), colm=colm(selector))
    with pytest.raises(CoresetStreamError, match=r"model\.lora_alpha: trainer has 8\.0, selector has 16\.0"):
        trainer.train()
    assert trainer.state.global_step == 0 and not (tmp_path / "ledger-rank0.jsonl").exists()


@pytest.mark.parametrize("setting,change", [
    ("args.max_steps", dict(max_steps=-1)),
    ("args.gradient_accumulation_steps", dict(gradient_accumulation_steps=2)),
    ("args.dataloader_num_workers", dict(dataloader_num_workers=1)),
    ("args.label_smoothing_factor", dict(label_smoothing_factor=0.1)),
])
def test_trainer_settings_that_coresets_cannot_honour_are_refused_by_name(setting, change, tmp_path):
    with pytest.raises(ValueError, match=setting):
        ColmTrainer(model=peft_model(), args=training_args(tmp_path, **change),
                    colm=ColmArguments(selector="127.0.0.1:1", model_source="tiny:llama"))


@pytest.mark.parametrize("setting", ["packing", "padding_free"])
def test_sft_packing_and_padding_free_are_refused_by_name(setting, tmp_path):
    from trl import SFTConfig

    from colm_client.hf import ColmSFTTrainer

    with pytest.raises(ValueError, match=f"args.{setting}"):
        ColmSFTTrainer(model=peft_model(), args=training_args(tmp_path, SFTConfig, **{setting: True}),
                       processing_class=build_tokenizer(),
                       colm=ColmArguments(selector="127.0.0.1:1", model_source="tiny:llama"))


def test_a_dataset_or_a_plain_model_is_refused(tmp_path):
    settings = ColmArguments(selector="127.0.0.1:1", model_source="tiny:llama")
    with pytest.raises(ValueError, match="train_dataset"):
        ColmTrainer(model=peft_model(), args=training_args(tmp_path), colm=settings, train_dataset=[{}])
    with pytest.raises(ValueError, match="PEFT"):
        ColmTrainer(model=load_model("tiny:llama"), args=training_args(tmp_path), colm=settings)


@pytest.mark.parametrize("script", ["hf_trainer.py", "trl_sft.py"])
def test_the_example_scripts_train_against_a_selector(script, selector, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [script, "--selector", target(selector), "--model", "tiny:llama",
                                      "--lora-r", "4", "--lora-alpha", "16",
                                      "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj",
                                      "--steps", "2", "--push-every", "2", "--output-dir", str(out)])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert [e["ids"] for e in ledger(out)] == [e["ids"] for e in ledger(reference)[:2]]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint-2").is_dir()


def test_the_readme_shows_both_example_scripts_as_they_are():
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme.split("### Train with Hugging Face Trainer or TRL\n", 1)[1].split("\n### ", 1)[0]
    for script in ("hf_trainer.py", "trl_sft.py"):
        assert f"`examples/{script}`:\n\n```python\n{(EXAMPLES / script).read_text()}```" in section


def test_importing_colm_client_imports_neither_transformers_nor_trl():
    import subprocess

    code = "import sys, colm_client; print('transformers' in sys.modules, 'trl' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_the_stream_is_this_ranks_journal(selector, reference):
    """What the trainers above replayed is what the selector journaled for rank 0."""
    journaled = take(CoresetStream(target(selector), rank=0, world_size=1, payload=False), STEPS)
    assert [b.ids for b in journaled] == [e["ids"] for e in ledger(reference)]
