"""looproto benchmarks: looproto against a hand-written loop in the same framework, same run."""
