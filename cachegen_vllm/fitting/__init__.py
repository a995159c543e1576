"""Fitting a calibrated basis to a model's checkpoint: the model's KV on a sample of text
(`sample`), the statistics and the fit (`basis`), and the automatic basis a producer asks for at
start-up (`auto`: fitted once per checkpoint by ``python -m cachegen_vllm.fitting`` in a process of
its own, and cached). Below the connector and the offline tools, which both use it."""
