"""LoRA fine-tuning with TRL's SFTTrainer on the coresets of the demo's selector.

    python examples/trl_sft.py --selector 127.0.0.1:50051 --output-dir demo-output/runs/sft
"""

import argparse

import torch
from trl import SFTConfig

from colm_client.hf import ColmArguments, ColmSFTTrainer
from colm_server.model.load import attach_lora, load_model, load_tokenizer

p = argparse.ArgumentParser()
p.add_argument("--selector", default="127.0.0.1:50051")
p.add_argument("--model", default="demo-output/base", help="the selector's model.source, as written there")
p.add_argument("--lora-r", type=int, default=16)  # the selector's model.lora_r, lora_alpha, lora_targets
p.add_argument("--lora-alpha", type=float, default=32.0)
p.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"])
p.add_argument("--steps", type=int, default=100)
p.add_argument("--push-every", type=int, default=10)
p.add_argument("--output-dir", default="demo-output/runs/sft")
p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
a = p.parse_args()

# attach_lora starts from the selector's own initial adapter (same seed).
model = attach_lora(load_model(a.model), r=a.lora_r, alpha=a.lora_alpha, targets=a.lora_targets)
args = SFTConfig(output_dir=a.output_dir, max_steps=a.steps, learning_rate=3e-3,
                 lr_scheduler_type="constant", logging_steps=10, save_steps=50, report_to="none",
                 use_cpu=not torch.cuda.is_available(),  # on CPU, torchrun ranks then use gloo
                 bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # TRL's default: bf16
colm = ColmArguments(selector=a.selector, model_source=a.model, push_every=a.push_every)
# The selector tokenises (chat template, loss on the response only): SFTTrainer takes its batches as they are.
trainer = ColmSFTTrainer(model=model, args=args, processing_class=load_tokenizer(a.model), colm=colm)
trainer.train(resume_from_checkpoint=a.resume or None)
trainer.save_model(f"{a.output_dir}/final")
