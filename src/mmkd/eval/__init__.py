"""Evaluation of CLIP-style dual encoders: zero-shot classification, image–text retrieval and efficiency.

Conventions follow CLIP_benchmark so numbers are comparable with published results: class embeddings
are the L2-normalised mean of L2-normalised prompt-template embeddings, and retrieval recall@k counts an
image→text hit when any of the image's captions is in the top k. Everything here works on already-batched
tensors; reading and preprocessing images is the data layer's job.
"""
