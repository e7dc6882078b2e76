"""Prompt sets: line files (DrawBench, PartiPrompts format), digit class prompts, seeds = base + index."""

import json

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


def reader(target: str, **keys):
    return OmegaConf.create({"_target_": f"lbridge.prompts.{target}", **keys})


def test_list_prompts_come_from_the_config_and_must_not_be_empty():
    prompts = load_prompts(reader("ListPrompts", texts=["a cat", " ", "a dog"]), 5, 3)
    assert [(p.text, p.seed) for p in prompts] == [("a cat", 3), ("a dog", 4)]
    with pytest.raises(LbridgeError, match="prompts.texts is empty"):
        load_prompts(reader("ListPrompts", texts=[]), 5, 0)


def coco_file(path):
    annotations = [
        {"image_id": 9, "id": 2, "caption": "A dog  on a\nbeach."},
        {"image_id": 9, "id": 1, "caption": "A dog running."},
        {"image_id": 3, "id": 7, "caption": "Two cats."},
    ]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


def test_coco_captions_take_the_first_caption_of_each_image_by_image_id(tmp_path):
    cfg = reader("CocoCaptions", path=str(coco_file(tmp_path / "captions_val2017.json")))
    assert [p.text for p in load_prompts(cfg, 10, 0)] == ["Two cats.", "A dog running."]


def test_a_file_that_is_not_coco_captions_is_one_line_naming_prompts_path(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(LbridgeError, match=r"prompts.path=.*bad.json is not a COCO captions file"):
        load_prompts(reader("CocoCaptions", path=str(tmp_path / "bad.json")), 10, 0)


def vbench_info(path):
    entries = [
        {"prompt_en": "a cat walking", "dimension": ["subject_consistency"]},
        {"prompt_en": "a car on a road", "dimension": ["motion_smoothness", "subject_consistency"]},
        {"prompt_en": "fireworks", "dimension": ["color"]},
    ]
    path.write_text(json.dumps(entries))
    return path


def test_vbench_prompts_read_the_text_list_or_one_dimension_of_the_full_info(tmp_path):
    (tmp_path / "all_dimension.txt").write_text("a cat walking\nfireworks\n")
    listed = load_prompts(reader("VBenchPrompts", path=str(tmp_path / "all_dimension.txt")), 9, 0)
    assert [p.text for p in listed] == ["a cat walking", "fireworks"]
    info = str(vbench_info(tmp_path / "VBench_full_info.json"))
    everything = load_prompts(reader("VBenchPrompts", path=info), 9, 0)
    assert len(everything) == 3
    subject = load_prompts(reader("VBenchPrompts", path=info, dimension="subject_consistency"), 9, 0)
    assert [p.text for p in subject] == ["a cat walking", "a car on a road"]
    with pytest.raises(LbridgeError, match=r"unknown prompts.dimension 'nope' \(accepted: color, motion"):
        load_prompts(reader("VBenchPrompts", path=info, dimension="nope"), 9, 0)


def test_every_packaged_prompt_config_names_an_existing_reader():
    from hydra.utils import get_class

    from lbridge.config import CONF_DIR, group_options

    for name in group_options("prompts"):
        node = OmegaConf.load(CONF_DIR / "prompts" / f"{name}.yaml")
        assert callable(get_class(node._target_)), name
