"""``mris evaluate``: the paper's three tables on a cohort (retrieval recall, synthesis error by
KL grade against a direct-synthesis U-Net, the database mean map and the oracle neighbour, and
the downstream KL-grade and progression classifiers), as a report with figures.

Modules, top to bottom: ``metrics`` (the numbers), ``classify`` (the downstream classifier),
``methods`` (what each compared method answers for a knee), ``reference_stats`` (Table 2 as the
reference code computes it), ``tables`` (the three tables from per-knee results), ``report``
(markdown, JSON, figures), ``run`` (the orchestration), ``commands`` (the CLI). Torch-free:
trained artefacts run through onnxruntime; what is missing is trained by the ``mris train`` /
``mris train-unet`` commands.
"""
