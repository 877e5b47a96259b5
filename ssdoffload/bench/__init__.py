"""The benchmark behind `python -m ssdoffload bench|probe` and its built-in GPT model."""
