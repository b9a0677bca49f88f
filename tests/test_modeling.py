"""HfClipModel behaviour: declarations, attention backends, checkpointing, batching, init, loss, outputs, errors."""

import math

import pytest
import torch
from torch import nn

from hf_clip import (
    HfClipConfig,
    HfClipModel,
    HfClipPreTrainedModel,
    HfClipTextModel,
    HfClipTextModelWithProjection,
    HfClipVisionModel,
    HfClipVisionModelWithProjection,
)
from hf_clip.modeling_layers import HfClipAttention, HfClipEncoderLayer
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, TINY_VIT, random_text, tiny_config

ATOL = 1e-5
TEXT_LENGTHS = [16, 9, 3]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **config_overrides) -> HfClipModel:
    torch.manual_seed(seed)
    model = HfClipModel(tiny_config(**config_overrides))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_inputs(batch_size: int = 3, lengths: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    pixels = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {**random_text(batch_size, 16, lengths or TEXT_LENGTHS, seed=seed), "pixel_values": pixels}


def test_declarations() -> None:
    model = tiny_model()
    assert HfClipModel._supports_sdpa is True
    assert HfClipModel.supports_gradient_checkpointing is True
    assert callable(model.get_text_features) and callable(model.get_image_features)
    assert model.text_model.config._attn_implementation == model.vision_model.config._attn_implementation == "sdpa"
    # Explicit causality on every attention module: sdpa would treat a missing attribute as causal.
    for tower, causal in ((model.text_model, True), (model.vision_model, False)):
        attentions = [m for m in tower.modules() if isinstance(m, HfClipAttention)]
        assert len(attentions) == 2 and all(m.is_causal is causal for m in attentions)
    assert all(isinstance(layer, HfClipEncoderLayer) for layer in model.text_model.encoder.layers)


@torch.no_grad()
def test_eager_equals_sdpa() -> None:
    eager, sdpa = tiny_model(attn_implementation="eager"), tiny_model(attn_implementation="sdpa")
    inputs = tiny_inputs()
    ours, theirs = eager(**inputs, output_hidden_states=True), sdpa(**inputs, output_hidden_states=True)
    for field in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert_close(getattr(ours, field), getattr(theirs, field))
    assert_close(ours.text_model_output.last_hidden_state, theirs.text_model_output.last_hidden_state)
    assert_close(ours.vision_model_output.last_hidden_state, theirs.vision_model_output.last_hidden_state)


def loss_and_gradients(model: HfClipModel, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**inputs, return_loss=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_identical_loss_and_gradients() -> None:
    model = tiny_model().train()
    inputs = tiny_inputs()
    loss, gradients = loss_and_gradients(model, inputs)

    # The name every supported transformers 5.x release has (later ones also call it activation_checkpointing_enable).
    model.gradient_checkpointing_enable()
    attention_calls = []
    for layer in model.text_model.encoder.layers:
        # A pre-hook: the non-reentrant recomputation stops early, before the MLP's forward returns.
        layer.self_attn.register_forward_pre_hook(lambda *args: attention_calls.append(1))
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, inputs)

    # Backward recomputes every text layer: checkpointing is really on.
    assert len(attention_calls) == 2 * TINY_TEXT["num_hidden_layers"]
    assert torch.equal(loss, checkpointed_loss)
    assert gradients.keys() == checkpointed_gradients.keys() == dict(model.named_parameters()).keys()
    for name, gradient in gradients.items():
        assert torch.equal(gradient, checkpointed_gradients[name]), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@torch.no_grad()
def test_batch_row_equals_sample_alone(attn_implementation: str) -> None:
    model = tiny_model(attn_implementation=attn_implementation)
    inputs = tiny_inputs()
    batch = model(**inputs)
    for row, length in enumerate(TEXT_LENGTHS):
        # Alone and unpadded: the row's own tokens only, no attention mask.
        text = model.get_text_features(inputs["input_ids"][row : row + 1, :length]).pooler_output
        image = model.get_image_features(inputs["pixel_values"][row : row + 1]).pooler_output
        assert_close(nn.functional.normalize(text, dim=-1)[0], batch.text_embeds[row])
        assert_close(nn.functional.normalize(image, dim=-1)[0], batch.image_embeds[row])


def test_initialisation_follows_openai() -> None:
    """OpenAI's initial stds on a model large enough for the sample std to be within a few percent."""
    width, layers = 256, 4
    tower = {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers, "projection_dim": 64}
    text = {**TINY_TEXT, **tower, "vocab_size": 2048, "max_position_embeddings": 77, "num_attention_heads": 4}
    vision = {**TINY_VIT, **tower, "image_size": 128, "patch_size": 8}
    torch.manual_seed(0)
    model = HfClipModel(HfClipConfig(text_config=text, vision_config=vision, projection_dim=64))

    def std(tensor: torch.Tensor) -> float:
        return tensor.float().std().item()

    embeddings = model.text_model.embeddings
    assert std(embeddings.token_embedding.weight) == pytest.approx(0.02, rel=0.03)
    assert std(embeddings.position_embedding.weight) == pytest.approx(0.01, rel=0.05)
    for tower_model in (model.text_model, model.vision_model):
        layer = tower_model.encoder.layers[0]
        assert std(layer.self_attn.q_proj.weight) == pytest.approx(width**-0.5, rel=0.03)
        assert std(layer.self_attn.out_proj.weight) == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.03)
        assert std(layer.mlp.fc1.weight) == pytest.approx((2 * width) ** -0.5, rel=0.03)
        assert std(layer.mlp.fc2.weight) == pytest.approx(width**-0.5 * (2 * layers) ** -0.5, rel=0.03)
        assert torch.equal(layer.self_attn.v_proj.bias, torch.zeros(width))
        assert torch.equal(layer.layer_norm1.weight, torch.ones(width))
    vision_embeddings = model.vision_model.embeddings
    assert std(vision_embeddings.position_embedding.weight) == pytest.approx(width**-0.5, rel=0.05)
    assert std(model.text_projection.weight) == pytest.approx(width**-0.5, rel=0.05)
    assert std(model.visual_projection.weight) == pytest.approx(width**-0.5, rel=0.05)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
