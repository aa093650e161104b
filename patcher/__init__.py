"""patcher: compute, export and verify weight patches that erase knowledge from models."""

__version__ = "0.1.0"
