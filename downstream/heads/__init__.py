"""Heads on frozen-backbone features and the baselines trained in the same interface.

Every model takes a dict of inputs (``{plane: [feature maps]}`` for feature heads, ``{plane:
volume}`` for baselines, plus ``"ehr"`` for EHR fusion) and returns logits.
"""
