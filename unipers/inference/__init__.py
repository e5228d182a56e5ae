"""Inference: ask, recognize, generate with any number of concepts loaded over one base."""

from unipers.inference.session import GenerationSettings, InferenceSession, InputError  # noqa: F401
