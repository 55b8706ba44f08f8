"""The demo model that sees: easy-VQA data, a CLIP-style pretrained tower, the LLaVA builder and its evaluation.

* ``data``: easy-VQA (PyPI ``easy-vqa``) in LLaVA's conversation format, read offline from the wheel.
* ``tower``: a small CLIP-architecture vision tower pretrained contrastively on captions built from
  the training questions; zero-shot colour / shape accuracy by caption retrieval.
* ``build``: the trainable demo LLaVA (pretrained tower + fresh projector + SmolLM2 from the GGUF)
  and the shipped-weights format (tower + projector + LoRA, merged onto the GGUF LM on load).
* ``evaluate``: easy-VQA test accuracy, overall and per question type.
"""
