"""Shared code for the Nemotron-3-Nano x MedMCQA notebooks."""
