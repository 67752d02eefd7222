"""Independent transcriptions of the peers' (reference implementations') forward math, for tests."""
