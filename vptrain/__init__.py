"""vptrain: pipeline-parallel GPT training with Vocabulary Parallelism on DeepSpeed."""

__version__ = "0.1.0"
