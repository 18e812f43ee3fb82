"""Reconstruction meets analysis: the multitask vs sequential vs zero-filled study
(:mod:`.multitask_study`) and the acceleration study (:mod:`.acceleration`); commands in :mod:`.cli`."""
