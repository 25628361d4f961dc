"""Shapes: flat-colour shapes on a plain canvas (``scene``) with GenEval-style prompts (``prompts``), an exact
pixel oracle (``oracle``) and the task samples (``tasks``)."""

from latentum.worlds.shapes.oracle import Detected, oracle, oracle_report, parse, relations, satisfies, scene_detections
from latentum.worlds.shapes.prompts import (
    CATEGORIES,
    NUMBERS,
    OPPOSITE,
    PromptSpec,
    Requirement,
    corrupt,
    sample_prompt,
)
from latentum.worlds.shapes.scene import COLORS, MIN_CANVAS, PLURALS, Obj, Scene, render
from latentum.worlds.shapes.tasks import MAX_SIZE, MIN_SIZE, QA_TYPES, qa_sample, scene_for, t2i_sample, vocabulary

__all__ = ["CATEGORIES", "COLORS", "MAX_SIZE", "MIN_CANVAS", "MIN_SIZE", "NUMBERS", "OPPOSITE", "PLURALS", "QA_TYPES",
           "Detected",
           "Obj", "PromptSpec", "Requirement", "Scene", "corrupt", "oracle", "oracle_report", "parse", "qa_sample",
           "relations", "render", "sample_prompt", "satisfies", "scene_detections", "scene_for", "t2i_sample",
           "vocabulary"]
