"""Evaluation metrics: their formulas, their plumbing with random backbones, and one-line errors offline.

Pretrained weights are never available here, so every backbone is either the digit classifier
shipped with lbridge or randomly initialised (open_clip `pretrained=None`, lpips `pnet_rand=True`,
ImageReward with random tensors of the checkpoint's layout). These test the wiring and the formulas,
not the published numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lbridge.errors import LbridgeError
from lbridge.metrics import image_reward as ir
from lbridge.metrics.clip_score import FORMULA, CLIPScore, clip_score, random_open_clip
from lbridge.metrics.fid import FID, KID
from lbridge.metrics.lpips_metric import LPIPS
from lbridge.metrics.reference import psnr, ssim
from lbridge.metrics.vbench_metric import VBenchScore
from lbridge.tiny.data import digits_16

#: vbench is an optional extra, not installed in lbridge's environment.
NO_VBENCH = pytest.mark.skipif(importlib.util.find_spec("vbench") is not None, reason="vbench is installed")


def lbridge(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lbridge.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def digit_images(start: int, stop: int) -> torch.Tensor:
    """Real digits (scikit-learn's, 16x16) as uint8 (N, 1, 16, 16), the tiny model's image format."""
    images, _ = digits_16()
    return ((images[start:stop] + 1) * 127.5).round().to(torch.uint8)


def noise_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array.astype(np.uint8))


# --- FID / KID on the shipped digit classifier's features ------------------------------------------------


def fid_of(real: torch.Tensor, generated: torch.Tensor, **kwargs) -> float:
    metric = FID(feature="digit_classifier", **kwargs)
    metric.update(real, real=True)
    metric.update(generated, real=False)
    return float(metric.compute())


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_the_distribution_gap():
    real = digit_images(0, 300)
    assert abs(fid_of(real, real)) < 1e-3
    same_distribution = fid_of(real, digit_images(300, 600))
    different = fid_of(real, noise_images(300))
    assert 0 < same_distribution < different / 10


def test_fid_accepts_pil_images_and_grayscale_or_rgb_alike():
    real = digit_images(0, 50)
    as_pil = [Image.fromarray(a[0].numpy()) for a in real]
    metric = FID(feature="digit_classifier")
    metric.update(real.expand(-1, 3, -1, -1), real=True)
    metric.update(as_pil, real=False)
    assert abs(float(metric.compute())) < 1e-3


def test_kid_is_near_zero_for_the_same_distribution_and_positive_for_a_different_one():
    def kid(generated):
        metric = KID(feature="digit_classifier", subsets=20, subset_size=100)
        metric.update(digit_images(0, 300), real=True)
        metric.update(generated, real=False)
        return [float(v) for v in metric.compute()]

    same_mean, _ = kid(digit_images(300, 600))
    different_mean, different_std = kid(noise_images(300))
    assert different_mean > 0 and different_mean > 5 * different_std
    assert abs(same_mean) < different_mean / 20


def test_kid_subset_larger_than_the_sets_is_one_line_naming_the_key():
    metric = KID(feature="digit_classifier", subset_size=10, config_key="metrics.digit_kid")
    metric.update(digit_images(0, 6), real=True)
    metric.update(digit_images(6, 12), real=False)
    with pytest.raises(LbridgeError, match=r"metrics.digit_kid.subset_size=10 is more than the 6 images"):
        metric.compute()


def test_unknown_fid_feature_names_the_accepted_ones():
    with pytest.raises(
        LbridgeError, match=r"unknown metrics.fid.feature 'vgg' \(accepted: inception, digit_classifier\)"
    ):
        FID(feature="vgg")


@pytest.fixture()
def random_inception_file(tmp_path, monkeypatch):
    """torch-fidelity's InceptionV3 with random weights, saved as its weights file would be."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # Build it with nothing to load and nothing loaded, then save the random weights it has.
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: {})
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, strict=True: None)
    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    monkeypatch.undo()
    path = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save(model.state_dict(), path)
    return path


