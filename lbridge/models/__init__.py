"""Model adapters: one module and one `conf/model/<name>.yaml` per model family."""

from lbridge.models.base import ModelAdapter, adapter_for, available_models, load_adapter

__all__ = ["ModelAdapter", "adapter_for", "available_models", "load_adapter"]
