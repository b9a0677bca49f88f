"""Packed text (`pack_text` → `ClipEmbedder` → `HfClipModel.get_packed_text_features`): the loss and every gradient
equal the padded, masked step; the training step reads nothing back from the device; the attention dispatch."""

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from hf_clip import ClipLoss, HfClipModel, clip_loss
from hf_clip.data.batches import device_text
from hf_clip.data.text_batching import pack_text
from hf_clip.modeling_layers import VARLEN_CAUSAL_KWARGS, uses_varlen_kernel, varlen_attn
from hf_clip.testing_utils import TINY_TEXT, random_text, tiny_config
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder, cached_accumulation_backward

EOS = TINY_TEXT["eos_token_id"]
# One caption fills the context; the last holds a second EOS (the tower pools at the first).
LENGTHS = [5, 16, 3, 9, 7]


def text_batch() -> dict[str, torch.Tensor]:
    text = random_text(len(LENGTHS), 16, LENGTHS)
    text["input_ids"][-1, 3] = EOS
    return text


def pixels(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(len(LENGTHS), 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def padded_masked_step(model: HfClipModel, pixel_values: torch.Tensor, text: dict) -> tuple[torch.Tensor, dict]:
    """The reference: transformers' CLIPModel call on the padded batch with its attention mask."""
    model.zero_grad(set_to_none=True)
    loss = model(pixel_values=pixel_values, return_loss=True, **text).loss
    loss.backward()
    return loss.detach(), gradients(model)


def packed_step(model: HfClipModel, pixel_values: torch.Tensor, text: dict) -> tuple[torch.Tensor, dict]:
    """The training path's embeddings (`device_text` → `ClipEmbedder`), scored by the same `clip_loss`."""
    model.zero_grad(set_to_none=True)
    inputs = ClipEmbedder(model)(pixel_values, **device_text(text, torch.device("cpu")))
    loss = clip_loss(inputs.logit_scale * inputs.text_embeds @ inputs.image_embeds.t())
    loss.backward()
    return loss.detach(), gradients(model)


# As tests/data/test_text_batching.py: float64, so only summation order separates the two paths; eager attention takes
# its softmax in float32, which bounds its agreement at float32 rounding.
TOLERANCE = {"sdpa": {"rtol": 0.0, "atol": 1e-10}, "eager": {"rtol": 1e-6, "atol": 1e-5}}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_step_equals_the_padded_masked_step_in_float64(attn_implementation, checkpointing):
    torch.manual_seed(0)
    model = HfClipModel._from_config(tiny_config(), attn_implementation=attn_implementation).double().train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    text, pixel_values = text_batch(), pixels(torch.float64)
    reference_loss, reference_grads = padded_masked_step(model, pixel_values, text)
    loss, grads = packed_step(model, pixel_values, text)
    tolerance = TOLERANCE[attn_implementation]
    torch.testing.assert_close(loss, reference_loss, **tolerance)
    assert grads.keys() == reference_grads.keys() == dict(model.named_parameters()).keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], **tolerance, msg=name)


def test_packed_training_step_equals_the_padded_masked_step_in_float32():
    """`ClipObjective` with `ClipLoss` as the loop runs it, at torch.testing's float32 tolerances."""
    torch.manual_seed(0)
    model = HfClipModel._from_config(tiny_config(), attn_implementation="sdpa").train()
    embedder, text, pixel_values = ClipEmbedder(model), text_batch(), pixels()
    reference = ClipLoss()(**embedder(pixel_values, **text).arguments())  # padded, with the attention mask
    reference.backward()
    reference_grads = gradients(model)
    model.zero_grad(set_to_none=True)
    objective = ClipObjective(embedder, ClipLoss())
    loss = objective({"pixel_values": pixel_values, **device_text(text, torch.device("cpu"))}).loss
    loss.backward()
    torch.testing.assert_close(loss, reference)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


