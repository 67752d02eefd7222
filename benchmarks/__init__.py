"""routedlora benchmark harness: python -m benchmarks.run"""
