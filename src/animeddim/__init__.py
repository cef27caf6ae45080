"""animeddim: denoising diffusion implicit models for anime faces and any image folder."""

__version__ = "0.1.0"
