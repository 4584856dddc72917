"""Sampling pipelines (imported as ldm.pipelines)."""
from ldm.pipelines.output import PipelineOutput, StepRecord
from ldm.pipelines.stable import Pipeline

__all__ = ["Pipeline", "PipelineOutput", "StepRecord"]
