"""The diffusion math in plain torch: no fairseq imports below this package."""
