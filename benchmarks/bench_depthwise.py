"""pytest-benchmark: depthwise_conv2d, torch against every fastconv implementation, on the cases of
fastconv/_cases.py (see benchmarks/conftest.py for the options)."""

OP = "depthwise_conv2d"


def test_depthwise_conv2d(benchmark, fc_case, fc_impl, fc_direction, fc_run):
    fc_run(benchmark, fc_case, fc_impl, fc_direction)
