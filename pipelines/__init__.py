"""Sampling pipelines (imported as ldm.pipelines)."""
from ldm.pipelines.checks import NonFiniteError
from ldm.pipelines.output import PipelineOutput, StepRecord
from ldm.pipelines.stable import Pipeline

__all__ = ["NonFiniteError", "Pipeline", "PipelineOutput", "StepRecord"]
