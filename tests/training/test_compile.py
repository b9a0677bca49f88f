"""The training step's loss (ClipEmbedder + ClipLoss as the training loop runs it: packed text from `device_text`,
or a trimmed, mask-free batch as the benchmark sends it) compiles as one graph, with and without activation
checkpointing, for both image towers; a packed batch of another length reuses the dynamic-shape graph."""

import pytest
import torch
from torch._dynamo.utils import counters

from hf_clip import ClipLoss, HfClipModel
from hf_clip.data.batches import device_text
from hf_clip.data.text_batching import trim_to_longest
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_text, tiny_config
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder

LENGTHS = [5, 9, 3, 16]


def text_inputs(layout: str, lengths: list[int]) -> dict[str, torch.Tensor]:
    text = random_text(len(lengths), 16, lengths)
    if layout == "packed":
        return device_text(text, torch.device("cpu"))
    return {"input_ids": trim_to_longest(text["input_ids"], text["attention_mask"])[0]}


def training_loss(vision: dict, checkpointing: bool):
    config = tiny_config(vision)
    model = HfClipModel._from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    objective = ClipObjective(ClipEmbedder(model), ClipLoss())

    def loss(pixel_values: torch.Tensor, text: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective({"pixel_values": pixel_values, **text}).loss

    return loss, config.vision_config.image_size


@pytest.mark.parametrize("layout", ["packed", "trimmed"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_training_loss_compiles_without_graph_breaks(vision, checkpointing, layout):
    loss, size = training_loss(vision, checkpointing)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(torch.randn(4, 3, size, size), text_inputs(layout, LENGTHS))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_packed_batches_of_any_length_share_one_dynamic_graph():
    """Every packed batch has its own token count: after the first, one dynamic-shape graph serves them all
    (fullgraph: a host read of a tensor value would fail to compile)."""
    loss, size = training_loss(TINY_VIT, checkpointing=False)
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo and AOTAutograd as inductor sees them, without generating C++ for the CPU (minutes here).
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for lengths in ([5, 9, 3, 16], [4, 4, 4, 4], [16, 16, 2, 7], [2, 3, 2, 2]):
        compiled(torch.randn(4, 3, size, size), text_inputs("packed", lengths)).backward()
    assert counters["stats"]["unique_graphs"] == 2  # the first batch's static graph, then the dynamic one
