"""Shapes: flat-colour shapes on a plain canvas with GenEval-style prompts, an exact pixel oracle and the task
samples (``scene``)."""

from latentum.worlds.shapes.scene import (
    CATEGORIES,
    PromptSpec,
    Scene,
    corrupt,
    oracle,
    oracle_report,
    parse,
    qa_sample,
    render,
    sample_prompt,
    scene_for,
    t2i_sample,
)

__all__ = ["CATEGORIES", "PromptSpec", "Scene", "corrupt", "oracle", "oracle_report", "parse", "qa_sample", "render",
           "sample_prompt", "scene_for", "t2i_sample"]
