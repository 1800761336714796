"""Shared plumbing: logging, metrics, process helpers."""
