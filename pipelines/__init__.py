"""Runs built on the cdae_med library: training, counterfactuals, evaluation, the CLI."""