def test_fid_inception_loads_local_weights_and_gives_2048_d_pool_features(random_inception_file, monkeypatch):
    monkeypatch.setattr(torch, "load", _refuse_unpickling(torch.load))
    metric = FID(feature="inception", inception_path=str(random_inception_file))
    metric.update(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), real=True)
    assert metric.real_features_sum.shape == (2048,) and int(metric.real_features_num_samples) == 2


def _refuse_unpickling(load):
    """torch.load as lbridge may use it: the weights file must pass weights_only=True first."""
    checked = set()

    def guarded(path, *args, weights_only=None, **kwargs):
        if weights_only:
            checked.add(str(path))
        elif str(path) not in checked:
            raise AssertionError(f"{path} unpickled before a weights_only check")
        return load(path, *args, weights_only=weights_only, **kwargs)

    return guarded


class Payload:
    """Unpickling this would run code (here a harmless print): lbridge must never unpickle it."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_fid_weights_file_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(LbridgeError, match=r"metrics.fid.inception_path=.*is not a tensor checkpoint"):
        FID(feature="inception", inception_path=str(path))


# --- PSNR / SSIM --------------------------------------------------------------------------------------------


def test_psnr_and_ssim_equal_scikit_image_on_the_same_pixels():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (32, 32, 3))
    image = np.clip(reference + rng.integers(-20, 21, (32, 32, 3)), 0, 255)
    assert psnr(pil(image), pil(reference)) == pytest.approx(
        peak_signal_noise_ratio(reference.astype(np.uint8), image.astype(np.uint8), data_range=255)
    )
    expected = structural_similarity(
        reference.astype(np.uint8), image.astype(np.uint8), data_range=255, channel_axis=-1
    )
    assert ssim(pil(image), pil(reference)) == pytest.approx(expected)
    assert psnr(pil(reference), pil(reference)) == math.inf and ssim(pil(reference), pil(reference)) == 1.0


# --- CLIP score ---------------------------------------------------------------------------------------------


def test_clip_score_of_known_embeddings_is_100_max_cos_0():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [3.0, 4.0]])
    expected = [100 / math.sqrt(2), 0.0, 100.0]  # cos 1/sqrt(2); negative cos -> 0; identical -> 100
    assert clip_score(image, text).tolist() == pytest.approx(expected)
    assert FORMULA == "100 * max(cos(image_emb, text_emb), 0)"


@pytest.fixture(scope="module")
def tiny_clip():
    """A random-init open_clip CLIP (pretrained=None) at toy size, with the real BPE tokenizer."""
    return random_open_clip()


def test_clip_score_metric_averages_100_max_cos_of_the_models_own_embeddings(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    metric = CLIPScore(
        model_name="toy", pretrained="random", model=model, preprocess=preprocess, tokenizer=tokenizer
    )
    images = [pil(np.full((40, 40, 3), c)) for c in ((255, 0, 0), (0, 0, 255), (20, 200, 20))]
    prompts = ["a red square", "a blue square", "a green square"]
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])  # batches accumulate
    image_emb, text_emb = metric.embeddings(images, prompts)
    expected = (100 * torch.nn.functional.cosine_similarity(image_emb, text_emb).clamp(min=0)).mean()
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-5)
    assert "100 * max(cos" in metric.description and "toy / random" in metric.description


def test_clip_score_random_weights_needs_nothing_offline_and_says_random(offline):
    metric = CLIPScore(random_weights=True)
    metric.update([pil(np.full((40, 40, 3), 90))], ["a red car"])
    assert math.isfinite(float(metric.compute())) and "toy / random" in metric.description


def test_clip_score_unknown_tag_lists_the_accepted_ones():
    with pytest.raises(
        LbridgeError, match=r"unknown metrics.clip_score.pretrained 'nope' for ViT-L-14 \(accepted: .*openai"
    ):
        CLIPScore(model_name="ViT-L-14", pretrained="nope")


# --- LPIPS --------------------------------------------------------------------------------------------------


def test_lpips_is_zero_for_identical_images_and_positive_otherwise():
    torch.manual_seed(0)
    metric = LPIPS(pnet_rand=True)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    metric.update(images, images)
    assert float(metric.compute()) == 0.0
    metric.reset()
    metric.update(images, 255 - images)
    assert float(metric.compute()) > 0


def test_lpips_upsamples_tiny_images_and_loads_a_local_alexnet(tmp_path):
    import torchvision

    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)  # random AlexNet in torchvision's layout
    metric = LPIPS(alexnet_path=str(path))
    digits = digit_images(0, 2)  # 16x16 grayscale, like the tiny model's samples
    metric.update(digits, digit_images(2, 4))
    assert float(metric.compute()) > 0
    state = torch.load(path, weights_only=True)
    assert torch.equal(getattr(metric.net.net.slice2, "3").weight, state["features.3.weight"])


# --- ImageReward --------------------------------------------------------------------------------------------


#: A small config of the same structure (and so the same tensor names) as ImageReward v1.0.
@pytest.fixture(scope="module")
def bert_tokenizer():
    """A word-level BERT tokenizer (offline stand-in for bert-base-uncased) with BLIP's added tokens."""
    return ir.toy_tokenizer()