def test_packed_features_are_the_padded_pooler_output():
    torch.manual_seed(0)
    model = HfClipModel(tiny_config()).eval()
    text = text_batch()
    with torch.no_grad():
        expected = model.get_text_features(**text).pooler_output
        packed = model.get_packed_text_features(*pack_text(text["input_ids"], text["attention_mask"]))
    torch.testing.assert_close(packed, expected)
    # Pooled at the first EOS: with the early EOS gone, the last caption's embedding changes.
    text["input_ids"][-1, 3] = 1
    with torch.no_grad():
        later_eos = model.get_packed_text_features(*pack_text(text["input_ids"], text["attention_mask"]))
    assert (later_eos[-1] - packed[-1]).abs().max() > 1e-3
    torch.testing.assert_close(later_eos[:-1], packed[:-1])


def test_cached_accumulation_of_packed_micro_batches_equals_one_large_batch():
    torch.manual_seed(0)
    embedder = ClipEmbedder(HfClipModel(tiny_config())).double()
    text = random_text(6, 16, [4, 16, 7, 2, 11, 9])
    pixel_values = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    objective = ClipObjective(embedder, ClipLoss())
    reference = objective({"pixel_values": pixel_values, **device_text(text, torch.device("cpu"))}).loss
    reference.backward()
    reference_grads = gradients(embedder)
    embedder.zero_grad(set_to_none=True)
    micro_batches = [
        {"pixel_values": pixel_values[rows], **device_text({k: v[rows] for k, v in text.items()}, torch.device("cpu"))}
        for rows in (slice(0, 3), slice(3, 6))
    ]
    loss = cached_accumulation_backward(objective, micro_batches)
    torch.testing.assert_close(loss, reference.detach(), atol=1e-12, rtol=0)
    for name, grad in gradients(embedder).items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-10, rtol=0, msg=name)


# --- no value read back from the device in a training step ------------------------------------------------------

ATEN = torch.ops.aten
# Operations that need a tensor's values on the host: on CUDA each one synchronises with the device.
VALUE_READS = {ATEN._local_scalar_dense.default, ATEN.nonzero.default, ATEN.masked_select.default, ATEN.equal.default}


class _DispatchReads(TorchDispatchMode):
    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func in (ATEN.index.Tensor, ATEN.index_put.default, ATEN.index_put_.default) and any(
            index is not None and index.dtype == torch.bool for index in args[1]
        )
        if func in VALUE_READS or boolean_index:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


class _FunctionReads(TorchFunctionMode):
    """`tolist` and `numpy` read CPU tensors without dispatching an operation."""

    def __init__(self, reads: list[str]):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads() -> Iterator[list[str]]:
    """Records every read of tensor values by the host (forward and backward) inside the block."""
    reads: list[str] = []
    with _FunctionReads(reads), _DispatchReads(reads):
        yield reads


def test_the_recorder_sees_host_reads():
    tensor = torch.arange(4)
    with host_reads() as reads:
        assert bool(tensor.any())
        assert tensor.tolist() == [0, 1, 2, 3]
        assert len(tensor[tensor > 1]) == 2
        assert int(tensor.sum()) == 6
    assert len(reads) == 4, reads


@pytest.mark.parametrize("accumulation", ["plain", "cached"])
def test_training_steps_read_nothing_back_after_the_first_batch(accumulation):
    torch.manual_seed(0)
    objective = ClipObjective(ClipEmbedder(HfClipModel(tiny_config()).train()), ClipLoss())
    batch = {"pixel_values": pixels(), **device_text(text_batch(), torch.device("cpu"))}

    def step() -> None:
        if accumulation == "plain":
            objective(batch).loss.backward()
        else:
            cached_accumulation_backward(objective, [batch, batch])

    with host_reads() as first:
        step()
    assert first == ["aten._local_scalar_dense.default"]  # the packed text's check, once per run
    for _ in range(2):
        with host_reads() as reads:
            step()
        assert reads == []
    # The padded path checks its input on every call (clear errors for users), so it is not the training path.
    padded = {"pixel_values": batch["pixel_values"], **text_batch()}
    with host_reads() as reads:
        objective(padded).loss.backward()
    assert reads


