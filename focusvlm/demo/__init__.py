"""Training the demo model that sees: easy-VQA data, a CLIP-style pretrained tower, the recipe and its evaluation.

* ``data``: easy-VQA (PyPI ``easy-vqa``) in LLaVA's conversation format, read offline from the wheel.
* ``tower``: a small CLIP-architecture vision tower pretrained contrastively on captions built from
  the training questions; zero-shot colour / shape accuracy by caption retrieval.
* ``recipe``: the whole recipe as one resumable run (``focusvlm train --recipe demo``, ``make demo-model``).
* ``evaluate``: easy-VQA test accuracy, overall and per question type.

The model itself (assembling it, its shipped-weights format, loading it) is ``focusvlm.models.demo``.
"""
