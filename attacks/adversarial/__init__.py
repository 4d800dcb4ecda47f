"""White-box PSNR attacks (issue 13 section 2) and adversarially robust codecs (section 3).

``twin``: differentiable PyTorch twins of ONNX files (ASVP hooks for hardened ones), parity-checked against
ONNX Runtime; ``pgd``: L_inf PGD and Chen & Ma's MSE-bounded attack, 8-bit replay through ONNX Runtime and
the vulnerability index; ``models``: what ``attack adversarial`` accepts (files, suite entries, codecs);
``robust``: adversarial fine-tuning and the KD-guided recipe of arXiv 2403.06700; ``report``: aggregation
over seeds and text tables.
"""
