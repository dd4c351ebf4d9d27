"""Models running in this process: torch/transformers on the detected device."""
