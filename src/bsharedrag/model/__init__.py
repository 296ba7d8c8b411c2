"""Inference parts: model sources and the GGUF conversion, the shared backbone with its adapters, the
encoder and its pooling, prompts, decoding, the vector index and the baseline retrievers.

They import only the base modules (config, data, files, memory, progress, text) and metrics and one another.
"""
