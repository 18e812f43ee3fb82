"""Pretraining: backbones, noise schedules, the training loop, launchers and publishing."""
