"""Real applications served by real servers in the tests (ground truth for the kernel counters)."""