def test_first_packed_batch_is_checked():
    model = HfClipModel(tiny_config())
    text = text_batch()
    bad_id = dict(text, input_ids=text["input_ids"].clone())
    bad_id["input_ids"][0, 1] = TINY_TEXT["vocab_size"]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ClipEmbedder(model)(**device_text(bad_id, torch.device("cpu")))
    no_eos = dict(text, input_ids=text["input_ids"].clone())
    no_eos["input_ids"][2, 2] = 1  # row 2's only EOS (3 tokens)
    with pytest.raises(ValueError, match=r"rows \[2\] contain no attended end-of-text token"):
        ClipEmbedder(model)(**device_text(no_eos, torch.device("cpu")))
    packed = device_text(text, torch.device("cpu"))
    with pytest.raises(ValueError, match="position_ids"):
        ClipEmbedder(model)(input_ids=packed["input_ids"], cu_seqlens=packed["cu_seqlens"])


# --- attention dispatch ---------------------------------------------------------------------------------------


def test_varlen_kernel_only_on_cuda_or_meta_in_half_precision():
    assert varlen_attn is not None, "torch >= 2.10 ships torch.nn.attention.varlen"
    assert VARLEN_CAUSAL_KWARGS in ({"window_size": (-1, 0)}, {"is_causal": True})
    query = torch.zeros(6, 4, 64, dtype=torch.bfloat16)
    assert not uses_varlen_kernel(query, dropout=0.0)  # CPU: the exact fallback
    meta = query.to("meta")
    assert uses_varlen_kernel(meta, dropout=0.0)
    assert not uses_varlen_kernel(meta.float(), dropout=0.0)
    assert not uses_varlen_kernel(meta, dropout=0.1)
    assert not uses_varlen_kernel(torch.zeros(6, 4, 12, dtype=torch.bfloat16, device="meta"), dropout=0.0)


def test_packed_attention_work_follows_the_caption_lengths():
    """On meta tensors (the CUDA program's shapes) the packed step runs the varlen kernel, once per layer each way,
    and its linear layers see the real tokens only."""
    with torch.device("meta"):
        model = HfClipModel._from_config(tiny_config(), attn_implementation="sdpa", dtype=torch.bfloat16)
    text = {name: tensor.to("meta") for name, tensor in device_text(text_batch(), torch.device("cpu")).items()}
    calls: list[str] = []

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "torch_attn":
                calls.append(func.__name__)
            if func is ATEN.addmm.default:  # the text tower's q/k/v/out/fc1/fc2 in the forward
                calls.append(f"rows {args[1].shape[0]}")
            return func(*args, **(kwargs or {}))

    with Calls():
        model.get_packed_text_features(**text).float().sum().backward()
    layers = TINY_TEXT["num_hidden_layers"]
    assert calls.count("_varlen_attn.default") == calls.count("_varlen_attn_backward.default") == layers
    assert {call for call in calls if call.startswith("rows")} == {f"rows {sum(LENGTHS)}"}
    # FlopCounterMode counts the kernel (torch's formula assumes the longest caption for each on meta tensors).
    with FlopCounterMode(display=False) as counter:
        model.get_packed_text_features(**text)
    assert torch.ops.torch_attn._varlen_attn in counter.get_flop_counts()["Global"]


def test_text_flops_script_counts_the_packed_step_as_the_sum_over_captions(tmp_path):
    """examples/benchmarks/text_flops.py on the tiny ViT: it checks internally that the packed text tower's FLOPs
    are the sum of each caption's alone, and every layout's count falls with its token count."""
    script = Path(__file__).resolve().parent.parent / "examples" / "benchmarks" / "text_flops.py"
    arch = script.parent / "tiny-vit.json"
    command = [sys.executable, str(script), "--arch", str(arch), "--batch-size", "8", "--json", str(tmp_path / "rows")]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "rows").read_text())
    assert len(rows) == 6
    for captions in {row["captions"] for row in rows}:
        padded, trimmed, packed = (row for row in rows if row["captions"] == captions)
        assert padded["text_tokens"] == 8 * 77 >= trimmed["text_tokens"] > packed["text_tokens"]
        assert padded["text_flops"] >= trimmed["text_flops"] > packed["text_flops"]
        assert padded["step_flops"] - padded["text_flops"] == packed["step_flops"] - packed["text_flops"]
