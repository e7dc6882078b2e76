"""Acceleration methods: one module and one `conf/method/<name>.yaml` each (found by name)."""

from lbridge.methods.base import CacheMethod, available_methods, load_method

__all__ = ["CacheMethod", "available_methods", "load_method"]
