"""Checking a deployed model: live re-evaluation of an OpenAI-compatible endpoint (`kiln monitor`)."""
