"""``mris.training``: the torch side of MRIS (the ``train`` extra).

Modules by concern: ``profiles`` (hyper-parameters), ``models`` (one factory), ``losses`` (eq. 3),
``sampler`` (one visit per knee per epoch), ``cache`` (preprocessed inputs, memory-mapped),
``augment`` (training only), ``trainer`` (one encoder pair), ``localiser`` (knee localiser
training), ``export`` (ONNX + parity + card), ``run`` (the whole ``mris train``), ``commands``
(CLI). docs/TRAINING.md describes the method and the profiles.
"""
