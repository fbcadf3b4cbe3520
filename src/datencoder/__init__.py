"""datencoder: domain-agnostic tuning-encoder for fast personalization (Arar et al. 2023)."""

__version__ = "0.1.0"
