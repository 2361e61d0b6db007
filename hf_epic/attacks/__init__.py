"""Data-poisoning attacks on ``datasets.Dataset`` image classification sets."""
