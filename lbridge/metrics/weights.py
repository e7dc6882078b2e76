"""Pretrained weights of metric backbones: local paths, cached downloads, one-line errors offline.

Every pretrained-weight metric has a config key for a local file (e.g. `metrics.fid.inception_path`).
When that key is null the weights come from the usual cache (torch.hub for Inception/AlexNet, the
Hugging Face cache for CLIP, ImageReward and BERT) or are downloaded; when neither works, the metric
stops with one line naming the key. `HF_HUB_OFFLINE=1` (set by the tests) also stops torch.hub
downloads, so an offline run never waits on the network. Checkpoints are read with safetensors or
`torch.load(weights_only=True)`: never by unpickling arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lbridge.errors import LbridgeError


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def weights_error(key: str, what: str, cause: BaseException | str | None = None) -> LbridgeError:
    """The one line every metric gives when its weights are missing: what, why, which key to set."""
    why = str(cause).strip().splitlines()[0] if cause else "not found"
    why = why if len(why) <= 160 else why[:157] + "..."
    return LbridgeError(f"{what} weights unavailable ({why}): set {key} to a local copy")


def local_file(path: str | os.PathLike, key: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise LbridgeError(f"{key}={path} is not a file")
    return file


def load_state_dict(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """A checkpoint of tensors (safetensors, or a torch file readable with weights_only=True)."""
    file = local_file(path, key)
    if file.suffix == ".safetensors":
        return load_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with arbitrary objects is refused, not executed
        detail = str(err).strip().splitlines()[0][:120]
        raise LbridgeError(f"{key}={path} is not a tensor checkpoint ({detail})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LbridgeError(f"{key}={path} does not hold a state dict of tensors")
    return state


def torch_hub_file(url: str, key: str, what: str) -> Path:
    """The torch.hub cache's copy of `url` (downloading it when online); one-line error otherwise."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if cached.is_file():
        return cached
    if is_offline():
        raise weights_error(key, what, "offline (HF_HUB_OFFLINE=1) and not in the torch.hub cache")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as err:
        raise weights_error(key, what, err) from None
    return cached


def hf_hub_file(repo_id: str, filename: str, key: str, what: str) -> Path:
    """A file from the Hugging Face hub (or its cache, which HF_HUB_OFFLINE=1 still reads)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:
        raise weights_error(key, what, err) from None