@pytest.mark.parametrize("model_class", [HfClipModel, HfClipTextModelWithProjection, HfClipVisionModelWithProjection])
def test_initialisation_does_not_depend_on_transformers_visiting_containers(monkeypatch, model_class, vision) -> None:
    """For models defined outside its package (`is_custom_code()`, hf_clip's case, loaded as remote code or not),
    transformers skips `_init_weights` on modules that own no tensors (HfClipAttention, HfClipMLP, the projection
    models). Every rule sits on a module that owns what it sets, so initialisation is the same either way."""
    config = tiny_config(vision=vision)
    sub_config = {
        HfClipTextModelWithProjection: config.text_config,
        HfClipVisionModelWithProjection: config.vision_config,
    }

    def initialised(custom_code: bool) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(
            HfClipPreTrainedModel, "is_custom_code", classmethod(lambda cls: custom_code), raising=False
        )
        torch.manual_seed(0)
        return model_class(sub_config.get(model_class, config)).state_dict()

    skipping, visiting = initialised(custom_code=True), initialised(custom_code=False)
    for name, tensor in visiting.items():
        assert torch.equal(skipping[name], tensor), name


@torch.no_grad()
def test_logit_scale_is_clamped_at_100() -> None:
    model = tiny_model()
    inputs = tiny_inputs()
    cosine = None
    for logit_scale, expected_scale in ((10.0, 100.0), (1.0, math.e)):
        model.logit_scale.fill_(logit_scale)
        output = model(**inputs)
        cosine = output.text_embeds @ output.image_embeds.t()
        assert_close(output.logits_per_text, expected_scale * cosine)
        assert_close(output.logits_per_image, expected_scale * cosine.t())
    assert model.logit_scale.item() == 1.0  # the clamp is applied in forward, not written back


def test_return_loss_is_the_symmetric_cross_entropy() -> None:
    model = tiny_model()
    output = model(**tiny_inputs(), return_loss=True)
    labels = torch.arange(3)
    per_text = nn.functional.cross_entropy(output.logits_per_text, labels)
    per_image = nn.functional.cross_entropy(output.logits_per_image, labels)
    assert_close(output.loss, (per_text + per_image) / 2)
    assert model(**tiny_inputs()).loss is None


def test_return_loss_with_one_pair_raises() -> None:
    with pytest.raises(ValueError, match="at least 2 pairs"):
        tiny_model()(**tiny_inputs(batch_size=1, lengths=[5]), return_loss=True)


