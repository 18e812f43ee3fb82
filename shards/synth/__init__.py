"""Synthetic multi-joint MSK studies: the embedded default data source (no download needed)."""

from .study import KspaceConfig, PatientPlan, SynthConfig, generate_study, iter_study_refs, plan_patient

__all__ = ["KspaceConfig", "PatientPlan", "SynthConfig", "generate_study", "iter_study_refs", "plan_patient"]
