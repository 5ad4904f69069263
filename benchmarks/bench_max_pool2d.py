"""pytest-benchmark: max_pool2d, torch against every fastconv implementation, on the cases of
fastconv/_cases.py (see benchmarks/conftest.py for the options)."""

OP = "max_pool2d"


def test_max_pool2d(benchmark, fc_case, fc_impl, fc_direction, fc_run):
    fc_run(benchmark, fc_case, fc_impl, fc_direction)
