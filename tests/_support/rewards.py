"""Custom reward functions for tests, loaded by path as users do with --custom-rm-path."""


def sevens(args, sample) -> float:
    """Fraction of the response's characters that are '7' (learnable by a tiny random policy)."""
    text = sample.response
    return text.count("7") / max(len(text), 1)


def hangs(args, sample) -> float:
    """Never returns (for --reward-timeout); first touches $SLIME_TEST_HANG_MARKER, if set, to say when."""
    import os
    import time

    marker = os.environ.get("SLIME_TEST_HANG_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{time.time()}\n")
    time.sleep(1e9)
    return 0.0
