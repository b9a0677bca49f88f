"""The training objective and what it is built from: the loss registry (a new loss is a class and a registry entry,
chosen by its name alone), the named loss inputs, and the facts each image tower states about itself."""

import pytest
import torch

from hf_clip import ClipLoss, HfClipModel, SigLipLoss, clip_loss
from hf_clip.loss import LOSSES, ContrastiveInputs, GlobalBatchLoss, build_loss, register_loss
from hf_clip.modeling_hf_clip import LOGIT_SCALE_MAX, VISION_TOWERS
from hf_clip.modeling_layers import HfClipVisionTower
from hf_clip.testing_utils import TINY_RESNET, TINY_VIT, random_text, tiny_clip_tokenizer, tiny_config
from hf_clip.training import ClipObjective, TrainConfig
from hf_clip.training.builders import architecture
from hf_clip.training.steps import ClipEmbedder


class TextToImageLoss(GlobalBatchLoss):
    """A loss no run had before: the text→image half of CLIP's cross-entropy."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        image_embeds, text_embeds, _, _ = self.local_inputs(image_embeds, text_embeds)
        logits = logit_scale * text_embeds @ image_embeds.t()
        labels = torch.arange(logits.shape[0])
        return torch.nn.functional.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


@pytest.fixture
def registered_loss():
    register_loss("text_to_image")(TextToImageLoss)
    yield "text_to_image"
    del LOSSES["text_to_image"]


def batch(size: int = 4) -> dict[str, torch.Tensor]:
    pixel_values = torch.randn(size, 3, TINY_VIT["image_size"], TINY_VIT["image_size"])
    return {"pixel_values": pixel_values, "input_ids": random_text(size, 8)["input_ids"]}


def test_the_registry_names_the_shipped_losses():
    assert {"softmax": ClipLoss, "sigmoid": SigLipLoss} == LOSSES
    assert (ClipLoss.uses_logit_bias, SigLipLoss.uses_logit_bias) == (False, True)
    with pytest.raises(ValueError, match="unknown loss 'hinge'; the registered losses are softmax, sigmoid"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="a loss named 'softmax' is registered already"):
        register_loss("softmax")(TextToImageLoss)
    # Options pass through to the constructor.
    assert build_loss("softmax", local_loss=False).local_loss is False


def test_a_registered_loss_is_chosen_by_its_name_alone(registered_loss, tmp_path):
    torch.manual_seed(0)
    model = HfClipModel(tiny_config())
    objective = ClipObjective.from_name(ClipEmbedder(model), registered_loss, label_smoothing=0.1)
    assert isinstance(objective.loss, TextToImageLoss) and objective.loss.label_smoothing == 0.1
    output = objective(batch())
    inputs = output.inputs
    expected = torch.nn.functional.cross_entropy(
        inputs.logit_scale * inputs.text_embeds @ inputs.image_embeds.t(), torch.arange(4), label_smoothing=0.1
    )
    torch.testing.assert_close(output.loss, expected, atol=0, rtol=0)
    output.loss.backward()
    assert model.logit_scale.grad is not None
    # The run config takes the name and gives the model a bias only if the loss uses one.
    HfClipModel(tiny_config()).save_pretrained(tmp_path / "clip")  # architecture() checks the folder is whole
    HfClipModel(tiny_config(logit_bias_init_value=-10.0)).save_pretrained(tmp_path / "siglip")
    config = TrainConfig(model_name_or_path=str(tmp_path / "clip"), loss=registered_loss)
    assert architecture(config, tiny_clip_tokenizer()).logit_bias_init_value is None
    config = TrainConfig(model_name_or_path=str(tmp_path / "siglip"), loss=registered_loss)
    with pytest.raises(
        ValueError, match="has a SigLIP bias \\(logit_bias\\), which loss='text_to_image' does not use"
    ):
        architecture(config, tiny_clip_tokenizer())
    config = TrainConfig(model_name_or_path=str(tmp_path / "clip"), loss="sigmoid")
    assert architecture(config, tiny_clip_tokenizer()).logit_bias_init_value == -10.0


def test_the_embedder_names_its_outputs_and_the_model_computes_the_temperature():
    torch.manual_seed(0)
    clip, siglip = HfClipModel(tiny_config()), HfClipModel(tiny_config(logit_bias_init_value=-10.0))
    with torch.no_grad():
        clip.logit_scale.fill_(10.0)  # above the cap
        inputs = ClipEmbedder(clip)(**batch())
    assert isinstance(inputs, ContrastiveInputs) and inputs.logit_bias is None
    assert set(inputs.arguments()) == {"image_embeds", "text_embeds", "logit_scale"}
    assert float(inputs.logit_scale) == float(clip.logit_multiplier().detach()) == pytest.approx(100.0, rel=1e-6)
    assert float(clip.logit_multiplier().detach()) == float(torch.tensor(LOGIT_SCALE_MAX).exp())
    torch.testing.assert_close(
        ClipLoss()(**inputs.arguments()), clip_loss(inputs.logit_scale * inputs.text_embeds @ inputs.image_embeds.t())
    )
    siglip_inputs = ClipEmbedder(siglip)(**batch())
    assert siglip_inputs.logit_bias is siglip.logit_bias
    # A SigLIP model's named inputs carry the bias, which the softmax loss does not take.
    with pytest.raises(TypeError, match="logit_bias"):
        ClipLoss()(**siglip_inputs.arguments())
    SigLipLoss()(**siglip_inputs.arguments()).backward()
    assert siglip.logit_bias.grad is not None


@pytest.mark.parametrize("vision", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_each_image_tower_states_its_facts(vision):
    model = HfClipModel(tiny_config(vision=vision))
    tower = model.vision_model
    assert isinstance(tower, HfClipVisionTower) and type(tower) is VISION_TOWERS[vision.get("backbone", "vit")]
    groups = tower.layer_groups()
    tower_params = {id(param) for group in groups for module in group for param in module.parameters()}
    assert tower_params == {id(param) for param in tower.parameters()}
    is_resnet = vision is TINY_RESNET
    assert tower.adam_defaults == ((0.999, 1e-8) if is_resnet else (0.98, 1e-6))
    assert tower.prefers_channels_last is is_resnet
    assert isinstance(model.visual_projection, torch.nn.Identity if is_resnet else torch.nn.Linear)
    assert set(model._no_split_modules) == {"HfClipEncoderLayer", *(["HfClipBottleneck"] if is_resnet else [])}
