"""transformers' CLIP API on every hf_clip class: input embeddings, resizing the vocabulary, the feature methods'
output options, and arguments a method cannot use. Where transformers' CLIP classes take the same call, both run it
on the same weights and must agree."""

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers.utils import ModelOutput

from hf_clip import (
    HfClipModel,
    HfClipResNetModel,
    HfClipTextModel,
    HfClipTextModelWithProjection,
    HfClipVisionModel,
    HfClipVisionModelWithProjection,
)
from hf_clip.modeling_vit import HfClipVisionTransformer
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, TINY_VIT, random_text, tiny_config, tiny_models

ATOL = 1e-5


def tiny_pixels(batch_size: int = 2, size: int = TINY_VIT["image_size"], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def flatten(output: ModelOutput | tuple | torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) output in order, whether it came back as a ModelOutput or a tuple."""
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.to_tuple() if isinstance(output, ModelOutput) else output
    return [tensor for value in values for tensor in flatten(value)]


def assert_same_output(ours: ModelOutput | tuple, theirs: ModelOutput | tuple) -> None:
    assert isinstance(ours, tuple) == isinstance(theirs, tuple), (type(ours), type(theirs))
    ours_tensors, theirs_tensors = flatten(ours), flatten(theirs)
    assert len(ours_tensors) == len(theirs_tensors)
    for mine, reference in zip(ours_tensors, theirs_tensors, strict=True):
        torch.testing.assert_close(mine, reference, atol=ATOL, rtol=0)


@pytest.fixture
def eager_pair():
    """A tiny HfClipModel and transformers' CLIPModel with the same weights, both on eager attention (the only backend
    that returns attention maps)."""
    model, reference = tiny_models()
    model.set_attn_implementation("eager")
    reference.set_attn_implementation("eager")
    return model, reference


def sub_state_dict(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if key.startswith(prefixes)}


# --- get_text_features / get_image_features --------------------------------------------------------------------------

FEATURE_OPTIONS = [
    {},
    {"return_dict": True},
    {"return_dict": False},
    {"output_hidden_states": True},
    {"output_attentions": True, "output_hidden_states": True, "return_dict": False},
]


@pytest.mark.parametrize("options", FEATURE_OPTIONS, ids=lambda options: ",".join(options) or "defaults")
@torch.no_grad()
def test_feature_methods_take_transformers_output_options(eager_pair, options: dict) -> None:
    model, reference = eager_pair
    text, pixels = random_text(3, 16, [16, 9, 3]), tiny_pixels(3)
    assert_same_output(model.get_text_features(**text, **options), reference.get_text_features(**text, **options))
    assert_same_output(model.get_image_features(pixels, **options), reference.get_image_features(pixels, **options))
    features = model.get_image_features(pixels, **options)
    pooled = features[1] if isinstance(features, tuple) else features.pooler_output
    assert pooled.shape == (3, 16)  # the projected embedding, as in transformers 5.x


@torch.no_grad()
def test_feature_methods_follow_config_return_dict(eager_pair) -> None:
    model, reference = eager_pair
    model.config.return_dict = reference.config.return_dict = False
    text, pixels = random_text(2, 16), tiny_pixels()
    assert isinstance(model.get_text_features(**text), tuple)
    assert_same_output(model.get_text_features(**text), reference.get_text_features(**text))
    assert_same_output(model.get_image_features(pixels), reference.get_image_features(pixels))
    assert isinstance(model.get_image_features(pixels, return_dict=True), ModelOutput)


# --- arguments a method cannot use -----------------------------------------------------------------------------------


def vit_vision_model() -> HfClipVisionModel:
    return HfClipVisionModel(tiny_config().vision_config)


def resnet_vision_model() -> HfClipVisionModel:
    return HfClipVisionModel(tiny_config(vision=TINY_RESNET).vision_config)


CALLS: dict[str, Callable[[], None]] = {
    "HfClipModel.forward": lambda: HfClipModel(tiny_config())(
        **random_text(2, 8), pixel_values=tiny_pixels(), bogus=1
    ),
    "get_text_features": lambda: HfClipModel(tiny_config()).get_text_features(**random_text(2, 8), bogus=1),
    "get_image_features": lambda: HfClipModel(tiny_config()).get_image_features(tiny_pixels(), bogus=1),
    "HfClipTextModel": lambda: HfClipTextModel(tiny_config().text_config)(**random_text(2, 8), bogus=1),
    "HfClipTextModelWithProjection": lambda: HfClipTextModelWithProjection(tiny_config().text_config)(
        **random_text(2, 8), bogus=1
    ),
    "HfClipVisionModel (vit)": lambda: vit_vision_model()(tiny_pixels(), bogus=1),
    "HfClipVisionModel (resnet)": lambda: resnet_vision_model()(tiny_pixels(size=64), bogus=1),
    "HfClipVisionModelWithProjection": lambda: HfClipVisionModelWithProjection(tiny_config().vision_config)(
        tiny_pixels(), bogus=1
    ),
    "HfClipVisionTransformer": lambda: HfClipVisionTransformer(tiny_config().vision_config)(tiny_pixels(), bogus=1),
    "HfClipResNetModel": lambda: HfClipResNetModel(tiny_config(vision=TINY_RESNET).vision_config)(
        tiny_pixels(size=64), bogus=1
    ),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_unknown_arguments_are_rejected_by_name(call: Callable[[], None]) -> None:
    with pytest.raises(TypeError, match="bogus"):
        call()


# --- input embeddings ------------------------------------------------------------------------------------------------

TEXT_CLASSES = [HfClipTextModel, HfClipTextModelWithProjection, HfClipModel]


def build(model_class: type[nn.Module], vision: dict = TINY_VIT) -> nn.Module:
    config = tiny_config(vision=vision)
    if model_class is HfClipModel:
        return HfClipModel(config).eval()
    if model_class in (HfClipTextModel, HfClipTextModelWithProjection):
        return model_class(config.text_config).eval()
    return model_class(config.vision_config).eval()


def text_tower(model: nn.Module) -> HfClipTextModel:
    return model if isinstance(model, HfClipTextModel) else model.text_model


def image_tower(model: nn.Module) -> nn.Module:
    return model if isinstance(model, HfClipVisionTransformer | HfClipResNetModel) else model.vision_model


@pytest.mark.parametrize("model_class", TEXT_CLASSES, ids=lambda cls: cls.__name__)
def test_text_classes_expose_the_token_embedding(model_class: type[nn.Module]) -> None:
    model = build(model_class)
    token_embedding = text_tower(model).embeddings.token_embedding
    assert model.get_input_embeddings() is token_embedding
    replacement = nn.Embedding(TINY_TEXT["vocab_size"], TINY_TEXT["hidden_size"])
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement and text_tower(model).embeddings.token_embedding is replacement


IMAGE_CASES = {
    "HfClipVisionTransformer": (HfClipVisionTransformer, TINY_VIT),
    "HfClipVisionModel (vit)": (HfClipVisionModel, TINY_VIT),
    "HfClipVisionModelWithProjection (vit)": (HfClipVisionModelWithProjection, TINY_VIT),
    "HfClipResNetModel": (HfClipResNetModel, TINY_RESNET),
    "HfClipVisionModel (resnet)": (HfClipVisionModel, TINY_RESNET),
    "HfClipVisionModelWithProjection (resnet)": (HfClipVisionModelWithProjection, TINY_RESNET),
}


@pytest.mark.parametrize(("model_class", "vision"), IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_image_classes_expose_their_first_layer(model_class: type[nn.Module], vision: dict) -> None:
    """The ViT returns its patch embedding (as transformers' CLIPVisionModel does), the ResNet its stem's first
    convolution; setting a new one changes what forward computes."""
    model = build(model_class, vision)
    tower = image_tower(model)
    first_layer = tower.stem.conv1 if vision["backbone"] == "resnet" else tower.embeddings.patch_embedding
    assert model.get_input_embeddings() is first_layer
    pixels = tiny_pixels(size=vision["image_size"])
    with torch.no_grad():
        before = flatten(model(pixels))[1]
        replacement = copy.deepcopy(first_layer)
        replacement.weight.mul_(2)
        model.set_input_embeddings(replacement)
        after = flatten(model(pixels))[1]
    assert model.get_input_embeddings() is replacement
    assert not torch.allclose(before, after)


@torch.no_grad()
def test_set_input_embeddings_matches_transformers() -> None:
    """The same replacement on hf_clip's and transformers' projection models gives the same embeddings."""
    model, reference = tiny_models()
    text_prefixes, vision_prefixes = ("text_model.", "text_projection."), ("vision_model.", "visual_projection.")
    ours_text = HfClipTextModelWithProjection(model.config.text_config).eval()
    ours_text.load_state_dict(sub_state_dict(model, text_prefixes))
    theirs_text = CLIPTextModelWithProjection(reference.config.text_config).eval()
    theirs_text.load_state_dict(sub_state_dict(reference, text_prefixes))
    ours_vision = HfClipVisionModelWithProjection(model.config.vision_config).eval()
    ours_vision.load_state_dict(sub_state_dict(model, vision_prefixes))
    theirs_vision = CLIPVisionModelWithProjection(reference.config.vision_config).eval()
    theirs_vision.load_state_dict(sub_state_dict(reference, vision_prefixes))

    text, pixels = random_text(3, 16, [16, 9, 3]), tiny_pixels(3)
    for ours, theirs, inputs in (
        (ours_text, theirs_text, text),
        (ours_vision, theirs_vision, {"pixel_values": pixels}),
    ):
        replacement = copy.deepcopy(theirs.get_input_embeddings())
        replacement.weight.mul_(-1.5)
        ours.set_input_embeddings(copy.deepcopy(replacement))
        # The reference's layer is swapped by module path: transformers' own setter exists only on later 5.x releases.
        path = next(name for name, module in theirs.named_modules() if module is theirs.get_input_embeddings())
        parent, _, attribute = path.rpartition(".")
        theirs.get_submodule(parent).add_module(attribute, replacement)
        assert_same_output(ours(**inputs), theirs(**inputs))


# --- resize_token_embeddings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", TEXT_CLASSES, ids=lambda cls: cls.__name__)
@torch.no_grad()
def test_resize_token_embeddings_gives_usable_new_tokens(model_class: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = build(model_class)
    new_vocab = TINY_TEXT["vocab_size"] + 4
    text = random_text(2, 8)

    def text_embeds(inputs: dict) -> torch.Tensor:
        if isinstance(model, HfClipModel):
            return model.get_text_features(**inputs).pooler_output
        return flatten(model(**inputs))[0 if isinstance(model, HfClipTextModelWithProjection) else 1]

    before = text_embeds(text)
    model.resize_token_embeddings(new_vocab)

    assert model.get_input_embeddings().num_embeddings == new_vocab
    assert model.config.get_text_config().vocab_size == new_vocab
    assert text_tower(model).config.vocab_size == new_vocab
    # Old tokens keep their vectors; a new token is looked up instead of being refused as out of vocabulary.
    torch.testing.assert_close(text_embeds(text), before, atol=0, rtol=0)
    with_new_token = {**text, "input_ids": text["input_ids"].clone()}
    with_new_token["input_ids"][0, 2] = new_vocab - 1
    changed = text_embeds(with_new_token)
    assert not torch.allclose(changed[0], before[0]) and torch.equal(changed[1], before[1])
    beyond_new_vocabulary = {**text, "input_ids": text["input_ids"].clone()}
    beyond_new_vocabulary["input_ids"][0, 2] = new_vocab
    with pytest.raises(ValueError, match="outside the vocabulary"):
        text_embeds(beyond_new_vocabulary)


# --- what the ResNet's vision models return --------------------------------------------------------------------------


@torch.no_grad()
def test_resnet_vision_model_pooler_output_is_the_projected_embedding() -> None:
    """The attention pool ends in the projection into the joint space, so for a ResNet the tower's pooler_output is
    already the image embedding that `get_image_features` and HfClipVisionModelWithProjection return."""
    torch.manual_seed(0)
    model = HfClipModel(tiny_config(vision=TINY_RESNET)).eval()
    vision_config = model.config.vision_config
    vision = HfClipVisionModel(vision_config).eval()
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    with_projection = HfClipVisionModelWithProjection(vision_config).eval()
    with_projection.vision_model.load_state_dict(model.vision_model.state_dict())
    pixels = tiny_pixels(size=TINY_RESNET["image_size"])
    pooled = vision(pixels).pooler_output
    assert pooled.shape == (2, model.config.projection_dim)
    assert torch.equal(pooled, model.get_image_features(pixels).pooler_output)
    assert torch.equal(pooled, with_projection(pixels).image_embeds)
