"""Prompt sets: line files (DrawBench, PartiPrompts format), digit class prompts, seeds = base + index."""

import pytest
from omegaconf import OmegaConf

from lbridge.errors import LbridgeError
from lbridge.prompts import load_prompts


def file_prompts(path):
    return OmegaConf.create(
        {"_target_": "lbridge.prompts.TextFilePrompts", "name": "drawbench", "path": str(path)}
    )


def test_line_file_gives_prompts_in_order_with_seed_plus_index(tmp_path):
    path = tmp_path / "DrawBench200.txt"
    path.write_text("A red colored car.\n\nA black colored car.\nA pink colored car.\n")
    prompts = load_prompts(file_prompts(path), num_prompts=2, seed=42)
    assert [(p.index, p.text, p.seed) for p in prompts] == [
        (0, "A red colored car.", 42),
        (1, "A black colored car.", 43),
    ]


def test_missing_and_empty_files_name_prompts_path(tmp_path):
    with pytest.raises(LbridgeError, match=r"prompts.path=.*nothere.txt is not a file"):
        load_prompts(file_prompts(tmp_path / "nothere.txt"), 5, 0)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LbridgeError, match="holds no prompts"):
        load_prompts(file_prompts(tmp_path / "empty.txt"), 5, 0)


def test_digit_prompts_cycle_through_the_classes():
    cfg = OmegaConf.create({"_target_": "lbridge.prompts.DigitPrompts", "name": "digits"})
    texts = [p.text for p in load_prompts(cfg, 12, 0)]
    assert (
        texts[0] == "a handwritten digit 0" and texts[9] == "a handwritten digit 9" and texts[10] == texts[0]
    )


def test_num_prompts_must_be_positive():
    cfg = OmegaConf.create({"_target_": "lbridge.prompts.DigitPrompts", "name": "digits"})
    with pytest.raises(LbridgeError, match="num_prompts=0"):
        load_prompts(cfg, 0, 0)
