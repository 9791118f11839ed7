"""Async inference gateway: cache tiers, single-flight and micro-batching in front of models."""

from gateway.app import create_app
from gateway.settings import Settings

__all__ = ["Settings", "create_app"]
