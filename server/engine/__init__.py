"""The inference engine: vLLM AsyncLLM behind a small class (vLLM is imported only in ``vllm_engine``)."""
