"""Patch dropout (FLIP): in training the ViT encoder sees the class token and a random subset of each image's patch
tokens; in eval mode the model is exactly the one without it. It compiles, checkpoints and validates its config."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from torch._dynamo.utils import counters

from hf_clip import HfClipConfig, HfClipModel, HfClipVisionConfig, HfClipVisionModel
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_text, tiny_config

NUM_PATCHES = (TINY_VIT["image_size"] // TINY_VIT["patch_size"]) ** 2  # 16


def vision_model(patch_dropout: float, seed: int = 0) -> HfClipVisionModel:
    torch.manual_seed(seed)
    return HfClipVisionModel(HfClipVisionConfig(**TINY_VIT, patch_dropout=patch_dropout))


def pixels(batch_size: int = 4) -> torch.Tensor:
    size = TINY_VIT["image_size"]
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))


def encoder_inputs(model: HfClipVisionModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tokens the encoder's LayerNorm receives, every token of the embeddings) in one forward."""
    seen = []
    hook = model.vision_model.pre_layrnorm.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        model(pixel_values)
    finally:
        hook.remove()
    return seen[0], model.vision_model.embeddings(pixel_values)


def kept_patches(tokens: torch.Tensor, embeddings: torch.Tensor) -> list[list[int]]:
    """For each image, the index (0-based, among its patches) of each kept token, found by exact equality."""
    patches = embeddings[:, 1:]
    matches = (tokens[:, 1:, None, :] == patches[:, None, :, :]).all(-1)  # (batch, kept, patches)
    assert (matches.sum(-1) == 1).all(), "every kept token is exactly one of the image's patch tokens"
    return matches.float().argmax(-1).tolist()


def test_eval_mode_is_the_model_without_patch_dropout():
    model, plain = vision_model(0.5), vision_model(0.0, seed=1)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        output, expected = model(pixels(), output_hidden_states=True), plain(pixels(), output_hidden_states=True)
    assert torch.equal(output.pooler_output, expected.pooler_output)
    assert torch.equal(output.last_hidden_state, expected.last_hidden_state)
    assert output.last_hidden_state.shape[1] == 1 + NUM_PATCHES


@pytest.mark.parametrize(("patch_dropout", "num_kept"), [(0.0, 16), (0.5, 8), (0.3, 11), (0.99, 1)])
def test_training_keeps_the_class_token_and_a_random_subset_per_image(patch_dropout, num_kept):
    model = vision_model(patch_dropout).train()
    torch.manual_seed(2)
    with torch.no_grad():
        tokens, embeddings = encoder_inputs(model, pixels())
    assert tokens.shape == (4, 1 + num_kept, TINY_VIT["hidden_size"])
    assert torch.equal(tokens[:, 0], embeddings[:, 0])  # the class token (with its position)
    kept = kept_patches(tokens, embeddings)
    assert all(len(set(indices)) == num_kept for indices in kept)  # no patch twice
    if 1 < num_kept < NUM_PATCHES:
        assert len({frozenset(indices) for indices in kept}) == 4  # drawn independently per image


def test_gradients_reach_only_the_kept_patches():
    model = vision_model(0.5).train()
    torch.manual_seed(3)
    pixel_values = pixels(batch_size=1)
    seen = []
    hook = model.vision_model.pre_layrnorm.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    # Not a plain sum: the post-LayerNorm features of a fresh model sum to zero whatever the input.
    model(pixel_values).pooler_output.square().sum().backward()
    hook.remove()
    with torch.no_grad():
        kept = kept_patches(seen[0], model.vision_model.embeddings(pixel_values))[0]
    embeddings = model.vision_model.embeddings
    position_grads = embeddings.position_embedding.weight.grad.abs().sum(-1)
    has_gradient = position_grads[1:] > 0
    assert position_grads[0] > 0 and embeddings.class_embedding.grad.abs().sum() > 0
    assert has_gradient.nonzero().flatten().tolist() == sorted(kept)  # each patch's position: kept or not
    assert embeddings.patch_embedding.weight.grad.abs().sum() > 0


def training_loss(model: HfClipModel, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    return output.loss


def joint_model(checkpointing: bool) -> HfClipModel:
    torch.manual_seed(0)
    model = HfClipModel._from_config(tiny_config({**TINY_VIT, "patch_dropout": 0.5}), attn_implementation="sdpa")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def test_gradient_checkpointing_gives_the_same_step():
    """The draw happens before the checkpointed layers, so their recomputation sees the same tokens."""
    results = []
    for checkpointing in (False, True):
        model = joint_model(checkpointing)
        torch.manual_seed(4)
        loss = training_loss(model, pixels(), random_text(4, 16)["input_ids"])
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiles_as_one_graph(checkpointing):
    model = joint_model(checkpointing)
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo and AOTAutograd as inductor sees them, without generating C++ for the CPU
    # (tests/training/test_compile.py).
    compiled = torch.compile(training_loss, fullgraph=True, backend="aot_eager")
    input_ids = random_text(4, 16)["input_ids"]
    losses = [compiled(model, pixels(), input_ids) for _ in range(2)]
    losses[0].backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert losses[0] != losses[1]  # a new draw each call, not one baked into the graph
    assert model.vision_model.embeddings.patch_embedding.weight.grad is not None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({**TINY_VIT, "patch_dropout": 1.0}, "0 <= p < 1"),
        ({**TINY_VIT, "patch_dropout": -0.1}, "0 <= p < 1"),
        ({**TINY_RESNET, "patch_dropout": 0.5}, "'resnet' image tower has none"),
    ],
)
def test_config_validation(fields, message):
    # huggingface_hub's strict dataclasses wrap the validator's ValueError, message included.
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        HfClipVisionConfig(**fields)


def test_config_round_trips_the_field(tmp_path):
    config = tiny_config({**TINY_VIT, "patch_dropout": 0.75})
    config.save_pretrained(tmp_path)
    assert HfClipConfig.from_pretrained(tmp_path).vision_config.patch_dropout == 0.75
    assert HfClipVisionConfig().patch_dropout == 0.0
