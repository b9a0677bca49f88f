"""The training step's loss (ClipEmbedder + ClipLoss on a trimmed, mask-free text batch, as the training loop and
the benchmark run it) compiles as one graph, with and without activation checkpointing, for both image towers."""

import pytest
import torch

from hf_clip import ClipLoss, HfClipModel
from hf_clip.data.text_batching import trim_to_longest
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_text, tiny_config
from hf_clip.training.steps import ClipEmbedder, plain_loss


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_training_loss_compiles_without_graph_breaks(vision, checkpointing):
    config = tiny_config(vision)
    model = HfClipModel._from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embedder, loss_fn = ClipEmbedder(model), ClipLoss()
    size = config.vision_config.image_size
    text = random_text(4, 16, lengths=[5, 9, 3, 16])
    input_ids, _ = trim_to_longest(text["input_ids"], text["attention_mask"])

    def loss(pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return plain_loss(embedder, loss_fn, {"pixel_values": pixel_values, "input_ids": input_ids})

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(torch.randn(4, 3, size, size), input_ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
