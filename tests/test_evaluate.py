"""Held-out evaluation: loss per source, and exact match of greedy answers in math formats."""

import pytest
import torch

from colm_server.data.collate import Collator
from colm_server.data.synthetic import synthetic_stream
from colm_server.model.tiny import build_tokenizer, tiny_model
from colm_stream.evaluate import exact_match, final_answer, source_losses


def test_source_losses_average_sources_equally_in_macro_and_records_in_micro():
    collator = Collator(build_tokenizer(), max_length=32)
    records = [r for _, r in zip(range(40), synthetic_stream(seed=1))]
    model = tiny_model("llama")
    got = source_losses(model, collator, records, batch_size=7)  # batches cut across sources
    one = source_losses(model, collator, records, batch_size=len(records))
    assert got.per_source == pytest.approx(one.per_source, rel=1e-5)
    assert set(got.per_source) == {r["source"] for r in records}
    counts = {s: sum(r["source"] == s for r in records) for s in got.per_source}
    micro = sum(got.per_source[s] * n for s, n in counts.items()) / len(records)
    assert got.micro == pytest.approx(micro, rel=1e-5)
    assert got.macro == pytest.approx(sum(got.per_source.values()) / len(counts), rel=1e-6)
    assert not model.training and torch.isfinite(torch.tensor(got.macro))


@pytest.mark.parametrize("text,answer", [
    ("5*8=40 pieces.\n#### 40", "40"),                                  # GSM8K
    ("worth $\\$10,\\!000 + \\$5,\\!000 = \\boxed{\\$15,\\!000}$.", "15000"),  # MATH, nested braces
    ("so $x=\\boxed{\\frac{1}{2}}$ and", "\\frac{1}{2}"),
    ("Final Answer:\nA\nThe answer is (A).", "A"),                          # multiple choice
    ("76 - 25 = 51\nThe answer is 51.", "51"),
    ("I think \\boxed{12", None),                                       # cut off mid-box
    ("no conclusion here", None),
])
def test_final_answer_reads_the_common_math_formats(text, answer):
    assert final_answer(text) == answer


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy completion of prompt i is ``answers[i]``."""

    def __init__(self, tokenizer, answers: list[str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.calls = tokenizer, answers, 0

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for i in range(len(input_ids)):
            text = self.answers[self.calls + i]
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens])
        self.calls += len(input_ids)
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_scores_greedy_answers_per_source():
    tokenizer = build_tokenizer()
    collator = Collator(tokenizer, max_length=64)
    records = [{"id": "a", "source": "s", "prompt": "1+1", "response": "#### 2"},
               {"id": "b", "source": "t", "prompt": "what is 2+2", "response": "The answer is 4."},
               {"id": "c", "source": "t", "prompt": "?", "response": "no final answer"},
               {"id": "d", "source": "t", "prompt": "3+3", "response": "#### 6"}]
    # Prompts of different lengths share a left-padded batch; only the new tokens are read.
    model = Scripted(tokenizer, ["so #### 2", "The answer is 5.", "\\boxed{6}"])
    got = exact_match(model, collator, records, max_new_tokens=20, batch_size=2)
    assert got == {"s": 1.0, "t": 0.5}  # record c has no reference answer: left out
    assert exact_match(tiny_model("llama"), collator, records[:1], max_new_tokens=3) == {"s": 0.0}
