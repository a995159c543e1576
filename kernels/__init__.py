"""Triton kernels (imported as ``cachegen_vllm.kernels``): paged-cache encode and decode.

They produce and read the bytes of docs/FORMAT.md and are tested against the reference codec in
``cachegen_vllm.codec.reference`` under TRITON_INTERPRET=1. Not written yet: see NOTES.md.
"""
