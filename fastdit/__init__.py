"""fastdit: a regression benchmark suite for inference optimizations of Diffusion Transformers."""
