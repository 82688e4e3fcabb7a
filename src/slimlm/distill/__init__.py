"""Distillation: a teacher's knowledge into a smaller student, by logits (KD) or by generated text."""
