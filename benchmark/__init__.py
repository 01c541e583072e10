"""deqbench benchmark package: datasets, evaluation runs and reporting for DEQ classifiers.

``from benchmark import benchmark`` -- the one-call evaluation of any ``nn.Module``
(:func:`benchmark.api.benchmark`).
"""


def __getattr__(name):
    # lazy: importing benchmark.data (the ground floor) must not import the runner
    if name in ("benchmark", "BenchmarkResult"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
