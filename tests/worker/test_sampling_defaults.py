"""Sampling defaults: a model's generation_config.json values, else OpenAI's."""

from __future__ import annotations

from transformers import GenerationConfig

from worker.sampling import SamplingDefaults


def test_a_model_without_sampling_settings_gets_openai_defaults() -> None:
    defaults = SamplingDefaults.from_generation_config(GenerationConfig(eos_token_id=2))
    assert defaults == SamplingDefaults(temperature=1.0, top_p=1.0, top_k=0)


def test_a_model_recommendation_becomes_the_default() -> None:
    config = GenerationConfig(do_sample=True, temperature=0.2, top_p=0.9, top_k=40)
    assert SamplingDefaults.from_generation_config(config) == SamplingDefaults(0.2, 0.9, 40)
