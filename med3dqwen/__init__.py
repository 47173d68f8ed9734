"""Med3DQwen: slice-wise boundary prompting for 3D CT vision-language models."""

__version__ = "0.1.0.dev0"
