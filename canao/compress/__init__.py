"""Compiler-aware architecture search (CANAO): search space, latency oracle, supernet,
distillation, controllers and the search loop. Talks to the compiler only through
latency.LatencyOracle."""
