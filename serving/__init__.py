"""Hosted inference: completions, chat completions and classifications served from the fine-tuned models.

One engine per API process (``engine.InferenceEngine``) runs every forward pass on a dedicated thread that owns
the loaded models; requests reach it through a queue and wait on asyncio futures and queues. Importing this
package is cheap: torch and transformers load on the engine thread when the first request arrives.
"""
