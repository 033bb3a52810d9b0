"""Evaluation of accuracy against cost, and pictures of what each stage keeps."""
