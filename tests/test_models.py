"""Model adapters: loading (hub id or local path, one clear error offline) and structure."""

import pytest

from lbridge.errors import LbridgeError
from lbridge.models import adapter_for, load_adapter
from lbridge.models.flux import FluxAdapter


def test_flux_without_weights_offline_names_model_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = load_adapter("flux", device="cpu")
    with pytest.raises(LbridgeError, match="model.path") as err:
        adapter.load_pipeline()
    assert "black-forest-labs/FLUX.1-dev" in str(err.value) and "\n" not in str(err.value)


def test_flux_with_a_missing_local_path_names_it(tmp_path):
    adapter = load_adapter("flux", device="cpu", path=str(tmp_path / "nowhere"))
    with pytest.raises(LbridgeError, match=r"model.path=.*nowhere does not exist"):
        adapter.load_pipeline()


def test_unknown_model_lists_the_accepted_ones():
    accepted = "dit_xl_2, flux, hunyuan_video, pixart_alpha, qwen_image, tiny, wan21_14b, wan21_1_3b"
    with pytest.raises(LbridgeError, match=rf"unknown model 'sdxl' \(accepted: {accepted}\)"):
        load_adapter("sdxl")


def test_tiny_and_flux_share_the_flux_adapter(tiny, random_flux):
    for adapter, pipe in (tiny, random_flux):
        assert adapter_for(pipe.transformer) is FluxAdapter
        blocks = adapter.blocks(pipe.transformer)
        config = pipe.transformer.config
        assert len(blocks) == config.num_layers + config.num_single_layers
        assert blocks[-1] is pipe.transformer.single_transformer_blocks[-1]  # the final block


def test_tiny_pipeline_round_trips_through_save_pretrained(tiny, tmp_path):
    adapter, pipe = tiny
    pipe.save_pretrained(tmp_path)
    reloaded = load_adapter("tiny", device="cpu", path=str(tmp_path)).load_pipeline()
    a = adapter.generate(pipe, "a handwritten digit 4", 5)
    b = adapter.generate(reloaded, "a handwritten digit 4", 5)
    assert a.tobytes() == b.tobytes()
