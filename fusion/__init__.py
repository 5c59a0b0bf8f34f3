"""Fusion model, classifier, model files, training and evaluation. Tensors only."""
