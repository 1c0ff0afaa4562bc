"""Security and reliability tests: attacks, fuzzing, crash and fault injection, load."""
