"""Inference: streamed greedy and sampled generation with a KV cache.

generate      the ``wsjax-generate`` command and ``generate()``
decode        the streamed decoder: prefill, then one token at a time, layer by layer
decode_plan   the KV-cache memory plan (on the device, or offloaded to the host)
"""
