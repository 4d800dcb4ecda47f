"""attacks: play the thief. Distill PyTorch students from hardened (and unhardened) ONNX teachers and measure
how much protection the hardening buys, on real images, honestly: naive and adaptive attackers alike."""
