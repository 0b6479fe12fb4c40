"""Configuration: presets (``configs/*.yaml``), their schema, and every training default."""
