"""Backtrack: a guardrail proxy for streaming LLM APIs that resets unsafe responses mid-stream."""

__version__ = "0.1.0"
