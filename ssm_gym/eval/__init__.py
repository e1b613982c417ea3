"""Evaluation of world models against the ground-truth maze: image metrics and prediction quality."""
