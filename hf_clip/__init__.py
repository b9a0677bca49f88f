"""hf_clip: CLIP (Radford et al., 2021) as a native transformers package."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_hf_clip import HfClipConfig, HfClipTextConfig, HfClipVisionConfig
from .data.fast_preprocessing import FastClipImagePreprocessor
from .data.text_batching import trim_to_longest
from .image_processing_hf_clip import HfClipImageProcessor
from .loss import ClipLoss, SigLipLoss, clip_loss, contrastive_loss, sigmoid_loss
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
from .processing_hf_clip import HfClipProcessor
from .tokenization_hf_clip import HfClipTokenizer, train_clip_bpe
from .zero_shot import ZeroShotClassifier, build_class_embeddings

__all__ = [
    "ClipLoss",
    "FastClipImagePreprocessor",
    "HfClipConfig",
    "HfClipImageProcessor",
    "HfClipModel",
    "HfClipOutput",
    "HfClipPreTrainedModel",
    "HfClipProcessor",
    "HfClipResNetModel",
    "HfClipTextConfig",
    "HfClipTextModel",
    "HfClipTextModelWithProjection",
    "HfClipTokenizer",
    "HfClipVisionConfig",
    "HfClipVisionModel",
    "HfClipVisionModelWithProjection",
    "SigLipLoss",
    "ZeroShotClassifier",
    "ZeroShotEnsembleImageClassificationPipeline",
    "build_class_embeddings",
    "clip_loss",
    "contrastive_loss",
    "sigmoid_loss",
    "train_clip_bpe",
    "trim_to_longest",
]

AutoConfig.register(HfClipConfig.model_type, HfClipConfig)
AutoConfig.register(HfClipTextConfig.model_type, HfClipTextConfig)
AutoConfig.register(HfClipVisionConfig.model_type, HfClipVisionConfig)
AutoModel.register(HfClipConfig, HfClipModel)
AutoModel.register(HfClipTextConfig, HfClipTextModel)
AutoModel.register(HfClipVisionConfig, HfClipVisionModel)
AutoModelForZeroShotImageClassification.register(HfClipConfig, HfClipModel)
AutoTokenizer.register(HfClipConfig, tokenizer_class=HfClipTokenizer)
# The PIL class for every backend name: a saved processor never switches to torchvision (different resize numerics).
AutoImageProcessor.register(
    HfClipConfig, image_processor_classes={"pil": HfClipImageProcessor, "torchvision": HfClipImageProcessor}
)
AutoProcessor.register(HfClipConfig, HfClipProcessor)
PIPELINE_REGISTRY.register_pipeline(
    ZERO_SHOT_ENSEMBLE_TASK,
    pipeline_class=ZeroShotEnsembleImageClassificationPipeline,
    pt_model=AutoModelForZeroShotImageClassification,
    type="multimodal",
)
