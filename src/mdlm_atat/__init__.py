"""mdlm_atat: masked diffusion language models with adaptive time-aware token masking."""

__version__ = "0.1.0"
