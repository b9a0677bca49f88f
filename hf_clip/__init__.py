"""hf_clip: CLIP (Radford et al., 2021) as a native transformers package."""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .loss import ClipLoss, clip_loss, contrastive_loss
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
from .pipeline_zero_shot import ZERO_SHOT_ENSEMBLE_TASK, ZeroShotEnsembleImageClassificationPipeline
from .zero_shot import ZeroShotClassifier, build_class_embeddings

__all__ = [
    "ClipLoss",
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
    "ZeroShotClassifier",
    "ZeroShotEnsembleImageClassificationPipeline",
    "build_class_embeddings",
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
PIPELINE_REGISTRY.register_pipeline(
    ZERO_SHOT_ENSEMBLE_TASK,
    pipeline_class=ZeroShotEnsembleImageClassificationPipeline,
    pt_model=AutoModelForZeroShotImageClassification,
    type="multimodal",
)
