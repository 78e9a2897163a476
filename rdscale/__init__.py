"""rdscale: reverse distillation of the ESM-2 family at cluster scale."""

__version__ = "0.1.0"
