"""Training: the two-tower model (``model``, ``config``, ``layers``), its losses (``losses``: in-batch softmax, logQ,
accidental hits, mixed and cross-batch negatives), the loss the trainer uses, chosen in one place (``objective``),
the loop (``loop``: ``train`` / ``Trainer`` / validation), distributed training (``distributed``), the row-wise
optimizer (``optim``, ``segments``), warm starts (``warmstart``), the time prior's features (``recency``), towers
-> embeddings (``embed``), and the GPU kernels behind automatic choices with a torch fallback (``kernels``).

Nothing is imported here: ``recsys.train.recency`` is read by the serving path, which must not import torch.
"""
