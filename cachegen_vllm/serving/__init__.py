"""Serving tools: the OpenAI-compatible P/D proxy (`proxy`), vLLM servers and vLLM's P/D router as
child processes (`launch`), the main job (`demo`) and the ``cachegen-vllm`` command (`cli`)."""