@torch.no_grad()
def test_config_flags_are_honoured_and_kwargs_override_them() -> None:
    model = tiny_model(output_hidden_states=True, output_attentions=True, attn_implementation="eager")
    for tower_output in (model(**tiny_inputs()).text_model_output, model(**tiny_inputs()).vision_model_output):
        assert len(tower_output.hidden_states) == TINY_TEXT["num_hidden_layers"] + 1
        assert len(tower_output.attentions) == TINY_TEXT["num_hidden_layers"]
    overridden = model(**tiny_inputs(), output_hidden_states=False, output_attentions=False)
    assert overridden.text_model_output.hidden_states is None
    assert overridden.vision_model_output.attentions is None
    default = tiny_model()(**tiny_inputs())
    assert default.text_model_output.hidden_states is None and default.text_model_output.attentions is None


@torch.no_grad()
def test_return_dict_false_returns_tuples() -> None:
    model = tiny_model()
    inputs = tiny_inputs()
    as_dict = model(**inputs)
    as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 6
    for index, field in enumerate(("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")):
        assert torch.equal(as_tuple[index], as_dict[field])
    assert isinstance(as_tuple[4], tuple) and torch.equal(as_tuple[4][1], as_dict.text_model_output.pooler_output)
    assert isinstance(as_tuple[5], tuple) and torch.equal(as_tuple[5][1], as_dict.vision_model_output.pooler_output)
    with_loss = model(**inputs, return_loss=True, return_dict=False)
    assert with_loss[0].ndim == 0 and len(with_loss) == 7
    text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    text_tuple = model.text_model(**text_inputs, return_dict=False)
    assert isinstance(text_tuple, tuple) and torch.equal(text_tuple[0], as_dict.text_model_output.last_hidden_state)


def submodel_state_dict(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state_dict.items() if key.startswith(prefixes)}


@torch.no_grad()
def test_single_tower_models_equal_the_joint_model() -> None:
    model = tiny_model()
    inputs = tiny_inputs()
    state_dict = model.state_dict()
    config = model.config

    text_with_projection = HfClipTextModelWithProjection(config.text_config).eval()
    text_with_projection.load_state_dict(submodel_state_dict(state_dict, ("text_model.", "text_projection.")))
    vision_with_projection = HfClipVisionModelWithProjection(config.vision_config).eval()
    vision_with_projection.load_state_dict(submodel_state_dict(state_dict, ("vision_model.", "visual_projection.")))
    vision = HfClipVisionModel(config.vision_config).eval()
    vision.load_state_dict(submodel_state_dict(state_dict, ("vision_model.",)))
    text = HfClipTextModel(config.text_config).eval()
    text_state_dict = submodel_state_dict(state_dict, ("text_model.",))
    text.load_state_dict({key.removeprefix("text_model."): value for key, value in text_state_dict.items()})

    text_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    pixels = inputs["pixel_values"]
    text_features = model.get_text_features(**text_inputs).pooler_output
    image_features = model.get_image_features(pixels)
    assert torch.equal(text_with_projection(**text_inputs).text_embeds, text_features)
    assert torch.equal(vision_with_projection(pixels).image_embeds, image_features.pooler_output)
    assert torch.equal(vision(pixels).pooler_output, model.vision_model(pixels).pooler_output)
    assert torch.equal(text(**text_inputs).pooler_output, model.text_model(**text_inputs).pooler_output)
    assert torch.equal(vision(pixels).last_hidden_state, image_features.last_hidden_state)


def test_text_without_eos_raises() -> None:
    inputs = tiny_inputs()
    inputs["input_ids"][1, :] = 5
    with pytest.raises(ValueError, match=r"rows \[1\] contain no attended end-of-text token \(id 98\)"):
        tiny_model()(**inputs)


def test_bad_input_shapes_raise() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model.get_image_features(torch.zeros(1, 3, 48, 48))
    too_long = random_text(1, TINY_TEXT["max_position_embeddings"] + 1)
    with pytest.raises(ValueError, match="longer than the model's context of 16 tokens"):
        model.get_text_features(**too_long)
    with pytest.raises(ValueError, match="needs both `input_ids` and `pixel_values`"):
        model(input_ids=tiny_inputs()["input_ids"])
