"""cdae-med: causal counterfactuals of medical images with Causal Diffusion Autoencoders."""

__version__ = "0.1.0"
