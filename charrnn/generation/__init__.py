"""Generation: logits processors, stop strings, steppers (torch ops and the native kernel), the Sampler
with its continuation API, and ChatSession."""
