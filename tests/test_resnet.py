"""The modified-ResNet image tower: published sizes, parity with open_clip, checkpointing, batching, resolution change,
save/load through the Auto classes, the zero-shot pipeline."""

import copy
import json
import subprocess
import sys
import textwrap

import open_clip
import PIL.Image
import pytest
import torch
from open_clip.model import CLIP
from torch import nn
from transformers import AutoModel
from transformers.modeling_layers import GradientCheckpointingLayer

from conversion.key_mappings import hf_clip_to_openai, openai_to_hf_clip
from hf_clip import (
    HfClipConfig,
    HfClipImageProcessor,
    HfClipModel,
    HfClipProcessor,
    HfClipResNetModel,
    HfClipVisionConfig,
    HfClipVisionModel,
    train_clip_bpe,
)
from hf_clip.modeling_hf_clip import HfClipVisionModelWithProjection
from hf_clip.modeling_resnet import HfClipBottleneck
from hf_clip.testing_utils import TINY_RESNET, TINY_TEXT, random_text, tiny_config

ATOL = 1e-5
RESNET_ARCHITECTURES = [name for name in HfClipConfig.architecture_names() if name.startswith("RN")]
# Two blocks in stages 2 and 4, so identity-shortcut blocks are covered too, not only each stage's first block.
PARITY_RESNET = {**TINY_RESNET, "layers": [1, 2, 1, 2]}


