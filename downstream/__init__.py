"""Downstream clinical heads on published backbones: tasks, cached features, heads, metrics."""
