"""Evaluation metrics of run directories (``mvsdi eval``); see docs/evaluation.md.

Models load only when a metric needs them; importing this package imports no transformers.
"""

from mvsdi.evaluate.clip_metrics import (ClipScorer, MetricLoadError, clip_iqa, clip_score, cosine_matrix, janus_score,
                                         load_hpsv2, openclip_to_transformers, r_precision)
from mvsdi.evaluate.divergence import Divergence, check_divergence, is_degenerate
from mvsdi.evaluate.image_reward import ImageRewardScorer, image_reward_to_ours, load_image_reward
from mvsdi.evaluate.protocol import OURS, PROTOCOLS, REFERENCE, EvaluationProtocol, get_protocol, reference_view_indices
from mvsdi.evaluate.run_folder import RunError, benchmark_prompts, read_prompt_file, read_run
from mvsdi.evaluate.runs import DEFAULT_METRICS, KNOWN_METRICS, Evaluator, evaluate_run

__all__ = ["ClipScorer", "MetricLoadError", "clip_iqa", "clip_score", "cosine_matrix", "janus_score", "load_hpsv2",
           "openclip_to_transformers", "r_precision", "ImageRewardScorer", "image_reward_to_ours",
           "load_image_reward", "Divergence", "check_divergence", "is_degenerate",
           "OURS", "PROTOCOLS", "REFERENCE", "EvaluationProtocol", "get_protocol", "reference_view_indices",
           "DEFAULT_METRICS", "KNOWN_METRICS", "Evaluator", "RunError", "benchmark_prompts", "evaluate_run",
           "read_prompt_file", "read_run"]