def small_reward_model(vocab: int) -> ir.RewardModel:
    return ir.toy_reward_model(vocab)


def test_image_reward_full_size_layout_matches_the_published_checkpoint():
    # Built on the meta device: names and shapes only, no 1.8 GB of memory.
    with torch.device("meta"):
        state = ir.to_checkpoint(ir.RewardModel().state_dict())
    assert len(state) == 620  # ViT-L: 4 + 24 x 12 + 2; BERT + cross-attention: 4 + 12 x 26; head: 10
    assert sum(t.numel() for t in state.values()) == pytest.approx(446.2e6, rel=1e-3)
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, 1024),
        "blip.visual_encoder.pos_embed": (1, 197, 1024),
        "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "blip.visual_encoder.blocks.23.mlp.fc1.weight": (4096, 1024),
        "blip.visual_encoder.norm.weight": (1024,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "blip.text_encoder.encoder.layer.11.attention.self.query.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.output.LayerNorm.weight": (768,),
        "mlp.layers.0.weight": (1024, 768),
        "mlp.layers.2.weight": (128, 1024),
        "mlp.layers.4.weight": (64, 128),
        "mlp.layers.6.weight": (16, 64),
        "mlp.layers.7.weight": (1, 16),
    }
    assert {name: tuple(state[name].shape) for name in shapes} == shapes


