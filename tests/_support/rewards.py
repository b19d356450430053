"""Custom reward functions for tests, loaded by path as users do with --custom-rm-path."""


def sevens(args, sample) -> float:
    """Fraction of the response's characters that are '7' (learnable by a tiny random policy)."""
    text = sample.response
    return text.count("7") / max(len(text), 1)
