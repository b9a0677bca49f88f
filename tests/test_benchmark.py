"""examples/benchmark.py: a CPU smoke run on tiny configs gives a complete, well-formed table for hf_clip,
transformers and open_clip with exactness checks passing; hf_clip's step compiles as one graph."""

import json
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import benchmark  # noqa: E402
from benchmark_impls import BUILDERS  # noqa: E402

TINY = {
    "tiny-vit": str(EXAMPLES / "benchmarks" / "tiny-vit.json"),
    "tiny-resnet": str(EXAMPLES / "benchmarks" / "tiny-resnet.json"),
}
IMPLS = ("hf_clip", "hf_clip-plain", "transformers", "open_clip")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("bench") / "results"
    argv = ["--device", "cpu", "--arch", ",".join(TINY.values()), "--batch-size", "6", "--encode-batch-size", "4"]
    argv += ["--variants", "eager", "--steps", "2", "--warmup", "1", "--matmul-size", "128", "--output", str(output)]
    # One thread: on a shared 2-core host, OpenMP workers spin-waiting for each other cost 8x the CPU time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return benchmark.main(argv), output
    finally:
        torch.set_num_threads(threads)


def _rows(results: dict, kind: str, model: str) -> dict[str, dict]:
    return {row["impl"]: row for row in results["rows"] if row["kind"] == kind and row["model"] == model}


def test_every_implementation_has_measured_training_and_encoding_rows(smoke_run):
    results, _ = smoke_run
    for kind, rate in (("train", "samples_per_s"), ("encode", "images_per_s")):
        vit = _rows(results, kind, "tiny-vit")
        assert set(vit) == set(IMPLS)
        for impl, row in vit.items():
            assert "error" not in row, (impl, row)
            assert row[rate] > 0 and row["step_min"] <= row["step_s"] <= row["step_max"]
        resnet = _rows(results, kind, "tiny-resnet")
        assert "no ResNet" in resnet["transformers"]["error"]
        assert all("error" not in resnet[impl] for impl in ("hf_clip", "hf_clip-plain", "open_clip"))
    for model in TINY:
        for impl, row in _rows(results, "train", model).items():
            if "error" not in row:
                assert row["flops_per_step"] > 0 and row["tflops"] > 0 and row["peak_mem_gb"] >= 0, impl


def test_flop_counts_show_identical_work_and_the_trimmed_text(smoke_run):
    results, _ = smoke_run
    train = _rows(results, "train", "tiny-vit")
    # The unoptimised hf_clip path does exactly transformers' work.
    assert train["hf_clip-plain"]["flops_per_step"] == train["transformers"]["flops_per_step"]
    assert train["hf_clip-plain"]["text_len"] == 77
    # The optimised path trims the text to the batch's longest caption, so it does less work.
    _, input_ids, attention_mask = benchmark.synthetic_batch(
        6, benchmark.load_config(TINY["tiny-vit"]), torch.device("cpu")
    )
    assert train["hf_clip"]["text_len"] < 77
    assert train["hf_clip"]["flops_per_step"] < train["hf_clip-plain"]["flops_per_step"]
    assert input_ids.shape == attention_mask.shape == (6, 77)


def test_optimised_step_matches_the_unoptimised_one_in_fp32(smoke_run):
    results, _ = smoke_run
    checks = [row for row in results["rows"] if row["kind"] == "exactness"]
    assert {row["model"] for row in checks} == set(TINY)
    for row in checks:
        assert row["exact"] is True, row
        assert row["loss_abs_diff"] <= 1e-5 and row["grad_rel_l2_diff"] <= 1e-5


def test_results_files_record_environment_command_and_a_table(smoke_run):
    results, output = smoke_run
    saved = json.loads(Path(f"{output}.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    progress = [json.loads(line) for line in Path(f"{output}.jsonl").read_text().splitlines()]
    assert progress[0]["kind"] == "env" and progress[1:] == saved["rows"]
    env = saved["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["open_clip_torch"]
    assert env["matmul_ceiling_tflops"] > 0 and "--arch" in env["command"] and env["cpu"]
    table = Path(f"{output}.md").read_text()
    header = "| work | model | impl | variant | batch | samples/s | × best peer | TFLOP/s | MFU | peak mem (GB) |"
    assert header in table
    lines = [line for line in table.splitlines() if line.startswith("| train") or line.startswith("| encode")]
    assert len(lines) == 2 * len(TINY) * len(IMPLS)
    assert all(line.count("|") == header.count("|") for line in lines)
    for impl in ("| hf_clip |", "| transformers |", "| open_clip |"):
        assert impl in table
    assert "| tiny-vit | eager | yes |" in table


@pytest.mark.parametrize("impl_name", ["hf_clip", "hf_clip-checkpointed"])
@pytest.mark.parametrize("model", list(TINY))
def test_hf_clip_training_step_compiles_without_graph_breaks(model, impl_name):
    config = benchmark.load_config(TINY[model])
    impl = BUILDERS[impl_name](config, torch.device("cpu"))
    impl.model.train()  # activation checkpointing is active in training mode only
    pixel_values, input_ids, attention_mask = benchmark.synthetic_batch(4, config, torch.device("cpu"))
    input_ids, attention_mask = impl.prepare_text(input_ids, attention_mask)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(impl.loss)(impl.prepare_pixels(pixel_values), input_ids, attention_mask)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_longest_caption_caps_the_synthetic_captions_but_keeps_77_columns():
    config = benchmark.load_config(TINY["tiny-vit"])
    torch.manual_seed(0)
    _, input_ids, attention_mask = benchmark.synthetic_batch(64, config, torch.device("cpu"), longest_caption=10)
    assert input_ids.shape == (64, 77) and int(attention_mask.sum(dim=1).max()) == 10
    eos_positions = (input_ids == config.text_config.eos_token_id).int().argmax(dim=1)
    assert torch.equal(eos_positions + 1, attention_mask.sum(dim=1))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        benchmark.synthetic_batch(4, config, torch.device("cpu"), longest_caption=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown implementation 'flax'"):
        benchmark.parse_args(["--impls", "hf_clip,flax"])
    with pytest.raises(ValueError, match="unknown variant"):
        benchmark.parse_args(["--variants", "jit"])
    with pytest.raises(FileNotFoundError, match="no architecture"):
        benchmark.load_config("ViT-Z-99")