def randomize_batch_norms(model: nn.Module, seed: int = 1) -> None:
    """Random BatchNorm affine and running statistics; OpenAI's init zeroes each block's last BN weight, which would
    hide the residual branches from any comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)


def open_clip_tiny(config: HfClipConfig) -> CLIP:
    """open_clip's `CLIP` with the same tiny architecture (QuickGELU, as OpenAI's models)."""
    vision, text = config.vision_config, config.text_config
    return CLIP(
        embed_dim=config.projection_dim,
        vision_cfg={
            "layers": tuple(vision.layers),
            "width": vision.width,
            "image_size": vision.image_size,
            "head_width": vision.width * 32 // vision.num_attention_heads,
        },
        text_cfg={
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": text.intermediate_size / text.hidden_size,
        },
        quick_gelu=True,
    )


def converted(reference: CLIP, config: HfClipConfig) -> HfClipModel:
    model = HfClipModel(config)
    model.load_state_dict(openai_to_hf_clip(reference.state_dict(), config), strict=True)
    return model.eval()


def openai_text(batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Token ids below BOS, BOS first, EOS (the largest id, where open_clip's argmax pooling looks) at varied ends."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 49406, (batch_size, seq_len), generator=generator)
    input_ids[:, 0] = 49406
    for row, end in enumerate(torch.linspace(2, seq_len - 1, batch_size).long().tolist()):
        input_ids[row, end] = 49407
        input_ids[row, end + 1 :] = 0
    return input_ids


def assert_open_clip_parity(reference: CLIP, model: HfClipModel, pixel_values: torch.Tensor, input_ids: torch.Tensor):
    """Image features, normalised embeddings, logits and per-stage feature maps agree; returns the max differences."""
    with torch.no_grad():
        image_embeds, text_embeds, logit_scale = reference(pixel_values, input_ids)
        reference_logits = logit_scale * image_embeds @ text_embeds.t()
        # The stem and stage outputs, and the attention pool's output (open_clip's `encode_image`).
        reference_vision = reference.visual.forward_intermediates(pixel_values)
        output = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    # `get_image_features`' output: its pooler_output is the (un-normalised) image embedding.
    vision_output = output.vision_model_output
    pairs = {
        "image_features": (vision_output.pooler_output, reference_vision["image_features"]),
        "image_embeds": (output.image_embeds, image_embeds),
        "logits_per_image": (output.logits_per_image, reference_logits),
    }
    stages = zip(vision_output.hidden_states, reference_vision["image_intermediates"], strict=True)
    pairs.update({f"stage_{i}": pair for i, pair in enumerate(stages)})
    differences = {name: (ours - theirs).abs().max().item() for name, (ours, theirs) in pairs.items()}
    for name, (ours, theirs) in pairs.items():
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    return differences


def tiny_resnet(vision: dict | None = None, seed: int = 0) -> HfClipModel:
    torch.manual_seed(seed)
    model = HfClipModel(tiny_config(vision=vision or PARITY_RESNET))
    randomize_batch_norms(model, seed)
    return model.eval()


def tiny_pixels(batch_size: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- declarations, configs, sizes ------------------------------------------------------------------------------------


def test_declarations():
    assert HfClipResNetModel.supports_gradient_checkpointing
    assert HfClipResNetModel._supports_sdpa
    assert issubclass(HfClipBottleneck, GradientCheckpointingLayer)
    assert "HfClipBottleneck" in HfClipResNetModel._no_split_modules
    model = tiny_resnet()
    assert isinstance(model.vision_model, HfClipResNetModel)
    # The attention pool's c_proj already maps into the joint space.
    assert isinstance(model.visual_projection, nn.Identity)
    assert model.vision_model.attention_pool.c_proj.out_features == model.config.projection_dim
    assert model.vision_model.get_input_embeddings() is model.vision_model.stem.conv1


def test_wrong_backbone_and_shapes_are_refused():
    with pytest.raises(ValueError, match="backbone='resnet'"):
        HfClipResNetModel(HfClipVisionConfig())
    tower = tiny_resnet().vision_model
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        tower(tiny_pixels(1, size=96))
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(torch.randn(1, 1, 64, 64))


def test_init_follows_openai():
    torch.manual_seed(0)
    tower = HfClipModel(tiny_config(vision=PARITY_RESNET)).vision_model
    for block in (module for module in tower.modules() if isinstance(module, HfClipBottleneck)):
        assert torch.all(block.bn3.weight == 0)
        for batch_norm in (block.bn1, block.bn2):
            assert torch.all(batch_norm.weight == 1) and torch.all(batch_norm.bias == 0)
            assert torch.all(batch_norm.running_var == 1) and torch.all(batch_norm.running_mean == 0)
    assert torch.all(tower.stem.bn3.weight == 1)
    pool = tower.attention_pool
    expected = pool.embed_dim**-0.5
    for projection in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        assert abs(projection.weight.std().item() / expected - 1) < 0.05
    assert abs(pool.position_embedding.weight.std().item() / expected - 1) < 0.1
    # Convolutions keep PyTorch's default (OpenAI's): uniform within 1/sqrt(fan_in).
    conv = tower.layer3[0].conv2
    bound = (conv.in_channels * 9) ** -0.5
    assert conv.weight.abs().max().item() <= bound and conv.weight.abs().max().item() > 0.9 * bound


def test_key_mapping_round_trip():
    model = tiny_resnet()
    state_dict = model.state_dict()
    openai = hf_clip_to_openai(dict(state_dict), model.config)
    assert "visual.layer2.0.downsample.0.weight" in openai and "visual.attnpool.positional_embedding" in openai
    back = openai_to_hf_clip(openai, model.config)
    assert back.keys() == state_dict.keys()
    assert all(torch.equal(back[key], state_dict[key]) for key in state_dict)


# --- parity with open_clip -------------------------------------------------------------------------------------------


def test_tiny_parity_with_open_clip():
    torch.manual_seed(0)
    config = tiny_config(vision=PARITY_RESNET)
    reference = open_clip_tiny(config).eval()
    randomize_batch_norms(reference)
    model = converted(reference, config)
    text = random_text(3, TINY_TEXT["max_position_embeddings"], lengths=[5, 16, 9])
    differences = assert_open_clip_parity(reference, model, tiny_pixels(2), text["input_ids"])
    print("tiny ResNet max |difference| vs open_clip:", differences)


def full_size_parity(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    reference = open_clip.create_model(f"{name}-quickgelu", pretrained=None).eval()
    randomize_batch_norms(reference)
    config = HfClipConfig.from_architecture(name)
    model = converted(reference, config)
    size = config.vision_config.image_size
    differences = assert_open_clip_parity(reference, model, tiny_pixels(2, size=size), openai_text(3, 77))
    print(f"{name} max |difference| vs open_clip:", json.dumps(differences))
    return differences


def test_rn50_parity_with_open_clip():
    full_size_parity("RN50")


@pytest.mark.slow
@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_full_size_parity_with_open_clip(name):
    full_size_parity(name)


def test_sdpa_matches_eager():
    model = tiny_resnet()
    pixel_values = tiny_pixels(2)
    model.vision_model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager = model.get_image_features(pixel_values, output_attentions=True)
    model.vision_model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        sdpa = model.get_image_features(pixel_values).pooler_output
    torch.testing.assert_close(sdpa, eager.pooler_output, atol=ATOL, rtol=0)
    # The eager path returns the pool's map: one query (the mean token) over the grid plus itself, summing to 1.
    (pool_map,) = eager.attentions
    assert pool_map.shape == (2, PARITY_RESNET["num_attention_heads"], 1, 2 * 2 + 1)
    torch.testing.assert_close(pool_map.sum(-1), torch.ones(2, 4, 1))


# --- behaviour -------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_identical_loss_and_gradients():
    """Train mode (BatchNorm uses batch statistics, and checkpointing only acts in training); two copies with the same
    starting state, so both see the same running statistics."""
    plain = tiny_resnet()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in checkpointed.modules() if isinstance(block, HfClipBottleneck))
    text = random_text(4, 16, lengths=[3, 16, 7, 12])
    losses, conv_calls = [], []
    for model in (plain, checkpointed):
        model.train()
        calls: list[int] = []
        hook = model.vision_model.layer4[0].conv1.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        loss = model(**text, pixel_values=tiny_pixels(4), return_loss=True).loss
        loss.backward()
        hook.remove()
        losses.append(loss)
        conv_calls.append(len(calls))
    # The checkpointed block really was recomputed during backward.
    assert conv_calls == [1, 2]
    assert torch.equal(losses[0], losses[1])
    plain_grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, parameter in checkpointed.named_parameters():
        assert parameter.grad is not None, name
        assert torch.equal(parameter.grad, plain_grads[name]), name


def test_row_of_a_batch_equals_sample_alone():
    tower = tiny_resnet().vision_model
    pixel_values = tiny_pixels(3)
    with torch.no_grad():
        batch = tower(pixel_values)
        for row in range(3):
            alone = tower(pixel_values[row : row + 1])
            torch.testing.assert_close(batch.pooler_output[row : row + 1], alone.pooler_output, atol=ATOL, rtol=0)
            torch.testing.assert_close(
                batch.last_hidden_state[row : row + 1], alone.last_hidden_state, atol=ATOL, rtol=0
            )


def test_runs_at_one_and_a_half_times_the_training_resolution():
    model = tiny_resnet()
    tower = model.vision_model
    with torch.no_grad():
        high = model.get_image_features(tiny_pixels(2, size=96), interpolate_pos_encoding=True)
    assert high.last_hidden_state.shape == (2, 8 * 32, 3, 3)
    assert high.pooler_output.shape == (2, 16)

    # Same as a model trained at 96 px whose position table is the bicubically resized one (mean-token row kept).
    grid = tower.attention_pool.position_embedding.weight[1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resized = nn.functional.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(9, -1)
    at_96 = HfClipResNetModel(HfClipVisionConfig(**{**PARITY_RESNET, "image_size": 96})).eval()
    state_dict = tower.state_dict()
    state_dict["attention_pool.position_embedding.weight"] = torch.cat(
        [tower.attention_pool.position_embedding.weight[:1], resized]
    )
    at_96.load_state_dict(state_dict)
    with torch.no_grad():
        torch.testing.assert_close(at_96(tiny_pixels(2, size=96)).pooler_output, high.pooler_output, atol=ATOL, rtol=0)


def test_interpolation_path_leaves_training_resolution_unchanged():
    tower = tiny_resnet().vision_model
    pool = tower.attention_pool
    # Resizing the table to its own grid is the identity, exactly.
    assert torch.equal(pool.interpolated_positions(2, 2), pool.position_embedding.weight)
    pixel_values = tiny_pixels(2)
    with torch.no_grad():
        plain = tower(pixel_values).pooler_output
        flagged = tower(pixel_values, interpolate_pos_encoding=True).pooler_output
    assert torch.equal(plain, flagged)


def test_hidden_states_per_stage():
    model = tiny_resnet()
    with torch.no_grad():
        output = model.get_image_features(tiny_pixels(2), output_hidden_states=True)
    shapes = [tuple(state.shape) for state in output.hidden_states]
    # Stem (stride 4), then four stages of 4·width·2^i channels at strides 4, 8, 16, 32.
    assert shapes == [(2, 8, 16, 16), (2, 32, 16, 16), (2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state)
    model.vision_model.config.output_hidden_states = True
    with torch.no_grad():
        assert len(model.vision_model(tiny_pixels(1)).hidden_states) == 5
    model.vision_model.config.output_hidden_states = False
    with torch.no_grad():
        assert model.vision_model(tiny_pixels(1)).hidden_states is None


def test_image_features_and_single_tower_models():
    model = tiny_resnet()
    pixel_values = tiny_pixels(2)
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output
        output = model(**random_text(2, 16), pixel_values=pixel_values)
        torch.testing.assert_close(output.image_embeds, nn.functional.normalize(features, dim=-1), atol=0, rtol=0)

        vision_config = model.config.vision_config
        vision_model = AutoModel.from_config(vision_config)
        assert isinstance(vision_model, HfClipVisionModel)
        assert isinstance(vision_model.vision_model, HfClipResNetModel)
        with_projection = HfClipVisionModelWithProjection(vision_config).eval()
        with_projection.vision_model.load_state_dict(model.vision_model.state_dict())
        assert isinstance(with_projection.visual_projection, nn.Identity)
        torch.testing.assert_close(with_projection(pixel_values).image_embeds, features, atol=0, rtol=0)


def test_saved_model_loads_through_auto_model_in_a_fresh_process(tmp_path):
    model = tiny_resnet()
    model.save_pretrained(tmp_path / "model")
    text, pixel_values = random_text(2, 16, lengths=[4, 16]), tiny_pixels(2)
    with torch.no_grad():
        expected = model(**text, pixel_values=pixel_values).logits_per_image
    torch.save({"text": text, "pixel_values": pixel_values, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch
        import hf_clip
        from transformers import AutoModel, AutoModelForZeroShotImageClassification

        io = torch.load({str(tmp_path / "io.pt")!r})
        for auto_class in (AutoModel, AutoModelForZeroShotImageClassification):
            model = auto_class.from_pretrained({str(tmp_path / "model")!r})
            assert type(model) is hf_clip.HfClipModel and not model.training
            assert isinstance(model.vision_model, hf_clip.HfClipResNetModel)
            with torch.no_grad():
                logits = model(**io["text"], pixel_values=io["pixel_values"]).logits_per_image
            torch.testing.assert_close(logits, io["expected"], atol=1e-5, rtol=0)
        print("loaded-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "loaded-ok" in result.stdout


def test_zero_shot_pipeline_in_a_fresh_process(tmp_path):
    """A saved ResNet model + processor answers `pipeline("zero-shot-image-classification")` in a new interpreter;
    its scores are softmax(logits_per_image) of the same model on the processor's inputs."""
    labels = ["cat", "dog", "bird", "fish"]
    tokenizer = train_clip_bpe([f"This is a photo of {label}." for label in labels] * 5, vocab_size=600)
    text_config = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
    }
    torch.manual_seed(0)
    model = HfClipModel(HfClipConfig(text_config=text_config, vision_config=dict(PARITY_RESNET), projection_dim=16))
    randomize_batch_norms(model)
    model.save_pretrained(tmp_path / "model")
    size = PARITY_RESNET["image_size"]
    image_processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "model")
    image = tiny_pixels(1, size=80)[0].mul(60).add(128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    PIL.Image.fromarray(image).save(tmp_path / "image.png")
    script = textwrap.dedent(
        f"""
        import json
        import PIL.Image
        import torch
        import hf_clip
        from transformers import AutoModel, AutoProcessor, pipeline

        folder, labels = {str(tmp_path / "model")!r}, {labels!r}
        image = PIL.Image.open({str(tmp_path / "image.png")!r})
        results = pipeline("zero-shot-image-classification", model=folder)(image, candidate_labels=labels)
        model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
        assert isinstance(model.vision_model, hf_clip.HfClipResNetModel)
        prompts = [f"This is a photo of {{label}}." for label in labels]
        inputs = processor(text=prompts, images=image, return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs).logits_per_image.softmax(dim=-1)[0].tolist()
        print(json.dumps({{"results": results, "expected": expected}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    scores = {entry["label"]: entry["score"] for entry in answer["results"]}
    assert sorted(scores) == sorted(labels)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-6)
    assert len(set(scores.values())) > 1, "random weights should still separate the labels"
    for label, expected in zip(labels, answer["expected"], strict=True):
        assert scores[label] == pytest.approx(expected, abs=1e-6)
