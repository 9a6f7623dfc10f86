"""Trainers: the single-process reference (layout.pp=1) and the DeepSpeed pipeline engines.

Only this package imports deepspeed.
"""
