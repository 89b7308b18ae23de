"""Fuzzing: the shared contract and seeds (`contract`, `seeds`) and the atheris harnesses
(`fuzz_*.py`, run as scripts; pytest collects none of them). See README.md."""
