# Micro-benchmarks live in bench_*.py as bench_* functions, so that the test suite
# never collects them; they are collected when this folder is run explicitly.
def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
    config.addinivalue_line("python_functions", "bench_*")
