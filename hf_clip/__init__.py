"""hf_clip: CLIP (Radford et al., 2021) as a native transformers package."""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .loss import clip_loss, contrastive_loss
from .modeling_hf_clip import (
    HfClipModel,
    HfClipOutput,
    HfClipTextModelWithProjection,
    HfClipVisionModel,
    HfClipVisionModelWithProjection,
)
from .modeling_layers import HfClipPreTrainedModel
from .modeling_resnet import HfClipResNetModel
from .modeling_text import HfClipTextModel

__all__ = [
    "HfClipConfig",
    "HfClipModel",
    "HfClipOutput",
    "HfClipPreTrainedModel",
    "HfClipResNetModel",
    "HfClipTextConfig",
    "HfClipTextModel",
    "HfClipTextModelWithProjection",
    "HfClipVisionConfig",
    "HfClipVisionModel",
    "HfClipVisionModelWithProjection",
    "clip_loss",
    "contrastive_loss",
]

AutoConfig.register(HfClipConfig.model_type, HfClipConfig)
AutoConfig.register(HfClipTextConfig.model_type, HfClipTextConfig)
AutoConfig.register(HfClipVisionConfig.model_type, HfClipVisionConfig)
AutoModel.register(HfClipConfig, HfClipModel)
AutoModel.register(HfClipTextConfig, HfClipTextModel)
AutoModel.register(HfClipVisionConfig, HfClipVisionModel)
AutoModelForZeroShotImageClassification.register(HfClipConfig, HfClipModel)
