"""`AdapterReceiver`: a push is checked chunk by chunk, refused at the first thing wrong, and never
holds more than the bytes its (valid) headers declare."""

from __future__ import annotations

import pytest
import torch

from colm_server.service.sync import AdapterError, AdapterReceiver, receive_adapter
from colm_wire.adapter import adapter_chunks
from colm_wire.proto import selector_pb2 as pb

SHAPES = {"a.lora_A.weight": torch.Size([4, 16]), "a.lora_B.weight": torch.Size([16, 4])}
NBYTES = 4 * 16 * 4  # each tensor in float32


def receiver(max_bytes: int = 1 << 20) -> AdapterReceiver:
    return AdapterReceiver(job_id="job", expected=SHAPES, max_bytes=max_bytes)


def header(name: str = "a.lora_A.weight", dtype: str = "float32", nbytes: int = NBYTES, **extra):
    return pb.AdapterChunk(header=pb.TensorHeader(name=name, shape=list(SHAPES[name]), dtype=dtype,
                                                  nbytes=nbytes), **extra)


def state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [7, 64, 1 << 20])
def test_a_valid_push_in_any_chunking_comes_out_exactly(dtype, chunk_bytes):
    sent = state(dtype)
    step, got = receive_adapter(adapter_chunks(sent, "job", 12, chunk_bytes=chunk_bytes), job_id="job",
                                expected=SHAPES, max_bytes=1 << 20)
    assert step == 12 and got.keys() == sent.keys()
    assert all(got[k].dtype == dtype and torch.equal(got[k], sent[k]) for k in sent)


def test_the_first_byte_beyond_the_header_is_refused_at_once():
    r = receiver()
    r.feed(header(job_id="job", data=bytes(NBYTES - 1)))
    r.feed(pb.AdapterChunk(data=bytes(1)))  # exactly what the header declares
    with pytest.raises(AdapterError, match=rf"a.lora_A.weight: more bytes than the {NBYTES}"):
        r.feed(pb.AdapterChunk(data=bytes(1)))
    r = receiver()
    r.feed(header(job_id="job"))
    with pytest.raises(AdapterError, match="more bytes than"):
        r.feed(pb.AdapterChunk(data=bytes(100 << 20)))  # 100 MiB in one chunk: refused, not kept
    assert [len(b) for b in r._buffers.values()] == [NBYTES]


@pytest.mark.parametrize("nbytes", [NBYTES - 1, NBYTES + 1, 2 * NBYTES, 2**63])
def test_a_header_whose_nbytes_disagrees_with_its_shape_and_dtype_is_refused_before_any_data(nbytes):
    expected = rf"header says {nbytes} bytes, a \[4, 16\] float32 tensor has 256"
    with pytest.raises(AdapterError, match=expected):
        receiver().feed(header(job_id="job", nbytes=nbytes))


def test_a_bfloat16_header_declares_two_bytes_an_element():
    r = receiver()
    r.feed(header(job_id="job", dtype="bfloat16", nbytes=NBYTES // 2))
    with pytest.raises(AdapterError, match="header says 256 bytes, a \\[4, 16\\] bfloat16 tensor has 128"):
        receiver().feed(header(job_id="job", dtype="bfloat16", nbytes=NBYTES))


def test_a_short_tensor_is_refused_when_the_next_header_comes():
    r = receiver()
    r.feed(header(job_id="job", data=bytes(NBYTES - 4)))
    expected = rf"a.lora_A.weight: {NBYTES - 4} bytes received, header says {NBYTES}"
    with pytest.raises(AdapterError, match=expected):
        r.feed(header("a.lora_B.weight"))


def test_headers_beyond_the_size_limit_are_refused_before_their_data():
    r = receiver(max_bytes=NBYTES + 10)
    r.feed(header(job_id="job", data=bytes(NBYTES)))
    with pytest.raises(AdapterError, match=f"exceeds the limit of {NBYTES + 10} bytes"):
        r.feed(header("a.lora_B.weight"))
    assert list(r._buffers) == ["a.lora_A.weight"]  # the refused tensor got no buffer


@pytest.mark.parametrize("corrupt", ["checksum", "nan", "missing", "truncated"])
def test_what_only_the_whole_push_shows_is_checked_at_the_end(corrupt):
    sent = state()
    if corrupt == "nan":
        sent["a.lora_B.weight"][1, 2] = float("nan")
    if corrupt == "missing":
        del sent["a.lora_B.weight"]
    chunks = list(adapter_chunks(sent, "job", 0, chunk_bytes=64))
    if corrupt == "checksum":
        chunks[2].data = bytes(len(chunks[2].data))
    if corrupt == "truncated":
        chunks[-2].sha256, chunks = chunks[-1].sha256, chunks[:-1]
    r = receiver()
    for chunk in chunks:
        r.feed(chunk)
    message = {"checksum": "checksum mismatch", "nan": "NaN or Inf", "missing": "missing tensors",
               "truncated": "bytes received, header says"}[corrupt]
    with pytest.raises(AdapterError, match=message):
        r.finish()
