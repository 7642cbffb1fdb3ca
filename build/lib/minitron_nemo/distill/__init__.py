"""Knowledge distillation: pure loss functions, teacher/student pairing, the training loop."""
