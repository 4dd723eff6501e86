"""The ~25M-parameter MiniGPT on the stdlib plus site-packages (GPU)."""

from minigpt_jax.config import base_config


def get_config():
  return base_config()