def test_image_reward_random_checkpoint_round_trips_and_scores_each_image(tmp_path, bert_tokenizer):
    torch.manual_seed(0)
    source = small_reward_model(len(bert_tokenizer))
    checkpoint = ir.to_checkpoint(source.state_dict())
    # Tensors the published file also holds and the reward does not use: ignored when loading.
    checkpoint["blip.vision_proj.weight"] = torch.zeros(256, 32)
    checkpoint["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    path = tmp_path / "ImageReward.pt"
    torch.save(checkpoint, path)

    loaded = ir.load_reward_model(
        str(path), "metrics.image_reward.checkpoint_path", small_reward_model(len(bert_tokenizer))
    )
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())

    metric = ir.ImageReward(model=loaded, tokenizer=bert_tokenizer, batch_size=2)
    images = [pil(np.full((48, 40, 3), c)) for c in ((255, 0, 0), (0, 0, 255), (9, 9, 9))]
    prompts = ["a red square", "a blue cat", "the square of the cat"]
    scores = metric.scores(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()

    # reward = (head - mean) / std, and the metric is the mean reward over its batches.
    tokens = bert_tokenizer(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        head = loaded.head_output(loaded.preprocess(images), tokens.input_ids, tokens.attention_mask)
    assert torch.allclose(scores, (head - 0.16717362830052426) / 1.0333394966054072, atol=1e-6)
    metric.update(images, prompts)
    assert float(metric.compute()) == pytest.approx(float(scores.mean()), abs=1e-6)


def test_image_reward_random_weights_needs_nothing_offline_and_says_so(offline):
    metric = ir.ImageReward(random_weights=True)
    metric.update([pil(np.full((40, 40, 3), 90))] * 2, ["a red car", "a photo of a dog"])
    assert math.isfinite(float(metric.compute())) and "random weights" in metric.description


def test_image_reward_ignores_prompt_padding(bert_tokenizer):
    # The [CLS] output must not depend on how far the prompt is padded: the attention mask is applied.
    torch.manual_seed(1)
    model = small_reward_model(len(bert_tokenizer)).eval()
    pixels = model.preprocess([pil(np.full((32, 32, 3), 128))])
    short = bert_tokenizer(["a red cat"], return_tensors="pt")
    padded = bert_tokenizer(["a red cat"], padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        a = model(pixels, short.input_ids, short.attention_mask)
        b = model(pixels, padded.input_ids, padded.attention_mask)
    assert torch.allclose(a, b, atol=1e-5)


def test_image_reward_checkpoint_missing_tensors_is_one_line(tmp_path, bert_tokenizer):
    checkpoint = ir.to_checkpoint(small_reward_model(len(bert_tokenizer)).state_dict())
    del checkpoint["mlp.layers.7.weight"]
    path = tmp_path / "partial.safetensors"
    from safetensors.torch import save_file

    save_file(checkpoint, path)
    with pytest.raises(
        LbridgeError, match=r"is not an ImageReward checkpoint: 1 tensors missing, e.g. 'mlp.layers.7.weight'"
    ):
        ir.load_reward_model(
            str(path), "metrics.image_reward.checkpoint_path", small_reward_model(len(bert_tokenizer))
        )


# --- offline: every pretrained metric stops with one line naming its config key -----------------------------


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch.hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty HF cache


@pytest.mark.parametrize(
    "build,key",
    [
        (lambda: FID(feature="inception"), "metrics.fid.inception_path"),
        (lambda: KID(feature="inception", config_key="metrics.kid"), "metrics.kid.inception_path"),
        (lambda: LPIPS(), "metrics.lpips.alexnet_path"),
        (lambda: CLIPScore(model_name="ViT-B-32", pretrained="openai"), "metrics.clip_score.checkpoint_path"),
        (lambda: ir.ImageReward(), "metrics.image_reward.checkpoint_path"),
        (
            lambda: ir.load_tokenizer("bert-base-uncased", "metrics.image_reward.tokenizer_path"),
            "metrics.image_reward.tokenizer_path",
        ),
    ],
    ids=["fid", "kid", "lpips", "clip_score", "image_reward", "image_reward_tokenizer"],
)
def test_pretrained_metric_offline_is_one_line_naming_the_config_key(offline, build, key):
    with pytest.raises(LbridgeError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and message.endswith(f"set {key} to a local copy"), message


def test_local_weight_path_that_is_not_a_file_is_named():
    with pytest.raises(LbridgeError, match=r"^metrics.lpips.alexnet_path=/nowhere.pth is not a file$"):
        LPIPS(alexnet_path="/nowhere.pth")


@NO_VBENCH
def test_vbench_without_the_package_says_how_to_install_it():
    with pytest.raises(
        LbridgeError, match=r"^metric 'vbench' needs the vbench package: pip install 'lbridge\[video\]'$"
    ):
        VBenchScore()


# --- lbridge eval on the tiny model ------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_on_tiny_writes_digit_fid_and_kid_against_the_reference_run(tmp_path):
    assert lbridge("sample", "method=fora", "ratio=3", "num_prompts=4", cwd=tmp_path).returncode == 0
    metrics = ["model.metrics=[psnr,digit_fid,digit_kid]", "metrics.digit_kid.subset_size=4",
               "metrics.digit_kid.subsets=5"]  # fmt: skip
    result = lbridge("eval", "method=fora", "ratio=3", "num_prompts=4", *metrics, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs" / "sample" / "tiny").glob("fora-*")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["digit_fid"] > 0 and math.isfinite(metrics["digit_kid"]) and metrics["digit_kid_std"] >= 0
    assert "same-seed full-compute" in metrics["metric_notes"]["digit_fid"]

    # The reference run against itself: zero distance; its default metrics include digit_fid.
    assert lbridge("eval", "method=none", "num_prompts=4", cwd=tmp_path).returncode == 0
    (ref,) = (tmp_path / "outputs" / "sample" / "tiny").glob("none-*")
    assert abs(json.loads((ref / "metrics.json").read_text())["digit_fid"]) < 1e-3
    report = lbridge("report", cwd=tmp_path)
    assert report.returncode == 0 and "digit_fid: FID" in report.stdout and "| fora" in report.stdout


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.metrics=[fid]"], "set metrics.fid.inception_path to a local copy"),
        (
            ["model.metrics=[lpips]", "metrics.lpips.alexnet_path=/none.pth"],
            "metrics.lpips.alexnet_path=/none.pth is",
        ),
        (
            ["model.metrics=[bleu]"],
            "unknown metric 'bleu' in model.metrics (accepted: psnr, ssim, digit_accuracy, clip_score,",
        ),
        (
            ["model.metrics=[digit_kid]"],
            "metrics.digit_kid.subset_size=10 is more than the 2 images of a set",
        ),
        pytest.param(["model.metrics=[vbench]"], "pip install 'lbridge[video]'", marks=NO_VBENCH),
    ],
    ids=["fid-offline", "lpips-path", "unknown", "kid-subset", "vbench"],
)
def test_eval_metric_errors_are_one_line(offline, tmp_path, overrides, message):
    # `lbridge eval` in-process on a fake finished reference run (the CLI prints the same message).
    from lbridge.commands import eval as eval_command

    cfg = _fake_reference_run(tmp_path, overrides)
    with pytest.raises(LbridgeError) as err:
        eval_command.run(cfg)
    assert "\n" not in str(err.value) and message in str(err.value)


def test_eval_of_a_config_composed_for_sample_reads_the_packaged_metric_nodes(tmp_path):
    # The results scripts compose `sample` (no `metrics` node) and call eval.run on it.
    from lbridge.commands import eval as eval_command

    cfg = _fake_reference_run(tmp_path, ["model.metrics=[digit_fid]"], command="sample")
    metrics = json.loads((eval_command.run(cfg) / "metrics.json").read_text())
    assert abs(metrics["digit_fid"]) < 1e-3 and "digit classifier" in metrics["metric_notes"]["digit_fid"]


def _fake_reference_run(root, overrides: list[str], command: str = "eval"):
    """The eval config, and two finished samples where `lbridge sample method=none num_prompts=2` writes."""
    from hydra import compose, initialize_config_dir

    from lbridge.config import CONF_DIR
    from lbridge.io import append_jsonl
    from lbridge.runs import sample_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        args = ["method=none", "num_prompts=2", f"output_root={root / 'outputs'}", *overrides]
        cfg = compose(command, overrides=args)
    run = sample_dir(cfg)
    run.mkdir(parents=True)
    for i, prompt in enumerate(["a handwritten digit 0", "a handwritten digit 1"]):
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(run / f"{i:05d}.png")
        record = {"index": i, "prompt": prompt, "seed": i, "file": f"{i:05d}.png", "latency_s": 1.0,
                  "flops": 1.0, "schedule": "F"}  # fmt: skip
        append_jsonl(run / "samples.jsonl", record)
    return cfg
