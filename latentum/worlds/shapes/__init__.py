"""Shapes: flat-colour shapes on a plain canvas (``scene``) with GenEval-style prompts (``prompts``), an exact
pixel oracle (``oracle``) and the task samples (``tasks``)."""

from latentum.worlds.shapes import flaws, tasks
from latentum.worlds.shapes.flaws import inject_flaw, refine_sample, reflect_sample
from latentum.worlds.shapes.oracle import Detected, oracle, oracle_report, parse, relations, satisfies, scene_detections
from latentum.worlds.shapes.prompts import (
    CATEGORIES,
    GENEVAL_TEMPLATE,
    NUMBERS,
    OPPOSITE,
    PromptSpec,
    Requirement,
    corrupt,
    sample_prompt,
)
from latentum.worlds.shapes.scene import COLORS, MIN_CANVAS, PLURALS, SHAPES, Obj, Scene, render
from latentum.worlds.shapes.tasks import (
    MAX_SIZE,
    MIN_SIZE,
    QA_TYPES,
    checks_text,
    describe_sample,
    describe_text,
    qa_checks_sample,
    qa_sample,
    qa_steps_sample,
    scene_for,
    t2i_photo_sample,
    t2i_reason_sample,
    t2i_sample,
)


def vocabulary() -> set[str]:
    """Every word of the Shapes prompts (both phrasings), questions, answers and R3 instructions."""
    return tasks.vocabulary() | flaws.vocabulary()


__all__ = ["CATEGORIES", "COLORS", "GENEVAL_TEMPLATE", "MAX_SIZE", "MIN_CANVAS", "MIN_SIZE", "NUMBERS", "OPPOSITE",
           "PLURALS", "QA_TYPES", "SHAPES", "Detected", "Obj", "PromptSpec", "Requirement", "Scene", "checks_text",
           "corrupt", "describe_sample", "describe_text", "inject_flaw", "oracle", "oracle_report", "parse",
           "qa_checks_sample", "qa_sample", "qa_steps_sample", "reflect_sample", "refine_sample", "relations",
           "render", "sample_prompt", "satisfies", "scene_detections", "scene_for", "t2i_photo_sample",
           "t2i_reason_sample", "t2i_sample", "vocabulary"]
